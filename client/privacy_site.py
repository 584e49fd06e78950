"""A site's privacy machinery around the local round: its accountant and budget, update clipping.

DP-SGD itself is ``client.dp.DPStepper``, the step of the one training loop under record-level DP.

The record-level accountant lives in the node's state (Flower's ``context.state``) and in a file in
the site's state folder, so epsilon composes over the whole run even across process restarts. A
site whose next round would exceed its budget declines and says why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from common.core.config import Config
from common.privacy.accounting import (
    GaussianAccountant,
    RecordPlan,
    add_noise_share,
    clip_update,
    decline_reason,
    record_plan,
)

logger = logging.getLogger(__name__)


class SiteAccountant:
    """Loads and saves one site's record-level accountant for one run."""

    def __init__(self, state: dict[str, Any], state_file: Path | None, mechanism: str) -> None:
        self.state, self.state_file = state, state_file
        blob = state.get("accountant")
        if blob is None and state_file is not None and state_file.is_file():
            blob = state_file.read_bytes()
        self.accountant = (
            GaussianAccountant.from_bytes(bytes(blob)) if blob else GaussianAccountant(mechanism)  # type: ignore[arg-type]
        )

    def earlier_epsilon(self, delta: float) -> float:
        """Epsilon spent on these records by the site's earlier runs (other accountant files).

        Runs on the same records compose: summing their epsilons (and deltas) is the basic
        composition theorem, a valid upper bound, so a site's budget holds across runs too.
        """
        if self.state_file is None or not self.state_file.parent.is_dir():
            return 0.0
        others = [
            f for f in self.state_file.parent.glob("accountant-*.json") if f != self.state_file
        ]
        return sum(GaussianAccountant.from_bytes(f.read_bytes()).epsilon(delta) for f in others)

    def save(self) -> None:
        blob = self.accountant.to_bytes()
        self.state["accountant"] = blob
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_bytes(blob)
            tmp.replace(self.state_file)


def check_budget(
    acc: SiteAccountant, cfg: Config, records: int, budget: float | None
) -> tuple[RecordPlan, str | None]:
    """The round's plan and, if the site must decline, why. The tighter of the site's own cap
    (node config) and the run's cap applies, net of what earlier runs spent on these records."""
    plan = record_plan(cfg, records)
    limits = [b for b in (budget, cfg.privacy.record.budget_epsilon) if b is not None]
    if not limits:
        return plan, None
    limit, earlier = min(limits), acc.earlier_epsilon(plan.delta)
    if earlier >= limit:
        return plan, (
            f"declining to train: earlier runs on these records already spent epsilon "
            f"{earlier:.3f} of the budget {limit:.3f}"
        )
    reason = decline_reason(acc.accountant, plan, limit - earlier)
    if reason and earlier:
        reason += f"; earlier runs on these records spent {earlier:.3f} of {limit:.3f}"
    return plan, reason


def privatize_update(vec: np.ndarray, cfg: Config, noise_at_site: bool) -> tuple[np.ndarray, float]:
    """Institution-level DP at the site: clip the whole update to C, add this site's noise share.

    The share's std is sigma*C/sqrt(min_sites), so the sum over at least ``min_sites`` survivors
    carries the full sigma*C (distributed DP, as in Kairouz et al. 2021).
    """
    inst = cfg.privacy.institution
    clipped, norm = clip_update(vec, inst.clip_norm)
    if noise_at_site:
        clipped = add_noise_share(
            clipped, noise_multiplier=inst.noise_multiplier, clip_norm=inst.clip_norm,
            min_sites=cfg.federation.min_sites,
        )  # fmt: skip
    return clipped.astype(np.float32), norm


def noise_at_site(cfg: Config) -> bool:
    return cfg.institution_noise_at == "sites"  # the rule lives in the config (one place)
