"""Config section of local training at each site (with or without record-level DP)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from common.core.config.section import Section

STAGE_LAYERS = re.compile(r"^(head|all|top:(\d+)|top:(\d+(?:\.\d+)?)%)$")


class UnfreezeStage(Section):
    """One stage of progressive unfreezing (Howard & Ruder 2018, made federated)."""

    from_round: int = Field(ge=1, description="First round of this stage (the first stage: 1).")
    layers: str = Field(
        description=(
            "What trains from this round: `head` (the weights in no transformer layer but the "
            "input embeddings: head, final norm), `top:K` (the head and the top K layers), "
            "`top:P%` (the head and the top P% of the layers, rounded up) or `all` (everything "
            "the method trains). Each stage must include the one before."
        )
    )
    lr_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Multiple of `train.lr` for the weights this stage unfreezes (e.g. 0.5).",
    )

    @field_validator("layers")
    @classmethod
    def _spec(cls, value: str) -> str:
        m = STAGE_LAYERS.match(value.strip())
        if not m:
            raise ValueError(f"`{value}`: use `head`, `top:K`, `top:P%` or `all`")
        k, pct = m.group(2), m.group(3)
        if (k and int(k) == 0) or (pct and not 0 < float(pct) <= 100):
            raise ValueError(f"`{value}`: K must be at least 1 and P in (0, 100]")
        return value.strip()


class TrainConfig(Section):
    local_steps: int = Field(10, gt=0, description="Optimizer steps per site per round.")
    batch_size: int = Field(
        8,
        gt=0,
        description=(
            "Records per optimizer step. Without DP: `grad_accum` micro-batches of "
            "`batch_size // grad_accum`. With record-level DP: the expected Poisson batch (each "
            "record drawn with probability `batch_size / records`; with "
            "`privacy.record.sample_rate`, the public divisor of each step's noisy sum), run in "
            "physical batches of at most `batch_size // grad_accum`."
        ),
    )
    grad_accum: int = Field(
        1,
        gt=0,
        description=(
            "Micro-batches per optimizer step; with DP it sets only the physical batch size "
            "(`batch_size // grad_accum`)."
        ),
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of the local optimizer.")
    layer_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description=(
            "Layer-wise learning rates: the head and the top layer train at `lr`, each layer "
            "below at the rate of the one above times this (e.g. 0.8); 1 = one rate for all."
        ),
    )
    unfreeze: list[UnfreezeStage] = Field(
        default_factory=list,
        description=(
            "Progressive unfreezing across rounds, as `[[train.unfreeze]]` stages (from_round, "
            "layers, lr_scale): e.g. the head in rounds 1-2, `top:50%` from round 3 at half the "
            "rate, `all` from round 5. Applies to what `lora.method` trains (adapters by the "
            "layer they sit in, or the weights of `partial` / `full`); sites and coordinator "
            "derive each round's set from the config. Empty: everything trains every round."
        ),
    )
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw",
        description=(
            "The sites' local optimizer: `adamw`, or plain `sgd` (no momentum), the local "
            "optimizer of adaptive server optimizers (`federation.server_optimizer`)."
        ),
    )
    proximal_mu: float = Field(
        0.0,
        ge=0,
        description=(
            "FedProx (Li et al. 2020): each local step also pulls the weights towards the "
            "round's global adapter by `proximal_mu * (w - w_global)`; 0 = off. Data-independent, "
            "so under record-level DP it is added after the noise (no privacy cost)."
        ),
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description=(
            "Weight decay (AdamW: decoupled; SGD: L2), with or without DP; never on biases "
            "and norm weights."
        ),
    )
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
    seed: int = Field(
        0,
        description=(
            "Seeds torch (dropout) and, without DP, the data order. DP-SGD's sampling and noise "
            "never follow it: they come from a secret random source."
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Recompute each layer's activations in the backward pass instead of keeping them "
            "(less memory, more compute). Not with record-level DP."
        ),
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description=(
            "Mixed precision of the forward and backward passes (torch autocast): `bf16` on CPU "
            "or a GPU that has it, `fp16` on CUDA only. Weights, optimizer state, the loss and "
            "what is aggregated stay float32. Not with record-level DP."
        ),
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Processes a site's local round runs data-parallel over (torch.distributed, gloo on "
            "CPU): each takes a share of every micro-batch, gradients are summed before each "
            "step, so the update is the single-process one. Not with record-level DP."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description=(
            "Where to train: `auto` = `cpu`. `cuda` (experimental, never run on a GPU by this "
            "project's tests) only with `train.workers` > 1: each worker trains on its own GPU "
            "over NCCL; the site process, its evaluation and DP stay on CPU."
        ),
    )
    cache_frozen: bool = Field(
        False,
        description=(
            "When only the top of the model trains (e.g. `lora.layers` = [-1]), run the frozen "
            "layers below the lowest trained one once per record and keep their output for "
            "every later step and round, instead of at every step: each step then costs only "
            "the trained layers. Those frozen layers run without dropout (eval mode). Privacy is "
            "unchanged. Not with `train.workers` > 1."
        ),
    )
    cache_precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description=(
            "Precision of `train.cache_frozen`'s once-per-record pass through the frozen layers: "
            "`bf16` runs it under bfloat16 autocast, about twice as fast on a CPU with bfloat16 "
            "instructions (AVX512-BF16, AMX) or a GPU (slower on a CPU without them); `auto` "
            "picks `bf16` where it is fast and `fp32` elsewhere (each site on its own). The "
            "states differ from float32's by about 1% in norm and are kept in float32; the "
            "trained layers, the steps and DP-SGD stay float32. Privacy is unchanged. Without "
            "`train.cache_frozen` it does nothing."
        ),
    )
    threads: int = Field(0, ge=0, description="torch threads per site; 0 = torch's default.")

    @field_validator("unfreeze")
    @classmethod
    def _stages(cls, stages: list[UnfreezeStage]) -> list[UnfreezeStage]:
        if stages and stages[0].from_round != 1:
            raise ValueError("the first stage must start at `from_round` = 1")
        for i in range(1, len(stages)):
            if stages[i].from_round <= stages[i - 1].from_round:
                raise ValueError(
                    f"stage {i}: `from_round` ({stages[i].from_round}) must come after stage "
                    f"{i - 1}'s ({stages[i - 1].from_round})"
                )
        return stages

    @property
    def grad_clip_norm(self) -> float:
        """The whole-gradient clipping bound of non-DP training."""
        return 1.0 if self.max_grad_norm is None else self.max_grad_norm
