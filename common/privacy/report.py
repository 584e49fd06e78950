"""The run's privacy ledger, plans, and the plain statement a privacy officer reads."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from common.core.config import Config
from common.core.errors import PrivacyError
from common.privacy.accounting import institution_epsilon_planned, record_plan

# ---------------------------------------------------------------- ledger and report


@dataclass(frozen=True)
class PrivacySummary:
    """Totals of a run (or of a plan): what the model card and the privacy report state."""

    rounds: int
    planned: bool
    record_epsilon: dict[str, float] = field(default_factory=dict)  # per site; empty = off
    record_delta: dict[str, float] = field(default_factory=dict)
    institution_epsilon: float | None = None  # None = institution level off
    institution_delta: float | None = None
    record_accountant: str = "rdp"
    institution_accountant: str = "rdp"
    institution_epsilon_prv: float | None = None  # the same history under PRV, for comparison
    institution_noise_at: str | None = None  # "server" or "sites" (threat model)
    denominator: int | None = None  # the fixed DP-FedAvg denominator (sites per round)
    # distributed discrete Gaussian (noise at the sites): replace-one epsilon against the
    # coordinator, and the mechanism's parameters (common/privacy/ddg.py)
    institution_epsilon_vs_coordinator: float | None = None
    ddg_plan: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacySummary:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LedgerEntry:
    round: int
    record_epsilon: dict[str, float]  # cumulative, per site that reported this round
    institution_epsilon: float | None
    declined: list[str] = field(default_factory=list)


@dataclass
class PrivacyLedger:
    """Per-round privacy entries of a run; ``summary()`` gives the totals."""

    record_delta: dict[str, float] = field(default_factory=dict)
    institution_delta: float | None = None
    entries: list[LedgerEntry] = field(default_factory=list)

    def add(
        self,
        round: int,
        record_epsilon: Mapping[str, float],
        institution_epsilon: float | None = None,
        record_delta: Mapping[str, float] | None = None,
        declined: list[str] | None = None,
    ) -> LedgerEntry:
        self.record_delta.update(record_delta or {})
        entry = LedgerEntry(round, dict(record_epsilon), institution_epsilon, list(declined or []))
        self.entries.append(entry)
        return entry

    def summary(self) -> PrivacySummary:
        latest: dict[str, float] = {}
        for e in self.entries:
            latest.update(e.record_epsilon)
        inst = [e.institution_epsilon for e in self.entries if e.institution_epsilon is not None]
        return PrivacySummary(
            rounds=max((e.round for e in self.entries), default=0), planned=False,
            record_epsilon=latest, record_delta=dict(self.record_delta),
            institution_epsilon=inst[-1] if inst else None,
            institution_delta=self.institution_delta if inst else None,
        )  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        data = json.loads(text)
        entries = [LedgerEntry(**e) for e in data.get("entries", [])]
        return cls(data.get("record_delta", {}), data.get("institution_delta"), entries)


def plan(
    cfg: Config, num_records_per_site: Mapping[str, int], dim: int | None = None
) -> PrivacySummary:
    """What ``cfg`` will spend if every site takes part in every round (an upper bound).
    ``dim``: the exchanged update's length (needed with distributed noise)."""
    if not num_records_per_site:
        raise PrivacyError("`num_records_per_site` is empty: a plan needs at least one site")
    rec_eps: dict[str, float] = {}
    rec_delta: dict[str, float] = {}
    if cfg.privacy.record.enabled:
        for site, n in num_records_per_site.items():
            p = record_plan(cfg, n)
            rec_eps[site], rec_delta[site] = p.epsilon, p.delta
    inst = cfg.privacy.institution
    sites = len(num_records_per_site)
    inst_eps = institution_epsilon_planned(cfg, sites, dim) if inst.enabled else None
    extra: dict[str, Any] = {}
    if cfg.institution_noise_at == "sites" and dim is not None:
        from common.privacy.ddg import epsilon_from_rho, plan_for

        ddg = plan_for(cfg, dim, cfg.federation.sites_per_round or sites)
        rho = cfg.federation.rounds * ddg.round_rho(replace_one=True)
        extra = {
            "ddg_plan": ddg.to_dict(),
            "institution_epsilon_vs_coordinator": epsilon_from_rho(rho, inst.delta),
        }
    return PrivacySummary(
        cfg.federation.rounds, True, rec_eps, rec_delta, inst_eps,
        inst.delta if inst.enabled else None, **context(cfg, sites), **extra,
    )  # fmt: skip


