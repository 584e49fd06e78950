"""The run's privacy ledger, plans, and the plain statement a privacy officer reads."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacySummary:
        return cls(**dict(data))


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


def plan(cfg: Config, num_records_per_site: Mapping[str, int]) -> PrivacySummary:
    """What ``cfg`` will spend if every site takes part in every round (an upper bound)."""
    if not num_records_per_site:
        raise PrivacyError("`num_records_per_site` is empty: a plan needs at least one site")
    rec_eps: dict[str, float] = {}
    rec_delta: dict[str, float] = {}
    if cfg.privacy.record.enabled:
        for site, n in num_records_per_site.items():
            p = record_plan(cfg, n)
            rec_eps[site], rec_delta[site] = p.epsilon, p.delta
    inst = cfg.privacy.institution
    inst_eps = institution_epsilon_planned(cfg, len(num_records_per_site)) if inst.enabled else None
    return PrivacySummary(
        cfg.federation.rounds, True, rec_eps, rec_delta, inst_eps,
        inst.delta if inst.enabled else None,
    )  # fmt: skip


def _fmt(eps: float) -> str:
    return "infinite (no protection)" if math.isinf(eps) else f"{eps:.2f}"


def report_text(summary: PrivacySummary | Mapping[str, Any]) -> str:
    """A plain statement of the guarantee, for a privacy officer."""
    s = summary if isinstance(summary, PrivacySummary) else PrivacySummary.from_dict(summary)
    when = f"planned for {s.rounds} rounds" if s.planned else f"after {s.rounds} rounds"
    lines = [f"Privacy guarantee ({when}):"]
    if s.record_epsilon:
        eps, delta = max(s.record_epsilon.values()), max(s.record_delta.values(), default=1.0)
        lines.append(f"- Each patient record: ({_fmt(eps)}, {delta:.1e})-DP (worst site).")
        lines += [
            f"    site {k}: epsilon {_fmt(v)}, delta {s.record_delta.get(k, delta):.1e}"
            for k, v in sorted(s.record_epsilon.items())
        ]
    else:
        lines.append("- Each patient record: no record-level DP (not protected by noise).")
    if s.institution_epsilon is not None:
        lines.append(
            f"- Each institution's entire dataset: ({_fmt(s.institution_epsilon)}, "
            f"{s.institution_delta:.1e})-DP."
        )
    else:
        lines.append("- Each institution's entire dataset: no institution-level DP.")
    lines.append(
        "(epsilon, delta)-DP means: adding or removing that one record (or that whole institution) "
        "changes the probability of any outcome of the published model by at most a factor "
        "e^epsilon, except with probability delta."
    )
    return "\n".join(lines)


def noise_outlook(cfg: Config, num_records_per_site: Mapping[str, int]) -> str:
    """Per site, how loud the record-level noise of each optimizer step is (for the ML engineer).

    DP-SGD adds Gaussian noise of std ``sigma * C`` to the sum of a step's clipped per-record
    gradients (each of norm <= C), then divides by the expected batch ``B``: per coordinate the
    average gets noise of std ``sigma / B`` times C, while the signal it hides is at most C in norm.
    """
    if not cfg.privacy.record.enabled:
        return ""
    lines = [
        "Record-level noise per optimizer step (std per coordinate of the averaged clipped "
        "gradient, in units of the clip bound C = `privacy.record.max_grad_norm`):"
    ]
    for site, n in sorted(num_records_per_site.items()):
        p = record_plan(cfg, n)
        lines.append(
            f"    site {site}: {n} records, sample rate {p.sample_rate:.3f}, noise multiplier "
            f"{p.noise_multiplier:.2f}, noise {p.noise_multiplier / p.expected_batch_size:.3f} C"
        )
    lines.append(
        "The averaged gradient is at most C in norm; the noise's norm is that std times the "
        "square root of the number of trained parameters. Sites with few records need the most "
        "noise and contribute mostly noise. At the same epsilon, utility improves with more "
        "records per site, a larger `train.batch_size`, fewer `train.local_steps` x "
        "`federation.rounds`, or fewer trained parameters (`lora.r`, `lora.target_modules`)."
    )
    return "\n".join(lines)
