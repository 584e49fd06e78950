"""Config section of local training at each site (with or without record-level DP)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.core.config.section import Section


class TrainConfig(Section):
    local_steps: int = Field(10, gt=0, description="Optimizer steps per site per round.")
    batch_size: int = Field(
        8, gt=0, description="Records per optimizer step (before accumulation)."
    )
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay (never on biases and norms).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (over the whole run).")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate decay after warmup, over all planned steps of the run."
    )
    max_grad_norm: float | None = Field(
        None,
        gt=0,
        description=(
            "Clip the whole gradient to this norm (unset: 1.0). Not with record-level DP, which "
            "clips each record's gradient to `privacy.record.max_grad_norm` instead."
        ),
    )
    seed: int = Field(0, description="Seed of data order and dropout.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    threads: int = Field(0, ge=0, description="torch threads per site; 0 = torch's default.")

    @property
    def grad_clip_norm(self) -> float:
        """The whole-gradient clipping bound of non-DP training."""
        return 1.0 if self.max_grad_norm is None else self.max_grad_norm
