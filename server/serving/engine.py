"""The model behind ``fedtune serve``: one base, the names it is served under, batched generation.

One set of weights in memory serves every model id: either a published (merged) folder under its
name, or a base model with LoRA adapters kept separate (PEFT), one id per adapter, switched per
batch. A batch is one ``model.generate`` over left-padded prompts; each row stops on its own (end
of sequence, a stop string, its ``max_tokens``, or its client hanging up) and is then padding.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from server.serving.batching import Batcher, Handle
from server.serving.generation import (
    GenRequest,
    Prompter,
    TextSink,
    context_length,
    eos_ids,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One model id of the API: the base weights, or a named LoRA adapter over them."""

    model_id: str
    adapter: str | None  # PEFT adapter name; None: the weights as loaded (merged folder)
    source: str  # where it came from, for `/metrics`' model info


@dataclass(frozen=True)
class EngineLimits:
    max_batch: int = 8
    max_queue: int = 64
    gather_s: float = 0.05
    max_tokens: int | None = None  # the most a request may ask for; None: the context length

    def __post_init__(self) -> None:
        from common.core.errors import ConfigError

        if self.max_batch < 1 or self.max_queue < 1 or (self.max_tokens or 1) < 1:
            raise ConfigError("`max_batch`, `max_queue` and `max_tokens` must be at least 1")


class Engine:
    """Validates requests against the model, queues them, and generates in batches."""

    def __init__(
        self, model: Any, tokenizer: Any, served: list[ServedModel], limits: EngineLimits
    ) -> None:
        if not served:
            raise ValueError("an engine needs at least one served model")
        self.model, self.tokenizer, self.served = model, tokenizer, served
        tokenizer.padding_side = "left"  # a batch's prompts end together; generation continues
        self.context_length = context_length(model, tokenizer)
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = _pad_id(tokenizer, self.eos_ids)
        cap = limits.max_tokens or self.context_length
        self.prompter = Prompter(tokenizer, self.context_length, self.model_ids, cap)
        self._adapters = {s.model_id: s.adapter for s in served}
        self.created = int(time.time())
        self.batcher = Batcher(self._run_batch, limits.max_batch, limits.max_queue, limits.gather_s)
        self.batches = 0  # generate calls so far (tests and the bench read it)
        self.on_batch: Callable[[int], None] | None = None  # told each batch's size (metrics)

    @property
    def model_ids(self) -> list[str]:
        return [s.model_id for s in self.served]

    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop) -> Handle:
        """Queue ``req``; raises ApiError 429 when the queue is full."""
        handle = Handle(req, loop)
        self.batcher.submit(handle)
        return handle

    def close(self) -> None:
        self.batcher.close()

    # ---------------------------------------------------------------------------- worker side

    def _run_batch(self, handles: list[Handle]) -> None:
        reqs = [h.req for h in handles]
        self._select(reqs[0].model)
        sinks = [TextSink(self.tokenizer, h.req, self.eos_ids, h.emit) for h in handles]
        input_ids, mask = self._left_pad([r.prompt_ids for r in reqs])  # (B, T) each
        config = self._generation_config(reqs[0], max(r.max_tokens for r in reqs))
        if reqs[0].seed is not None:  # seeded requests run alone (batch_key), so this reproduces
            torch.manual_seed(reqs[0].seed)
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(handles))
        with torch.inference_mode():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=config,
                streamer=_RowStreamer(sinks),
                stopping_criteria=[_RowsDone(handles, sinks)],
            )
        for handle, sink in zip(handles, sinks, strict=True):
            handle.finish(sink.result())

    def _select(self, model_id: str) -> None:
        adapter = self._adapters[model_id]
        if adapter is not None:
            self.model.set_adapter(adapter)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        device = self.model.device
        return ids.to(device), mask.to(device)

    def _generation_config(self, req: GenRequest, max_new_tokens: int) -> Any:
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens, config.max_length = max_new_tokens, None
        config.eos_token_id = sorted(self.eos_ids) or None
        config.pad_token_id = self.pad_id
        config.do_sample = not req.greedy
        config.temperature = req.temperature if config.do_sample else None
        config.top_p = req.top_p if config.do_sample else None
        config.top_k = None
        config.use_cache = True
        return config


class _RowStreamer(BaseStreamer):
    """Hands each step's tokens (B,) to the rows' sinks; the first call is the prompt."""

    def __init__(self, sinks: list[TextSink]) -> None:
        self.sinks, self.seen_prompt = sinks, False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for sink, token in zip(self.sinks, value.reshape(-1).tolist(), strict=True):
            sink.put(int(token))

    def end(self) -> None:
        pass


class _RowsDone(StoppingCriteria):
    """Per-row stop: a stop string, the row's own ``max_tokens``, or its client gone."""

    def __init__(self, handles: list[Handle], sinks: list[TextSink]) -> None:
        self.handles, self.sinks = handles, sinks

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        for handle, sink in zip(self.handles, self.sinks, strict=True):
            sink.cancelled = sink.cancelled or handle.cancelled
        done = [sink.done for sink in self.sinks]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _pad_id(tokenizer: Any, eos: set[int]) -> int:
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else min(eos, default=0)