def context(cfg: Config, num_sites: int) -> dict[str, Any]:
    """The summary fields that say how the guarantee is obtained (accountants, threat model)."""
    inst = cfg.privacy.institution
    return {
        "record_accountant": cfg.privacy.record.accountant,
        "institution_accountant": inst.accountant,
        "institution_noise_at": cfg.institution_noise_at,
        "denominator": (cfg.federation.sites_per_round or num_sites) if inst.enabled else None,
    }


def _fmt(eps: float) -> str:
    return "infinite (no protection)" if math.isinf(eps) else f"{eps:.2f}"


def report_text(summary: PrivacySummary | Mapping[str, Any]) -> str:
    """The guarantee in plain words, per level: unit, adjacency, threat model, accountant,
    epsilon, delta, rounds. What the summary, `privacy-report` and the model card print."""
    s = summary if isinstance(summary, PrivacySummary) else PrivacySummary.from_dict(summary)
    when = f"planned for {s.rounds} rounds" if s.planned else f"after {s.rounds} rounds"
    lines = [f"Privacy guarantee ({when}):", *_record_words(s), *_institution_words(s)]
    lines.append(
        "(epsilon, delta)-DP means: adding or removing that one record (or that whole institution) "
        "changes the probability of any outcome by at most a factor e^epsilon, except with "
        "probability delta."
    )
    return "\n".join(lines)


def _record_words(s: PrivacySummary) -> list[str]:
    if not s.record_epsilon:
        return ["- Each record: no record-level DP (not protected by noise)."]
    eps, delta = max(s.record_epsilon.values()), max(s.record_delta.values(), default=1.0)
    return [
        f"- Each record: ({_fmt(eps)}, {delta:.1e})-DP at the worst site. Unit: one training "
        "example of one site; add/remove adjacency; DP-SGD with per-record clipping at each "
        f"site, {s.record_accountant.upper()} accountant composed over every round it trained. "
        "Against anyone who sees what leaves the site: the coordinator, the other sites and "
        "holders of the published model.",
        *(
            f"    site {k}: epsilon {_fmt(v)}, delta {s.record_delta.get(k, delta):.1e}"
            for k, v in sorted(s.record_epsilon.items())
        ),
    ]


def _institution_words(s: PrivacySummary) -> list[str]:
    if s.institution_epsilon is None:
        return ["- Each institution's entire dataset: no institution-level DP."]
    denominator = (
        f"a fixed denominator ({s.denominator} sites per round)"
        if s.denominator
        else ("a fixed denominator")
    )
    if s.institution_noise_at == "sites":
        return _distributed_words(s, denominator)
    prv = s.institution_epsilon_prv
    beside = f" (PRV accountant: {_fmt(prv)})" if prv is not None else ""
    return [
        f"- Each institution's entire dataset: ({_fmt(s.institution_epsilon)}, "
        f"{s.institution_delta:.1e})-DP{beside}, add/remove adjacency. DP-FedAvg: each site's "
        f"update clipped to norm C, Gaussian noise on the sum, {denominator}. Noise added by "
        "the coordinator, after it has seen each clipped update (floating-point Gaussian from a "
        "CSPRNG): this holds against holders of the published model and of the per-round "
        f"adapters, not against the coordinator. {s.institution_accountant.upper()} accountant, "
        "every round charged in full (no amplification by the sample the coordinator draws)."
    ]


