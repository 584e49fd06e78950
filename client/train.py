"""Local training of the LoRA adapters at one site: the one loop, with or without DP-SGD.

:func:`train_round` owns what every round shares: the optimizer (:func:`make_optimizer`), the
learning-rate schedule (:func:`lr_factor`, set in one place), the step loop, the loss bookkeeping
and the :class:`TrainResult`. How one optimizer step is taken is a :class:`Stepper`:
:class:`PlainStepper` here, ``client.dp.DPStepper`` for record-level DP, which wraps
this same optimizer in Opacus' DPOptimizer. One call = one round's local steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from common.core.adapters import EMBEDDING, LAYER_INDEX, num_layers, stage_scales
from common.core.config import TrainConfig
from common.core.errors import ModelError
from common.core.frozen import skipping, with_cache
from common.core.tasks import Encoded, batch_loss, collate

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
NO_DECAY_MARKERS = ("norm", "ia3_l", "lora_magnitude_vector", "prompt_encoder")


@dataclass
class TrainResult:
    loss: float  # mean of the losses the round's steps reported (nan if none)
    first_loss: float
    last_loss: float
    steps: int
    examples: int  # records drawn (plain) or sampled from (DP-SGD)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at global step ``step`` of ``total``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def layer_lr_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """`train.layer_lr_decay`: each trainable weight's multiple of `train.lr`. A weight in layer
    ``i`` of ``n`` gets ``decay ** (n - 1 - i)``; the top layer and weights in no layer (the
    head, the final norm) get 1; the input embeddings, below every layer, get ``decay ** n``
    (unless tied to the output head, which keeps the head's rate). ``n`` is the model's
    `num_hidden_layers` (else the highest layer seen + 1)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    found = {name: int(m.group(1)) for name in names if (m := LAYER_INDEX.search(name))}
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        n = max(found.values(), default=-1) + 1
    below = _input_embedding_names(model)
    return {
        name: decay ** max(0, n - 1 - found[name])
        if name in found
        else (decay**n if name in below else 1.0)
        for name in names
    }


def _input_embedding_names(model: nn.Module) -> set[str]:
    """Names of the input-side embedding weights (token, position, token type): in no layer,
    below all of them. A token embedding tied to the output head counts as the head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    tied = getattr(head, "weight", None)
    return {
        name
        for name, p in model.named_parameters()
        if EMBEDDING.search(name) and not LAYER_INDEX.search(name) and p is not tied
    }


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """No weight decay for biases and norm weights (1-D), nor for PEFT's multiplicative or
    learned-input vectors (IA3's scalings start at 1, prompt tuning's virtual tokens are
    inputs): decay would pull them towards 0, not towards the base model."""
    return p.ndim < 2 or any(marker in name.lower() for marker in NO_DECAY_MARKERS)


def _top_first(item: tuple[tuple[float, bool], list[nn.Parameter]]) -> tuple[float, bool]:
    (scale, no_decay), _ = item
    return (-scale, no_decay)


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, stage: dict[str, float] | None = None
) -> Optimizer:
    """AdamW (or SGD) over the trainable weights, in parameter groups by rate and decay: biases
    and norm weights (1-D) get no weight decay; with `train.layer_lr_decay` < 1 each layer's
    weights get their rate (:func:`layer_lr_scales`). Each group's ``lr_scale`` is its multiple
    of `train.lr` (the schedule in :func:`train_round` sets ``lr = train.lr * factor * scale``).
    ``stage``: the `train.unfreeze` stage's multiple of each trainable weight (default 1).
    """
    scales = layer_lr_scales(model, cfg.layer_lr_decay)
    if stage:
        scales = {name: s * stage.get(name, 1.0) for name, s in scales.items()}
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = _no_decay(name, p)
        grouped.setdefault((scales[name], no_decay), []).append(p)
    groups = [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "lr": cfg.lr * scale,
            "lr_scale": scale,
        }
        for (scale, no_decay), params in sorted(
            grouped.items(), key=lambda kv: (-kv[0][0], kv[0][1])
        )
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _proximal_hook(model: nn.Module, opt: Optimizer, mu: float) -> RemovableHandle:
    """FedProx's term: before every step of ``opt``, ``grad += mu * (w - w_round_start)``.

    A pre-hook of the inner optimizer, so under DP-SGD (Opacus' DPOptimizer wraps ``opt`` and
    calls its ``step`` after clipping and noising) it is added to the privatized gradient: it
    depends on no record, only on the weights and the public global adapter.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]

    def pull(_opt: Optimizer, _args: object, _kwargs: object) -> None:
        for p, a in zip(params, anchor, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - a, alpha=mu)

    return opt.register_step_pre_hook(pull)


