"""Aggregation of adapter updates and site sampling: small classes, numpy in, numpy out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.core.config import FederationConfig
from common.core.errors import RoundError


@dataclass
class SiteUpdate:
    site: str
    delta: dict[str, np.ndarray]
    records: int
    metrics: dict[str, float]


class WeightedFedAvg:
    """new = global + server_lr * sum_i w_i * delta_i / sum_i w_i (w_i = records or 1).

    Under ``ffa`` the deltas are of B only (A shared and frozen): this is the exact average of the
    sites' weight deltas B_i·A; under ``fedavg`` it averages A and B separately.
    """

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg

    def weight(self, update: SiteUpdate) -> float:
        return float(update.records) if self.cfg.weighting == "records" else 1.0

    def average(self, updates: list[SiteUpdate]) -> OrderedDict[str, np.ndarray]:
        if not updates:
            raise RoundError("no site updates to aggregate")
        weights = np.array([self.weight(u) for u in updates], dtype=np.float64)
        if weights.sum() <= 0:
            raise RoundError("site weights sum to zero (every site reported 0 records)")
        weights /= weights.sum()
        keys = list(updates[0].delta)
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for key in keys:
            acc = np.zeros(updates[0].delta[key].shape, dtype=np.float64)
            for w, u in zip(weights, updates, strict=True):
                acc += w * u.delta[key]
            out[key] = acc.astype(np.float32)
        return out

    def apply(
        self,
        global_state: dict[str, np.ndarray],
        updates: list[SiteUpdate],
        noise: Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]] | None = None,
        contributors: int | None = None,
    ) -> OrderedDict[str, np.ndarray]:
        """Step the global adapter by the (optionally noised) average of the updates.

        ``contributors``: how many sites the average is over (under secure aggregation the one
        update is already their average); the noise on a mean of n is sigma*C/n.
        """
        avg: dict[str, np.ndarray] = self.average(updates)
        if noise is not None:
            avg = noise(avg, contributors or len(updates))
        lr = self.cfg.server_lr
        return OrderedDict((k, (global_state[k] + lr * avg[k]).astype(np.float32)) for k in avg)


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
