"""Request validation and text generation behind ``fedtune serve`` (no HTTP here).

Every problem with a request becomes an :class:`ApiError` carrying an OpenAI-style error body, so
the HTTP layer never answers a bad request with a 500. Generation is serialized by one lock: one
model instance must not run two generations at once, and on a CPU one request at a time is also
the fastest schedule.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)

Kind = Literal["chat", "completion"]
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULT_MAX_TOKENS = {"chat": 256, "completion": 16}


class ApiError(Exception):
    """A request the server will not serve; carries the HTTP status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type_,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class GenRequest:
    """A validated request: prompt token ids and sampling settings."""

    kind: Kind
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None


@dataclass
class GenResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


# ------------------------------------------------------------------------------- field checks


def _typed(body: dict[str, Any], name: str, types: tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int subclass in Python; `"max_tokens": true` is a type error, not 1.
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        raise ApiError(400, f"`{name}` must be {wanted}, got {type(value).__name__}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = float(_typed(body, name, (int, float), default))
    if not lo <= value <= hi:
        raise ApiError(400, f"`{name}` must be between {lo} and {hi}, got {value}", name)
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    stop = _typed(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(
            400, "`stop` must be a non-empty string or a list of up to 4 of them", "stop"
        )
    return list(stops)


def _message_text(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise ApiError(400, f"`messages[{i}]` must be an object", f"messages[{i}]")
    role = message.get("role")
    if role not in _ROLES:
        raise ApiError(400, f"`messages[{i}].role` must be one of {sorted(_ROLES)}, got {role!r}",
                       f"messages[{i}].role")  # fmt: skip
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is supported by a text model
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ApiError(400, "only `text` content parts are supported", f"messages[{i}].content")
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"`messages[{i}].content` must be a string", f"messages[{i}].content")
    return {"role": _ROLES[role], "content": content}


# ------------------------------------------------------------------------------------ streamer


class _TextSink(BaseStreamer):
    """Receives token ids from ``generate``; emits text deltas, cut at stop strings."""

    def __init__(self, tokenizer: Any, stops: list[str], emit: Callable[[str], None]) -> None:
        self.tokenizer, self.stops, self.emit = tokenizer, stops, emit
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.seen_prompt = False
        self.hit_stop = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first hands over the prompt
            self.seen_prompt = True
            return
        if self.hit_stop:
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        if not self.hit_stop:
            self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit_stop = True
            end = cut
        elif final:
            end = len(text)
        elif text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        else:  # hold back a tail that could still become a stop string
            end = len(text) - max((_overlap(text, s) for s in self.stops), default=0)
        if end > self.sent:
            delta, self.sent = text[self.sent : end], end
            self.emit(delta)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


# -------------------------------------------------------------------------------------- engine


class Engine:
    """One model and tokenizer; validates requests and runs one generation at a time."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, queue_timeout_s: float = 600.0):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.queue_timeout_s = queue_timeout_s
        self.context_length = _context_length(model, tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._lock = threading.Lock()

    def parse(self, kind: Kind, body: dict[str, Any]) -> GenRequest:
        model = _typed(body, "model", (str,), None)
        if model is None:
            raise ApiError(400, "`model` is required", "model")
        if model != self.model_id:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                           f"`{self.model_id}`", "model", "model_not_found")  # fmt: skip
        if _typed(body, "n", (int,), 1) != 1:
            raise ApiError(400, "`n` must be 1", "n")
        prompt_ids = self._chat_ids(body) if kind == "chat" else self._completion_ids(body)
        return self._sampling(kind, body, prompt_ids)

    def _sampling(self, kind: Kind, body: dict[str, Any], prompt_ids: list[int]) -> GenRequest:
        name = (
            "max_completion_tokens"
            if body.get("max_completion_tokens") is not None
            else "max_tokens"
        )
        max_tokens = _typed(body, name, (int,), DEFAULT_MAX_TOKENS[kind])
        if not 1 <= max_tokens <= self.context_length:
            raise ApiError(400, f"`{name}` must be between 1 and {self.context_length}, "
                           f"got {max_tokens}", name)  # fmt: skip
        if name not in body:  # the default shrinks to fit; an explicit value must fit
            max_tokens = max(1, min(max_tokens, self.context_length - len(prompt_ids)))
        if len(prompt_ids) + max_tokens > self.context_length:
            raise ApiError(400, f"This model's maximum context length is {self.context_length} "
                           f"tokens; the request has {len(prompt_ids)} prompt tokens and asks for "
                           f"{max_tokens} more", "messages" if kind == "chat" else "prompt",
                           "context_length_exceeded")  # fmt: skip
        options = _typed(body, "stream_options", (dict,), {})
        return GenRequest(
            kind,
            prompt_ids,
            max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
            stop=_stop(body),
            stream=_typed(body, "stream", (bool,), False),
            include_usage=bool(options.get("include_usage", False)),
            seed=_typed(body, "seed", (int,), None),
        )

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        messages = _typed(body, "messages", (list,), None)
        if not messages:
            raise ApiError(400, "`messages` must be a non-empty list", "messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
        convo = [_message_text(m, i) for i, m in enumerate(messages)]
        try:
            text = self.tokenizer.apply_chat_template(
                convo, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # jinja templates raise their own errors on unsupported input
            raise ApiError(400, f"chat template rejected the messages: {err}", "messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _completion_ids(self, body: dict[str, Any]) -> list[int]:
        prompt = _typed(body, "prompt", (str, list), None)
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise ApiError(400, "`prompt` must be a string or a list of one string", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "`prompt` must be a non-empty string", "prompt")
        return list(self.tokenizer(prompt)["input_ids"])

    def generate(self, req: GenRequest, emit: Callable[[str], None]) -> GenResult:
        """Generate, calling ``emit`` with each text delta; exceptions from ``emit`` abort."""
        if not self._lock.acquire(timeout=self.queue_timeout_s):
            raise ApiError(503, "server busy; try again", None, "server_busy", "server_error")
        try:
            return self._generate_locked(req, emit)
        finally:
            self._lock.release()

    def _generate_locked(self, req: GenRequest, emit: Callable[[str], None]) -> GenResult:
        sink = _TextSink(self.tokenizer, req.stop, emit)
        config = self._generation_config(req)
        if req.seed is not None:
            torch.manual_seed(req.seed)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                streamer=sink,
                stopping_criteria=[lambda *_a, **_k: sink.hit_stop],
            )
        n = len(sink.ids)
        eos = n > 0 and sink.ids[-1] in self.eos_ids
        reason = "length" if n >= req.max_tokens and not (eos or sink.hit_stop) else "stop"
        text = self.tokenizer.decode(sink.ids, skip_special_tokens=True)
        return GenResult(text[: sink.sent], reason, len(req.prompt_ids), n)

    def _generation_config(self, req: GenRequest) -> Any:
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens, config.max_length = req.max_tokens, None
        config.eos_token_id = sorted(self.eos_ids) or None
        pad = self.tokenizer.pad_token_id
        config.pad_token_id = pad if pad is not None else min(self.eos_ids, default=0)
        config.do_sample = req.temperature > 0
        config.temperature = req.temperature if config.do_sample else None
        config.top_p = req.top_p if config.do_sample else None
        config.top_k = None
        return config


def _context_length(model: Any, tokenizer: Any) -> int:
    cfg = model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < n:
        n = tok_max
    return int(n)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    found: set[int] = set()
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list):
            found.update(int(v) for v in value)
    return found
