"""Local training of the LoRA adapters at one site, in plain torch.

AdamW (no decay on biases and norms), linear warmup then decay over the run's planned steps,
gradient accumulation, gradient clipping, seeded data order. One call = one round's local steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.core.config import TrainConfig
from common.core.tasks import Encoded, batch_loss, collate

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    loss: float  # mean training loss over the round's micro-batches
    first_loss: float
    last_loss: float
    steps: int
    examples: int


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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable weights; biases and norm weights (1-D) get no decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def batches(
    examples: list[Encoded], cfg: TrainConfig, seed: int, pad_id: int, steps: int
) -> list[list[dict[str, torch.Tensor]]]:
    """``steps`` optimizer steps, each a list of ``grad_accum`` micro-batches, seeded order."""
    rng = np.random.default_rng(seed)
    micro = max(1, cfg.batch_size // cfg.grad_accum)
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


def train_round(
    model: nn.Module,
    examples: list[Encoded],
    cfg: TrainConfig,
    *,
    pad_id: int,
    round_idx: int,
    total_rounds: int,
    seed: int,
) -> TrainResult:
    """Run ``cfg.local_steps`` optimizer steps; the schedule spans all planned rounds."""
    torch.manual_seed(seed)
    model.train()
    opt = make_optimizer(model, cfg)
    total = cfg.local_steps * total_rounds
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    for s, micro_batches in enumerate(batches(examples, cfg, seed, pad_id, cfg.local_steps)):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(round_idx * cfg.local_steps + s, total, cfg)
        for mb in micro_batches:
            loss, _ = batch_loss(model, mb)
            (loss / len(micro_batches)).backward()
            losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    n = cfg.local_steps * cfg.grad_accum * max(1, cfg.batch_size // cfg.grad_accum)
    return TrainResult(float(np.mean(losses)), losses[0], losses[-1], cfg.local_steps, n)