def _call(model: nn.Module, method: str, kwargs: dict[str, bool] | None = None) -> None:
    """A Hugging Face model's gradient-checkpointing switch (PEFT passes it to the base)."""
    fn = getattr(model, method, None)
    if not callable(fn):
        raise ModelError(
            f"`train.gradient_checkpointing`: this model ({type(model).__name__}) has no `{method}`"
        )
    fn(**({"gradient_checkpointing_kwargs": kwargs} if kwargs else {}))


def autocast(model: nn.Module, cfg: TrainConfig) -> contextlib.AbstractContextManager[object]:
    """`train.precision`: the forward and backward passes under torch autocast (bf16, or fp16
    on CUDA); the weights stay float32 and so does the loss (:func:`batch_loss` casts logits).
    Refused, naming the field, where the training device has no such autocast."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    device = next(p.device for p in model.parameters() if p.requires_grad)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ModelError(
            f'`train.precision` = "fp16" needs a CUDA device; this site trains on '
            f'`{device.type}`: use "bf16" or "fp32"'
        )
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelError('`train.precision` = "bf16": this GPU has no bfloat16; use "fp16"')
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class _Stage:
    scales: dict[str, float]  # rate multiple of each weight trained this round
    frozen: list[nn.Parameter]  # trainable weights the stage holds back this round


def _unfreeze_stage(model: nn.Module, cfg: TrainConfig, round_no: int) -> _Stage:
    """`train.unfreeze` at round ``round_no``: hold back (requires_grad off, restored after the
    round) what the method trains but this round's stage does not."""
    if not cfg.unfreeze:
        return _Stage({}, [])
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    scales = stage_scales(list(params), cfg.unfreeze, num_layers(model), round_no)
    frozen = [p for k, p in params.items() if k not in scales]
    for p in frozen:
        p.requires_grad_(False)
    return _Stage(scales, frozen)


