"""Which sites take part in a round: seeded sampling of the connected sites."""

from __future__ import annotations

import numpy as np

from common.core.config import FederationConfig
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