def _distributed_words(s: PrivacySummary, denominator: str) -> list[str]:
    plan = s.ddg_plan or {}
    m = plan.get("min_sites", "min_sites")
    vs = s.institution_epsilon_vs_coordinator
    against = (
        f" Against the coordinator itself, which sees the secure sum of at least {m} sites and "
        f"knows who took part: ({_fmt(vs)}, {s.institution_delta:.1e})-DP, replace-one "
        "adjacency (one institution's update replaced by any other)."
        if vs is not None
        else ""
    )
    assert s.institution_epsilon is not None  # the caller returns early without it
    return [
        f"- Each institution's entire dataset: ({_fmt(s.institution_epsilon)}, "
        f"{s.institution_delta:.1e})-DP for holders of the published model and the per-round "
        f"adapters, add/remove adjacency.{against} Mechanism: DP-FedAvg with the distributed "
        "discrete Gaussian (Kairouz, Liu, Steinke 2021): each site clips its update to norm C, "
        "rotates it (random signs, Walsh-Hadamard), scales and rounds it to integers "
        "(conditional randomized rounding), adds exact discrete Gaussian noise (Canonne, "
        "Kamath, Steinke 2020) from a CSPRNG, and masks it for secure aggregation; the "
        f"coordinator adds the shares of missing sites in integers; the sum is divided by "
        f"{denominator}. Accounted "
        f"with the sum's zCDP bound for {m} noise shares (Kairouz et al., Theorem 1) through "
        "RDP, every round charged in full."
    ]


# A step's noise against what it hides. DP-SGD adds N(0, (sigma C)^2) per coordinate to the sum of
# a step's clipped per-record gradients (each of norm <= C) and divides by the batch B, so over
# the d trained parameters the noise's norm is about sigma sqrt(d) / B times C, while the mean
# gradient it hides is at most C (all records agreeing) and usually well below. Above
# NOISE_NORM_TOO_LOUD the noise outweighs the largest possible signal at every step and training
# goes nowhere (measured on bank-complaints: ratio 0.6-1.4 stayed at the majority class; the DP
# fine-tuning recipes that keep accuracy, Li et al. 2022, Yu et al. 2022, Sun et al. 2024, run
# far below it, with batches of 1,000+). Without the parameter count (it needs the model), the
# per-coordinate rule NOISE_TOO_LOUD stands in (sigma / B above 0.05).
NOISE_NORM_TOO_LOUD = 0.5
NOISE_TOO_LOUD = 0.05


@dataclass(frozen=True)
class StepNoise:
    """How loud one site's record-level noise is per step (in units of the clip bound C)."""

    per_coordinate: float  # sigma / B
    norm: float | None  # sigma sqrt(d) / B; None without the trained parameter count d

    @property
    def too_loud(self) -> bool:
        if self.norm is not None:
            return self.norm > NOISE_NORM_TOO_LOUD
        return self.per_coordinate > NOISE_TOO_LOUD


def step_noise(cfg: Config, num_records: int, trained: int | None) -> StepNoise:
    p = record_plan(cfg, num_records)
    coord = p.noise_multiplier / p.expected_batch_size
    return StepNoise(coord, coord * math.sqrt(trained) if trained else None)


def noise_outlook(
    cfg: Config, num_records_per_site: Mapping[str, int], trained: int | None = None
) -> str:
    """Per site, how loud the record-level noise of each optimizer step is (for the ML engineer).

    ``trained``: the number of parameters DP-SGD trains (and noises), when known. Sites whose
    noise is too loud (:class:`StepNoise`) get a warning with the batch that would quiet them.
    """
    if not cfg.privacy.record.enabled:
        return ""
    lines = [
        "Record-level noise per optimizer step (std per coordinate of the averaged clipped "
        "gradient, in units of the clip bound C = `privacy.record.max_grad_norm`"
        + (f"; and its norm over the {trained:,} trained parameters" if trained else "")
        + "):"
    ]
    warnings = []
    for site, n in sorted(num_records_per_site.items()):
        p = record_plan(cfg, n)
        noise = step_noise(cfg, n, trained)
        norm = f", {noise.norm:.2f} C in norm" if noise.norm is not None else ""
        lines.append(
            f"    site {site}: {n} records, sample rate {p.sample_rate:.3f}, noise multiplier "
            f"{p.noise_multiplier:.2f}, noise {noise.per_coordinate:.4f} C{norm}"
        )
        if noise.too_loud:
            warnings.append(_too_loud(cfg, site, n, noise, trained))
    lines.append(
        "The averaged gradient is at most C in norm (usually well below); the noise's norm is "
        "the std per coordinate times the square root of the number of trained parameters. "
        "Sites with few records need the most noise and contribute mostly noise. At the same "
        "epsilon, utility improves with more records per site, a larger `train.batch_size` "
        "(or `privacy.record.sample_rate`), fewer `train.local_steps` x `federation.rounds`, "
        "or fewer trained parameters (`lora.r`, `lora.target_modules`)."
    )
    return "\n".join(lines + warnings)


