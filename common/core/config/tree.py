"""The whole configuration tree: its sections, the rules across them, and derived values.

Derived values (the weighting, who adds institution-level noise, the quantizer's range) are
properties computed from the fields: nothing is written back into a field, so a config survives
dump -> load -> dump unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

from pydantic import Field, model_validator

from common.core.config.data import DataConfig
from common.core.config.federation import EvalConfig, FederationConfig
from common.core.config.model import LoraConfig, ModelConfig
from common.core.config.privacy import PrivacyConfig
from common.core.config.secagg import DEFAULT_CLIP_RANGE, SecAggConfig
from common.core.config.section import Section
from common.core.config.simulation import SimulationConfig
from common.core.config.training import TrainConfig


class Config(Section):
    """The whole run: one tree shared by the ServerApp, the ClientApp and the CLI."""

    name: str = Field("run", description="Run name, shown in logs and summaries.")
    recipe: Literal["none", "dp"] = Field(
        "none",
        description=(
            "A named set of training settings: `dp` is the DP fine-tuning recipe (one large-batch "
            "SGD step per site and round, FedAdam at the coordinator with a decaying step, "
            "rank-2 FFA-LoRA on the top layer). Each of its groups is filled "
            "in only where the config sets none of the group's fields; see "
            "common/core/config/recipes.py."
        ),
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    data: DataConfig = Field(default_factory=DataConfig, description="Site data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Local training.")
    federation: FederationConfig = Field(
        default_factory=FederationConfig, description="Rounds and sampling."
    )
    evaluation: EvalConfig = Field(
        default_factory=EvalConfig, description="Server-side evaluation."
    )
    simulation: SimulationConfig = Field(
        default_factory=SimulationConfig, description="Virtual sites for `fedtune simulate`."
    )
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="DP at both levels.")
    secagg: SecAggConfig = Field(default_factory=SecAggConfig, description="Secure aggregation.")

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems: list[str] = []
        fed = self.federation
        if fed.sites_per_round and fed.min_sites > fed.sites_per_round:
            problems.append(
                f"`federation.min_sites` ({fed.min_sites}) exceeds "
                f"`federation.sites_per_round` ({fed.sites_per_round})"
            )
        if self.model.task == "seq-cls" and not self.data.labels:
            problems.append("`data.labels` must list the classes when `model.task` is `seq-cls`")
        if self.data.labels and len(set(self.data.labels)) != len(self.data.labels):
            problems.append("`data.labels` has duplicates")
        if self.privacy.record.enabled and self.train.max_grad_norm is not None:
            problems.append(
                "`train.max_grad_norm` clips the whole gradient and does not apply under "
                "record-level DP: set `privacy.record.max_grad_norm` (the per-record bound) instead"
            )
        if self.privacy.record.enabled and self.lora.method in ("dora", "ia3"):
            problems.append(
                f'`lora.method` = "{self.lora.method}" is not supported with record-level DP '
                "(`privacy.record.enabled`): Opacus computes no per-record gradients for PEFT's "
                "DoRA and IA3 layers; use `lora`"
            )
        if self.privacy.record.enabled and self.lora.method == "prompt":
            problems.append(
                '`lora.method` = "prompt" is not supported with record-level DP '
                "(`privacy.record.enabled`): PEFT computes the virtual tokens once per batch and "
                "repeats them, so Opacus would clip the batch's summed gradient, not each "
                "record's; use `lora`, `partial` or `full`"
            )
        if self.privacy.record.enabled and self.train.workers > 1:
            problems.append(
                f"`train.workers` = {self.train.workers} is not supported with record-level DP "
                "(`privacy.record.enabled`): DP-SGD over several processes needs one noise draw "
                "per step across them (Opacus' distributed optimizer), which is not built"
            )
        if self.train.cache_frozen and self.train.workers > 1:
            problems.append(
                f"`train.cache_frozen` is not supported with `train.workers` = "
                f"{self.train.workers}: the cached states stay in the site process; use one "
                "worker (the cache makes each step cheaper than several workers would)"
            )
        if self.train.device == "cuda" and self.train.workers < 2:
            problems.append(
                '`train.device` = "cuda" is not supported with `train.workers` = 1: sites train '
                "on CPU (`auto` or `cpu`); the only GPU path is the experimental multi-GPU one, "
                "`train.workers` > 1 (one GPU per worker, NCCL)"
            )
        if self.model.quantization != "none" and self.lora.method in ("partial", "head", "full"):
            problems.append(
                f'`model.quantization` = "{self.model.quantization}" leaves nothing to train with '
                f'`lora.method` = "{self.lora.method}" (quantized weights are frozen); use an '
                "adapter method (`lora`, `dora`, `ia3`, `prompt`) or `none`"
            )
        if self.privacy.record.enabled and self.train.precision != "fp32":
            problems.append(
                f'`train.precision` = "{self.train.precision}" is not supported with record-level '
                "DP (`privacy.record.enabled`): each record's gradient must be clipped in float32, "
                "and Opacus' per-record hooks fail under autocast; use `fp32`"
            )
        if self.privacy.record.enabled and self.train.gradient_checkpointing:
            problems.append(
                "`train.gradient_checkpointing` is not supported with record-level DP "
                "(`privacy.record.enabled`): Opacus' per-record gradient hooks would see each "
                "recomputed layer twice"
            )
        if self.privacy.institution.enabled and fed.weighting == "records":
            problems.append(
                "`federation.weighting` must be `uniform` (or `auto`) with institution-level DP: "
                "weighting by records scales a site's sensitivity beyond the clip bound"
            )
        elif self.privacy.record.enabled and fed.weighting == "records":
            problems.append(
                "`federation.weighting` must be `uniform` (or `auto`) with record-level DP: "
                "weighting by records needs each site's exact record count, which the guarantee "
                "does not cover (adding one record changes it), so sites do not send it"
            )
        problems += self._noise_checks()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _noise_checks(self) -> list[str]:
        """Distributed noise needs secure aggregation, and room in the quantizer's range."""
        inst, sec = self.privacy.institution, self.secagg
        if not inst.enabled:
            return []
        if inst.noise_at == "sites" and not sec.enabled:
            return [
                '`privacy.institution.noise_at` = "sites" needs `secagg.enabled`: without it '
                "the coordinator sees each site's update with only a share of the noise"
            ]
        needed = self._range_for_site_noise()
        if isinstance(sec.clip_range, float) and sec.clip_range < needed:
            return [
                f"`secagg.clip_range` ({sec.clip_range}) must be at least {needed} "
                "(C + 6 noise std) with institution-level noise added at the sites"
            ]
        return []

    # -- derived values: computed from the fields, never written back into them -------------
    @property
    def site_weighting(self) -> Literal["records", "uniform"]:
        """`federation.weighting` in effect (`auto`: uniform under either DP level)."""
        if self.federation.weighting != "auto":
            return self.federation.weighting
        private = self.privacy.institution.enabled or self.privacy.record.enabled
        return "uniform" if private else "records"

    @property
    def institution_noise_at(self) -> Literal["server", "sites"] | None:
        """Who adds institution-level noise (None: that level is off). The one place this rule
        lives: `auto` means the sites (in shares) under secure aggregation, else the server."""
        inst = self.privacy.institution
        if not inst.enabled:
            return None
        if inst.noise_at != "auto":
            return inst.noise_at
        return "sites" if self.secagg.enabled else "server"

    @property
    def quantizer_range(self) -> float:
        """`secagg.clip_range` in effect (`auto`: the default, widened for site noise shares)."""
        if isinstance(self.secagg.clip_range, float):
            return self.secagg.clip_range
        return max(DEFAULT_CLIP_RANGE, self._range_for_site_noise())

    def _range_for_site_noise(self) -> float:
        """C + 6 std of one site's noise share (sigma*C/sqrt(min_sites)), rounded up to 1e-3;
        0 when the sites add no noise. The quantizer must not clip the noise away."""
        if self.institution_noise_at != "sites":
            return 0.0
        inst = self.privacy.institution
        share = inst.noise_multiplier * inst.clip_norm / self.federation.min_sites**0.5
        return math.ceil((inst.clip_norm + 6 * share) * 1000) / 1000

    def digest(self) -> str:
        """sha256 of the canonical JSON form: identifies a configuration in manifests."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()