def micro_batch_size(cfg: TrainConfig) -> int:
    """Records per forward/backward pass: ``batch_size // grad_accum`` (at least 1)."""
    return max(1, cfg.batch_size // cfg.grad_accum)


def batches(
    examples: list[Encoded], cfg: TrainConfig, seed: int, pad_id: int, steps: int
) -> list[list[Batch]]:
    """``steps`` optimizer steps, each a list of ``grad_accum`` micro-batches, seeded order."""
    rng = np.random.default_rng(seed)
    micro = micro_batch_size(cfg)
    needed = steps * cfg.grad_accum * micro
    order: list[int] = []
    while len(order) < needed:
        order += rng.permutation(len(examples)).tolist()
    out = []
    for s in range(steps):
        step_batches = []
        for a in range(cfg.grad_accum):
            start = (s * cfg.grad_accum + a) * micro
            idx = order[start : start + micro]
            step_batches.append(collate([examples[i] for i in idx], pad_id))
        out.append(step_batches)
    return out


class Stepper(Protocol):
    """How :func:`train_round` takes one optimizer step: all that plain and DP-SGD training
    differ in. The loop has set the step's learning rate before :meth:`step` is called."""

    examples: int  # for TrainResult.examples; set by :meth:`open`
    private: bool  # DP-SGD: nothing but a record itself may decide how it is computed

    def open(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        examples: list[Encoded],
        cfg: TrainConfig,
        *,
        pad_id: int,
        seed: int,
    ) -> None:
        """Take over the round's model, its optimizer (DP-SGD wraps it) and its records."""
        ...

    def step(self) -> list[float]:
        """One optimizer step; the losses it saw (none for a step on no records)."""
        ...

    def close(self) -> None:
        """Undo :meth:`open` (e.g. remove Opacus' hooks); runs even when a step failed."""
        ...


class PlainStepper:
    """Seeded data order, ``grad_accum`` micro-batches, whole-gradient clipping, one step."""

    examples = 0
    private = False

    def open(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        examples: list[Encoded],
        cfg: TrainConfig,
        *,
        pad_id: int,
        seed: int,
    ) -> None:
        self.model, self.optimizer, self.clip = model, optimizer, cfg.grad_clip_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps: Iterator[list[Batch]] = iter(
            batches(examples, cfg, seed, pad_id, cfg.local_steps)
        )
        self.examples = cfg.local_steps * cfg.grad_accum * micro_batch_size(cfg)

    def step(self) -> list[float]:
        micro_batches = next(self.steps)
        losses = []
        for mb in micro_batches:
            loss, _ = batch_loss(self.model, mb)
            (loss / len(micro_batches)).backward()
            losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def close(self) -> None:
        pass


def train_round(
    model: nn.Module,
    examples: list[Encoded],
    cfg: TrainConfig,
    *,
    pad_id: int,
    round_idx: int,
    total_rounds: int,
    seed: int,
    stepper: Stepper | None = None,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` optimizer steps; the schedule spans all planned rounds.

    ``cache_dir``: where `train.cache_frozen` keeps its states between processes (the site's
    state folder); without it they live in this process only.

    ``stepper`` takes each step (default :class:`PlainStepper`; ``DPStepper`` for record-level
    DP). Every ``train`` field means the same in both, except where said:

    - ``local_steps``: optimizer steps per round (logical DP-SGD steps: one noise draw each).
    - ``lr``, ``warmup_steps``, ``schedule``: the peak rate and its schedule over all planned
      steps of the run, set here before every step.
    - ``weight_decay``: AdamW's decoupled decay on weight matrices; never on biases and norm
      weights (:func:`make_optimizer`). Under DP it acts after the noisy gradient step.
    - ``batch_size``: records per optimizer step. Plain: exactly ``grad_accum`` micro-batches
      of ``batch_size // grad_accum``. DP: the expected size of a Poisson batch (each record
      drawn with probability ``batch_size / records``), run in physical batches of at most
      ``batch_size // grad_accum``, so their number varies from step to step.
    - ``grad_accum``: plain: micro-batches per step; DP: sets the physical batch size only.
    - ``max_grad_norm``: plain only, the whole gradient's clipping bound (``grad_clip_norm``);
      DP-SGD clips each record's gradient to ``privacy.record.max_grad_norm`` instead.
    - ``seed``: seeds torch (dropout) in both, and the data order without DP. DP-SGD's Poisson
      sampling and noise never follow it: they come from a CSPRNG, since whoever can replay
      them can tell which records were drawn and subtract the noise.
    """
    torch.manual_seed(seed)
    model.train()
    thawed = _unfreeze_stage(model, cfg, round_idx + 1)
    opt = make_optimizer(model, cfg, thawed.scales)
    total = cfg.local_steps * total_rounds
    stepper = stepper if stepper is not None else PlainStepper()
    losses: list[float] = []
    prox = _proximal_hook(model, opt, cfg.proximal_mu) if cfg.proximal_mu > 0 else None
    checkpointing = cfg.gradient_checkpointing
    if checkpointing:  # non-reentrant: no input that requires grad is needed (frozen embeddings)
        _call(model, "gradient_checkpointing_enable", {"use_reentrant": False})
    precision = autocast(model, cfg)
    skip: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    try:
        if cfg.cache_frozen:
            examples, prefix = with_cache(
                model, examples, pad_id, thawed.frozen, cache_dir, cfg.cache_precision,
                private=stepper.private,
            )  # fmt: skip
            skip = skipping(model, prefix) if prefix is not None else skip
        with skip:
            stepper.open(model, opt, examples, cfg, pad_id=pad_id, seed=seed)
            try:
                for s in range(cfg.local_steps):
                    factor = lr_factor(round_idx * cfg.local_steps + s, total, cfg)
                    for group in opt.param_groups:
                        group["lr"] = cfg.lr * factor * group.get("lr_scale", 1.0)
                    with precision:
                        losses += stepper.step()
            finally:
                stepper.close()
    finally:
        for p in thawed.frozen:  # what the stage held back trains again in a later stage
            p.requires_grad_(True)
        if prox is not None:
            prox.remove()
        if checkpointing:
            _call(model, "gradient_checkpointing_disable")
    seen = losses or [float("nan")]
    return TrainResult(float(np.mean(seen)), seen[0], seen[-1], cfg.local_steps, stepper.examples)
