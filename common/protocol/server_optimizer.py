"""Server-side optimizers: how the coordinator steps the global adapter by a round's average.

The round's average ``Δ = (sum_i w_i delta_i [+ noise]) / D`` (:mod:`common.protocol.aggregate`)
is treated as a pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization",
arXiv:2003.00295, Algorithm 2), with ``η = federation.server_lr``:

- ``fedavg``: ``x += η Δ`` (η = 1 is plain FedAvg);
- ``fedavgm``: ``v = β v + Δ``; ``x += η v`` (server momentum, Hsu et al. 2019);
- ``fedadam``: ``m = β1 m + (1 - β1) Δ``; ``v = β2 v + (1 - β2) Δ²``; ``x += η m / (√v + τ)``;
- ``fedyogi``: as fedadam but ``v = v - (1 - β2) Δ² sign(v - Δ²)``.

``federation.server_schedule`` scales ``η`` by the step count ``s`` (0 for round 1) over the
run's ``rounds``: 1 (``constant``), ``1 - s / rounds`` (``linear``) or
``(1 + cos(π s / rounds)) / 2`` (``cosine``); the count is checkpointed, so a resumed run continues
the same schedule.

No bias correction, as in the paper (Flower's own FedAdam rescales η by it; the paper's
``τ`` = 1e-3 default keeps early steps bounded instead). Every rule acts on the aggregate alone,
so it composes with secure aggregation (only the sum is known) and with both DP levels (a
function of the noised average is post-processing: no privacy cost). The state (``m``, ``v``)
is per exchanged tensor, float64, and goes into the checkpoint so that a resumed run is exact.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from common.core.config import FederationConfig
from common.core.errors import FedtuneError


class ServerOptimizer:
    """One configured rule and its state (``m``: momentum / first moment, ``v``: second)."""

    def __init__(self, cfg: FederationConfig) -> None:
        self.kind = cfg.server_optimizer
        self.base_lr = self.lr = cfg.server_lr
        self.schedule, self.rounds = cfg.server_schedule, cfg.rounds
        self.momentum = cfg.server_momentum
        self.beta1, self.beta2 = cfg.server_betas
        self.tau = cfg.server_tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.steps = 0

    @property
    def stateful(self) -> bool:
        return self.kind != "fedavg"

    def step(
        self, state: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray]
    ) -> OrderedDict[str, np.ndarray]:
        """The new global adapter (float32) from the old one and the round's average."""
        self.lr = self.lr_at(self.steps)
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for k, x in state.items():
            d = np.asarray(average[k], dtype=np.float64)
            out[k] = (np.asarray(x, dtype=np.float64) + self._direction(k, d)).astype(np.float32)
        self.steps += 1
        return out

    def lr_at(self, step: int) -> float:
        """The step size of the ``step``-th step (0-based) under ``server_schedule``."""
        done = min(step, self.rounds) / self.rounds
        if self.schedule == "linear":
            return self.base_lr * (1.0 - done)
        if self.schedule == "cosine":
            return self.base_lr * (1.0 + math.cos(math.pi * done)) / 2.0
        return self.base_lr

    def _direction(self, key: str, d: np.ndarray) -> np.ndarray:
        if self.kind == "fedavg":
            return self.lr * d
        m = self.m.get(key, np.zeros_like(d))
        if self.kind == "fedavgm":
            self.m[key] = m = self.momentum * m + d
            return self.lr * m
        v = self.v.get(key, np.zeros_like(d))
        self.m[key] = m = self.beta1 * m + (1.0 - self.beta1) * d
        sq = d * d
        if self.kind == "fedadam":
            v = self.beta2 * v + (1.0 - self.beta2) * sq
        else:  # fedyogi
            v = v - (1.0 - self.beta2) * sq * np.sign(v - sq)
        self.v[key] = v
        return self.lr * m / (np.sqrt(v) + self.tau)

    # -- checkpoint ------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """The state as named arrays (``m/<key>``, ``v/<key>``) for the checkpoint."""
        named = {f"m/{k}": a for k, a in self.m.items()}
        named.update({f"v/{k}": a for k, a in self.v.items()})
        return named

    def load_arrays(self, arrays: Mapping[str, np.ndarray], steps: int, keys: list[str]) -> None:
        """Restore :meth:`arrays`; a stateful rule's state must cover every exchanged key."""
        self.m = {n[2:]: np.asarray(a, np.float64) for n, a in arrays.items() if n[:2] == "m/"}
        self.v = {n[2:]: np.asarray(a, np.float64) for n, a in arrays.items() if n[:2] == "v/"}
        self.steps = steps
        if not (self.stateful and steps):
            return
        needed = [self.m] if self.kind == "fedavgm" else [self.m, self.v]
        missing = [k for k in keys if any(k not in state for state in needed)]
        if missing:
            raise FedtuneError(
                f"cannot resume: the checkpoint's `{self.kind}` state lacks `{missing[0]}`"
            )
