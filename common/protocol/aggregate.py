"""The aggregation rule both round paths share (docs/architecture.md, "One round").

Plain FedAvg and secure aggregation differ only in how the weighted sum of the sites' updates is
obtained: the coordinator adds the plain updates itself, or unmasks the sum of masked ones. What
follows is written once, here:

- the public weights ``w_i`` (records / mean records of the round's sampled sites, from preflight;
  1 with uniform weighting), which plain sums apply at the coordinator and secure sites apply
  before masking;
- the min-sites rule (a round with fewer contributors than ``federation.min_sites`` fails);
- the step: ``new = global + server_lr * (sum_i w_i delta_i [+ noise]) / D`` (``fedavg``; the
  server optimizers of :mod:`common.protocol.server_optimizer` step by the same average), with the
  institution-level noise the coordinator adds (all of it with server noise; with distributed
  noise, the shares of sites that did not contribute, so the noise never shows how many did);
- the denominator ``D``: the contributors' ``sum_i w_i`` without institution-level DP; with it,
  a fixed public number, the sites expected per round (DP-FedAvg, McMahan et al. 2018,
  arXiv:1710.06963). Dividing by the realised number of contributors would make the published
  update's scale (its noise std sigma*C/n) show how many, and so whether a given institution,
  took part: with D fixed, adding or removing one institution moves the published update by at
  most C / D and its noise is sigma*C / D either way (add/remove adjacency).

Under ``ffa`` the deltas are of B only (A shared and frozen): the average is the exact average of
the sites' weight deltas B_i·A; under ``fedavg`` it averages A and B separately.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.core.adapters import unflatten
from common.core.config import Config
from common.core.errors import RoundError
from common.protocol.server_optimizer import ServerOptimizer

# Noise the coordinator adds to a round's sum: (flat float64 sum, contributors) -> noised sum.
SumNoise = Callable[[np.ndarray, int], np.ndarray]


@dataclass
class SiteReport:
    """What one contributor reports besides its update (the update itself is only ever summed)."""

    site: str
    records: int | None  # None: not disclosed (any DP level on)
    metrics: dict[str, float]


@dataclass
class RoundSum:
    """What a round's sum source returns: the weighted sum and who is in it, never an update."""

    total: np.ndarray  # (d,) float64: sum_i w_i * delta_i over the contributors, flattened
    weight: float  # sum_i w_i over the same contributors
    reports: list[SiteReport]  # the contributors
    failed: dict[str, str] = field(default_factory=dict)  # site -> why (not in the sum)
    declined: dict[str, str] = field(default_factory=dict)  # site -> why (privacy budget)
    bytes_up: int = 0
    bytes_down: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # path-specific metrics row keys


def site_weights(cfg: Config, records: Mapping[int, int | None]) -> dict[int, float]:
    """Public weights of the sampled nodes: mean 1 with record weighting, else all 1."""
    if cfg.site_weighting != "records":
        return {n: 1.0 for n in records}
    counts = {n: c for n, c in records.items() if c is not None}
    if len(counts) != len(records):
        missing = sorted(str(n) for n in set(records) - set(counts))
        raise RoundError(
            f"`federation.weighting` is `records` but node(s) {', '.join(missing)} sent no "
            "record count"
        )
    mean = sum(counts.values()) / max(1, len(counts))
    if mean <= 0:
        raise RoundError("site weights sum to zero (every site reported 0 records)")
    return {n: counts[n] / mean for n in counts}


def require_min_sites(
    cfg: Config, round_idx: int, contributors: int, problems: Mapping[str, str]
) -> None:
    """The min-sites rule: fewer contributors than `federation.min_sites` fails the round."""
    needed = cfg.federation.min_sites
    if contributors >= needed:
        return
    detail = "; ".join(f"{s}: {e}" for s, e in problems.items()) or "none failed"
    raise RoundError(
        f"round {round_idx}: {contributors} site(s) succeeded, "
        f"`federation.min_sites` is {needed} ({detail})"
    )


def denominator(cfg: Config, summed: RoundSum, expected_sites: int) -> float:
    """D of the step: fixed (``expected_sites``) under institution-level DP, else sum_i w_i."""
    if cfg.privacy.institution.enabled:
        if expected_sites <= 0:
            raise RoundError(f"the fixed denominator must be positive (got {expected_sites})")
        return float(expected_sites)
    if summed.weight <= 0:
        raise RoundError("no site updates to aggregate")
    return summed.weight


def expected_sites(cfg: Config, num_sites: int) -> int:
    """Sites sampled per round: public, fixed before the run (the DP-FedAvg denominator)."""
    return cfg.federation.sites_per_round or num_sites


def apply_sum(
    cfg: Config,
    global_state: Mapping[str, np.ndarray],
    summed: RoundSum,
    expected: int,
    noise: SumNoise | None = None,
    optimizer: ServerOptimizer | None = None,
) -> OrderedDict[str, np.ndarray]:
    """Step the global adapter by the (optionally noised) sum over the round's denominator.

    ``expected``: the sites expected per round (:func:`expected_sites`). ``optimizer``: the
    run's server optimizer, which keeps its state across rounds (may be omitted only for the
    stateless ``fedavg``).
    """
    if not summed.reports:
        raise RoundError("no site updates to aggregate")
    total = summed.total.astype(np.float64)
    if noise is not None:
        total = noise(total, len(summed.reports))
    scale = denominator(cfg, summed, expected)
    average = unflatten((total / scale).astype(np.float32), global_state)
    if optimizer is None:
        optimizer = ServerOptimizer(cfg.federation)
        if optimizer.stateful:  # a fresh one every round would silently drop its state
            raise RoundError(
                f"`federation.server_optimizer` = `{cfg.federation.server_optimizer}` keeps state "
                "across rounds: pass the run's ServerOptimizer"
            )
    return optimizer.step(global_state, average)
