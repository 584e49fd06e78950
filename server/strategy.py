"""Which sites take part in a round (seeded sampling), and when the run stops early."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from common.core.config import EarlyStopConfig, FederationConfig
from common.core.errors import RoundError


class SiteSampler:
    """Seeded sampling of ``sites_per_round`` sites (all when 0), reproducible per round."""

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg

    def sample(self, node_ids: list[int], round_idx: int) -> list[int]:
        nodes = sorted(node_ids)
        k = self.cfg.sites_per_round or len(nodes)
        if len(nodes) < max(k, self.cfg.min_sites):
            raise RoundError(
                f"round {round_idx}: {len(nodes)} site(s) connected, need "
                f"{max(k, self.cfg.min_sites)} (`federation.sites_per_round` / `min_sites`)"
            )
        rng = np.random.default_rng([self.cfg.seed, round_idx])
        # Choose positions, not ids: node ids are 64-bit unsigned and numpy would cast them.
        picked = rng.choice(len(nodes), size=k, replace=False)
        return sorted(nodes[int(i)] for i in picked)


class EarlyStopper:
    """`federation.early_stop`: the best evaluated round so far, and whether to stop now.

    Rebuilt from the run's rows on resume (each evaluated row carries ``eval_<metric>``), so it
    needs no state of its own in the checkpoint.
    """

    def __init__(self, cfg: EarlyStopConfig, rows: list[dict[str, Any]] | None = None) -> None:
        self.cfg = cfg
        self.best_round: int | None = None
        self.best_value = math.nan
        self.best_metrics: dict[str, float] = {}
        self.since_best = 0
        for row in rows or []:
            ev = {k[5:]: v for k, v in row.items() if k.startswith("eval_") and v is not None}
            if ev:
                self.observe(int(row["round"]), ev)

    @property
    def enabled(self) -> bool:
        return self.cfg.patience > 0

    def observe(self, round_idx: int, metrics: dict[str, float]) -> bool:
        """Record one evaluation; True when the run should stop after this round (never while
        early stopping is off)."""
        if not self.enabled:
            return False
        if self.cfg.metric not in metrics:
            raise RoundError(
                f"`federation.early_stop.metric` is `{self.cfg.metric}` but the evaluation "
                f"gives only {', '.join(sorted(metrics)) or 'nothing'}"
            )
        value = float(metrics[self.cfg.metric])
        sign = -1.0 if self.cfg.metric == "loss" else 1.0
        if self.best_round is None or sign * (value - self.best_value) > self.cfg.min_delta:
            self.best_round, self.best_value, self.since_best = round_idx, value, 0
            self.best_metrics = dict(metrics)
        else:
            self.since_best += 1
        return self.enabled and self.since_best >= self.cfg.patience
