"""The coordinator's side of both privacy levels: server noise, accounting, the run's ledger.

Record-level epsilon is accounted by each site (its own accountant) and reported per round; the
institution-level epsilon is accounted here over rounds with the site sampling rate.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np

from common.core.adapters import flatten, unflatten
from common.core.config import Config
from common.privacy.accounting import (
    InstitutionAccountant,
    add_server_noise,
    institution_sample_rate,
)
from common.privacy.report import PrivacyLedger, report_text
from server.strategy import SiteUpdate

logger = logging.getLogger(__name__)


def server_adds_noise(cfg: Config) -> bool:
    """Institution-level noise is added by the coordinator (else by the sites, in shares)."""
    inst = cfg.privacy.institution
    return inst.enabled and (
        inst.noise_at == "server" or (inst.noise_at == "auto" and not cfg.secagg.enabled)
    )


class ServerPrivacy:
    def __init__(self, cfg: Config, num_sites: int) -> None:
        self.cfg = cfg
        inst = cfg.privacy.institution
        self.ledger = PrivacyLedger(institution_delta=inst.delta if inst.enabled else None)
        self.accountant: InstitutionAccountant | None = None
        if inst.enabled:
            per_round = cfg.federation.sites_per_round or num_sites
            q = institution_sample_rate(per_round, num_sites)
            self.accountant = InstitutionAccountant(inst, q)

    @property
    def active(self) -> bool:
        return self.cfg.privacy.record.enabled or self.cfg.privacy.institution.enabled

    def server_adds_noise(self) -> bool:
        return server_adds_noise(self.cfg)

    def noise_average(
        self, average: dict[str, np.ndarray], contributors: int
    ) -> OrderedDict[str, np.ndarray]:
        """Gaussian noise of std sigma*C on the sum of clipped updates = sigma*C/n on the mean."""
        inst = self.cfg.privacy.institution
        total = flatten(average).astype(np.float64) * contributors
        noised = add_server_noise(
            total, noise_multiplier=inst.noise_multiplier, clip_norm=inst.clip_norm
        )
        return unflatten((noised / contributors).astype(np.float32), average)

    def record_round(
        self, r: int, reports: list[SiteUpdate], declined: dict[str, str]
    ) -> dict[str, Any]:
        """Account round ``r``; returns the metrics row's privacy keys."""
        if not self.active:
            return {}
        rec_eps = {
            u.site: u.metrics["record-epsilon"] for u in reports if "record-epsilon" in u.metrics
        }
        rec_delta = {
            u.site: u.metrics["record-delta"] for u in reports if "record-delta" in u.metrics
        }
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
        totals = self.ledger.summary()
        return {**totals.to_dict(), "statement": report_text(totals)}