# Per-record gradient norms at the start of training, against the clip bound C. With C below
# nearly all of them, DP-SGD normalizes every record's gradient: each record then pushes with
# the same weight however well it is already fitted, and the most frequent class keeps winning
# (clipping bias). Measured on bank-complaints (norms about 1.5): at C = 0.1 the model stayed at
# the majority class even at epsilon 1000; at C = 2.5 it learned (0.525 at epsilon 8).
CLIPPED_SHARE_TOO_HIGH = 0.9


def clip_outlook(cfg: Config, norms: list[float]) -> str:
    """How the clip bound compares with per-record gradient norms measured at the start (on a
    sample of the records); a warning when nearly every record would be clipped."""
    if not cfg.privacy.record.enabled or not norms:
        return ""
    c = cfg.privacy.record.max_grad_norm
    q10, q50, q90 = (float(np.percentile(norms, q)) for q in (10, 50, 90))
    clipped = sum(n > c for n in norms) / len(norms)
    lines = [
        f"Per-record gradient norms at the start ({len(norms)} records): 10% {q10:.3g}, "
        f"median {q50:.3g}, 90% {q90:.3g}; C = {c:g} clips {clipped:.0%} of them."
    ]
    if clipped >= CLIPPED_SHARE_TOO_HIGH:
        lines.append(
            f"WARNING: `privacy.record.max_grad_norm` = {c:g} clips {clipped:.0%} of the records' "
            "gradients: each record then pushes alike however well it is already fitted, and "
            "the most frequent labels win (clipping bias). A bound near the 90% norm "
            f"(about {q90:.2g}) clips only outliers; the noise grows with C, and so does the "
            "signal it is measured against."
        )
    return "\n".join(lines)


def quieter_rate(cfg: Config, num_records: int, trained: int | None = None) -> float | None:
    """Under `privacy.record.sample_rate`: the smallest of 0.1, 0.2, ..., 0.9 above the configured
    rate whose noise per step is not too loud at the same plan; None if none is."""
    rec = cfg.privacy.record
    for rate in (r / 10 for r in range(1, 10)):
        if rate <= (rec.sample_rate or 0.0):
            continue
        trial = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={
            "record": rec.model_copy(update={"sample_rate": rate})})})  # fmt: skip
        if not step_noise(trial, num_records, trained).too_loud:
            return rate
    return None


def quieter_batch(cfg: Config, num_records: int, trained: int | None = None) -> int | None:
    """The smallest `train.batch_size` (doubling from the configured one, below the site's
    records) whose noise per step is not too loud at the same plan; None if none is."""
    batch = cfg.train.batch_size
    while (batch := batch * 2) < num_records:
        trial = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch})})
        if not step_noise(trial, num_records, trained).too_loud:
            return batch
    return None


def _too_loud(cfg: Config, site: str, n: int, noise: StepNoise, trained: int | None) -> str:
    if noise.norm is not None:
        what = f"noise per step ({noise.norm:.2f} C in norm, above {NOISE_NORM_TOO_LOUD} C)"
    else:
        what = f"noise per step ({noise.per_coordinate:.3f} C, above {NOISE_TOO_LOUD} C)"
    head = f"WARNING: site {site}'s {what} is too loud to learn from: "
    # The DP recipe trains few parameters in few large steps: the first thing to try
    recipe = "" if cfg.recipe == "dp" else "; `--set recipe=dp` sets the DP fine-tuning recipe"
    if cfg.privacy.record.sample_rate is not None:
        rate = quieter_rate(cfg, n, trained)
        if rate is None:
            return head + (
                "no `privacy.record.sample_rate` below 1 gets it under at this epsilon and "
                "number of steps; it needs more records, fewer steps, fewer trained parameters "
                f"or a larger epsilon{recipe}"
            )
        return head + (
            f"`privacy.record.sample_rate` = {rate:g} (same steps and epsilon) would bring it "
            f"under{recipe}"
        )
    batch = quieter_batch(cfg, n, trained)
    if batch is None:
        return head + (
            f"no `train.batch_size` below its {n} records gets it under at this epsilon and "
            "number of steps; it needs more records, fewer steps, fewer trained parameters or a "
            f"larger epsilon{recipe}"
        )
    return head + (
        f"`train.batch_size` = {batch} (same steps and epsilon) would bring it under{recipe}"
    )
