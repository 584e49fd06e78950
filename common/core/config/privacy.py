"""Config sections of differential privacy: record level (DP-SGD) and institution level."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from common.core.config.section import Section


class RecordDPConfig(Section):
    """Record-level DP: DP-SGD at each site (Abadi et al. 2016) with Opacus."""

    enabled: bool = Field(False, description="Train each site with DP-SGD (Opacus).")
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="DP-SGD noise std / clipping bound; exclusive with `target_epsilon`.",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description=(
            "Epsilon for the whole run; the noise is calibrated for the planned rounds and steps. "
            "Exclusive with `noise_multiplier`."
        ),
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Per-record clipping bound.")
    sample_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "Poisson sample rate of every DP-SGD step, the same at every site (default: "
            "`train.batch_size / records`, a batch of the same expected size everywhere). Each "
            "step's noisy sum of clipped gradients is then divided by `train.batch_size` (a "
            "public constant) rather than by the site's own expected batch, so a site's update "
            'weighs with its records, as `federation.weighting = "records"` would, without '
            "disclosing any count."
        ),
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="Delta; default min(1e-5, 1/(10·records)) per site."
    )
    budget_epsilon: float | None = Field(
        None, gt=0, description="A site declines a round that would take it past this epsilon."
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp",
        description=(
            "Privacy accountant: `rdp`, the one each site's ledger charges rounds with (`prv` is "
            "refused with record-level DP on: noise calibrated by PRV would be recorded above "
            "the target)."
        ),
    )
    grad_sample_mode: Literal["hooks", "ghost"] = Field(
        "hooks", description="Opacus per-sample gradient mode; `ghost` = fast gradient clipping."
    )

    @model_validator(mode="after")
    def _noise_xor_target(self) -> RecordDPConfig:
        if not self.enabled:
            return self
        if self.accountant != "rdp":
            raise ValueError(
                f'`privacy.record.accountant` = "{self.accountant}" is not supported: each '
                "site's ledger charges every round with RDP (one accountant over all of the "
                "site's runs), so noise calibrated by PRV would be recorded above the target "
                '(epsilon 8 by PRV was 9.15 in the ledger); use "rdp"'
            )
        has_noise, has_target = self.noise_multiplier is not None, self.target_epsilon is not None
        if has_noise == has_target:
            got = "both" if has_noise else "neither"
            raise ValueError(
                "record-level DP needs exactly one of `noise_multiplier` and `target_epsilon` "
                f"(got {got})"
            )
        target, budget = self.target_epsilon, self.budget_epsilon
        if target is not None and budget is not None and target > budget:
            raise ValueError(
                f"`target_epsilon` ({target}) exceeds `budget_epsilon` ({budget}): "
                "the site would stop before the planned run ends"
            )
        return self


class InstitutionDPConfig(Section):
    """Institution-level DP: clip each site's whole update, Gaussian noise on the sum."""

    enabled: bool = Field(False, description="Clip and noise each site's whole update.")
    clip_norm: float = Field(1.0, gt=0, description="Bound C on each site's update norm.")
    noise_multiplier: float = Field(1.0, ge=0, description="Noise std of the sum / C.")
    delta: float = Field(1e-5, gt=0, lt=1, description="Delta of the institution-level guarantee.")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Privacy accountant.")
    noise_at: Literal["auto", "sites", "server"] = Field(
        "auto",
        description=(
            "Who adds the noise: `sites` (distributed: each adds a share, needs secure "
            "aggregation to mean anything), `server` (trusted server adds it to the sum), or "
            "`auto` (`sites` when `secagg.enabled`, else `server`)."
        ),
    )


# Defaults filled in by `privacy.enabled = true` (each can still be set explicitly).
_DEFAULT_TARGET_EPSILON = 8.0


class PrivacyConfig(Section):
    enabled: bool = Field(False, description="Shortcut: turn on both levels with defaults.")
    record: RecordDPConfig = Field(default_factory=RecordDPConfig, description="Record-level DP.")
    institution: InstitutionDPConfig = Field(
        default_factory=InstitutionDPConfig, description="Institution-level DP."
    )

    @model_validator(mode="before")
    @classmethod
    def _shortcut(cls, data: Any) -> Any:
        """``enabled = true`` turns on both levels unless a level says ``enabled = false``.

        Applies to input trees (TOML, ``--set``); on attribute assignment the sections are
        already models and are left as they are.
        """
        if not isinstance(data, dict) or data.get("enabled") is not True:
            return data
        data = dict(data)
        record = data.get("record", {})
        if isinstance(record, dict):
            record = dict(record)
            if (
                record.setdefault("enabled", True) is True
                and record.get("noise_multiplier") is None
            ):
                record.setdefault("target_epsilon", _DEFAULT_TARGET_EPSILON)
            data["record"] = record
        institution = data.get("institution", {})
        if isinstance(institution, dict):
            data["institution"] = {"enabled": True, **institution}
        return data
