"""The coordinator's side of both privacy levels: server noise, accounting, the run's ledger.

Record-level epsilon is accounted by each site (its own accountant) and reported per round; the
institution-level epsilon is accounted here over rounds with the site sampling rate.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from common.core.config import Config
from common.privacy.accounting import InstitutionAccountant, add_server_noise
from common.privacy.ddg import DdgAccountant, plan_for
from common.privacy.report import PrivacyLedger, context, report_text
from common.protocol import keys
from common.protocol.aggregate import SiteReport, SumNoise, expected_sites

logger = logging.getLogger(__name__)


class ServerPrivacy:
    """``dim``: the length of the exchanged update (the distributed discrete Gaussian's plan
    depends on it)."""

    def __init__(self, cfg: Config, num_sites: int, dim: int) -> None:
        self.cfg, self.num_sites = cfg, num_sites
        inst = cfg.privacy.institution
        self.ledger = PrivacyLedger(institution_delta=inst.delta if inst.enabled else None)
        self.accountant: InstitutionAccountant | DdgAccountant | None = None
        if cfg.institution_noise_at == "sites":
            plan = plan_for(cfg, dim, expected_sites(cfg, num_sites))
            self.accountant = DdgAccountant(plan, inst.delta)
        elif inst.enabled:
            self.accountant = InstitutionAccountant(inst)

    @property
    def active(self) -> bool:
        return self.cfg.privacy.record.enabled or self.cfg.privacy.institution.enabled

    def noise(self) -> SumNoise | None:
        """What the coordinator adds to a round's float sum: all the noise (server noise), or
        nothing (no institution-level DP; or distributed noise, where the sites add theirs and
        the secure round tops up missing shares in integers before decoding)."""
        inst = self.cfg.privacy.institution
        if self.cfg.institution_noise_at == "server":
            return lambda total, _: add_server_noise(
                total, noise_multiplier=inst.noise_multiplier, clip_norm=inst.clip_norm
            )
        return None

    def record_round(
        self, r: int, reports: list[SiteReport], declined: dict[str, str]
    ) -> dict[str, Any]:
        """Account round ``r``; returns the metrics row's privacy keys."""
        if not self.active:
            return {}
        rec_eps = _reported(reports, keys.RECORD_EPSILON)
        rec_delta = _reported(reports, keys.RECORD_DELTA)
        inst_eps = self.accountant.step_round() if self.accountant else None
        self.ledger.add(r, rec_eps, inst_eps, rec_delta, sorted(declined))
        return {
            "record_epsilon": rec_eps,
            "institution_epsilon": inst_eps,
            "sites_declined": declined,
        }

    def state_dict(self) -> dict[str, Any]:
        acc = self.accountant.state_dict() if self.accountant else None
        return {"ledger": self.ledger.to_json(), "accountant": acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.ledger = PrivacyLedger.from_json(state["ledger"])
        if self.accountant is not None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])

    def summary(self) -> dict[str, Any]:
        if not self.active:
            return {}
        acc = self.accountant
        extra: dict[str, Any] = {}
        if isinstance(acc, InstitutionAccountant):
            extra["institution_epsilon_prv"] = acc.epsilon_with("prv")
        elif isinstance(acc, DdgAccountant):
            extra["institution_epsilon_vs_coordinator"] = acc.epsilon_vs_coordinator()
            extra["ddg_plan"] = acc.plan.to_dict()
        totals = dataclasses.replace(
            self.ledger.summary(), **context(self.cfg, self.num_sites), **extra
        )
        return {**totals.to_dict(), "statement": report_text(totals)}


def _reported(reports: list[SiteReport], key: str) -> dict[str, float]:
    return {u.site: u.metrics[key] for u in reports if key in u.metrics}
