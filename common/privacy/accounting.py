"""Privacy math for fedtune's two DP levels: pure functions and small stateful accountants.

Record level (each site's records): DP-SGD (Abadi et al. 2016, arXiv:1607.00133), a Poisson-
subsampled Gaussian mechanism per optimizer step. Each site keeps one :class:`GaussianAccountant`
for the whole run (a new Opacus ``PrivacyEngine`` per round would restart epsilon at 0); its
:meth:`~GaussianAccountant.state_dict` is JSON-able so it lives in Flower's ``context.state`` and on
disk and survives process restarts.

Institution level (each site's whole contribution): DP-FedAvg (McMahan et al. 2018,
arXiv:1710.06963). Each site clips its update to norm C; Gaussian noise of std ``sigma * C`` goes
on the sum, either added by the server (no secure aggregation) or as distributed shares, each site
adding std ``sigma * C / sqrt(min_sites)`` so that any ``k >= min_sites`` survivors carry at least
the planned noise (Kairouz et al. 2021, "The distributed discrete Gaussian", arXiv:2102.06387).
The coordinator divides the noised sum by a fixed public number (common/protocol/aggregate.py),
so adjacency is add/remove of one institution with sensitivity C. Every round is accounted as a
full (q = 1) Gaussian mechanism for every institution: the coordinator chooses which sites take
part and sees who did, and the run folder records the participants, so neither the coordinator
nor a holder of the published model is denied the knowledge that amplification by sampling
(McMahan et al. 2018) would need to be hidden. A site that sat out a round is still charged.

Nothing here touches torch models; vectors are numpy arrays.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.core.config import Config, InstitutionDPConfig
from common.core.errors import PrivacyError
from common.privacy.discrete_gaussian import SecureRandom

logger = logging.getLogger(__name__)

Mechanism = Literal["rdp", "prv"]
DELTA_CAP = 1e-5
"""Default delta is min(DELTA_CAP, 1/(10 n)): well below 1/n, the level at which a mechanism may
publish one whole record outright (Dwork & Roth 2014, sec. 2.3)."""


def default_delta(num_records: int) -> float:
    """Default record-level delta for a site holding ``num_records`` records."""
    if num_records <= 0:
        raise PrivacyError(f"`num_records` must be positive (got {num_records})")
    return min(DELTA_CAP, 1.0 / (10 * num_records))


def check_record_delta(delta: float, num_records: int) -> None:
    """Refuse a record-level delta at or above 1/records: (epsilon, 1/n)-DP allows publishing one
    whole record outright (Dwork & Roth 2014, sec. 2.3). The message names no count (a site
    sends it to the coordinator)."""
    if delta * num_records >= 1:
        raise PrivacyError(
            f"`privacy.record.delta` ({delta:g}) is not below 1/records at this site: a delta "
            "that large allows publishing a whole record outright"
        )


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise PrivacyError(f"`delta` must be in (0, 1) (got {delta})")


def _check_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise PrivacyError(f"`noise_multiplier` must be >= 0 (got {noise_multiplier})")
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"`sample_rate` must be in (0, 1] (got {sample_rate})")
    if steps < 0:
        raise PrivacyError(f"`steps` must be >= 0 (got {steps})")


class GaussianAccountant:
    """Epsilon of a sequence of Poisson-subsampled Gaussian steps, persisted across rounds.

    Wraps Opacus' RDP (Mironov 2017) or PRV (Gopi et al. 2021) accountant; the state is the
    Opacus history ``[(noise_multiplier, sample_rate, steps), ...]``.
    """

    def __init__(self, mechanism: Mechanism = "rdp") -> None:
        if mechanism not in ("rdp", "prv"):
            raise PrivacyError(f"`accountant` must be `rdp` or `prv` (got {mechanism!r})")
        self.mechanism: Mechanism = mechanism
        self.history: list[tuple[float, float, int]] = []

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps of one mechanism (merged with the last entry when equal)."""
        _check_step(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history.pop()
            self.history.append((sigma, q, n + steps))
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``; ``inf`` once any step had no noise."""
        return _epsilon(self.mechanism, self.history, delta)

    def projected_epsilon(
        self, *, steps: int, sample_rate: float, noise_multiplier: float, delta: float
    ) -> float:
        """Epsilon after ``steps`` more steps of the given mechanism (state unchanged)."""
        _check_step(noise_multiplier, sample_rate, steps)
        future = GaussianAccountant(self.mechanism)
        future.history = list(self.history)
        future.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return future.epsilon(delta)

    def would_exceed(
        self,
        budget: float,
        *,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        delta: float,
    ) -> bool:
        """True when ``steps`` more steps would take epsilon past ``budget``: decline the round."""
        projected = self.projected_epsilon(
            steps=steps, sample_rate=sample_rate, noise_multiplier=noise_multiplier, delta=delta
        )
        return projected > budget

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (Opacus' ``IAccountant.state_dict`` layout)."""
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mechanism") != self.mechanism:
            raise PrivacyError(
                f"accountant state is for `{state.get('mechanism')}`, not `{self.mechanism}`"
            )
        history = [(float(s), float(q), int(n)) for s, q, n in state.get("history", [])]
        for sigma, q, n in history:
            _check_step(sigma, q, n)
        self.history = history

    def to_bytes(self) -> bytes:
        return json.dumps(self.state_dict()).encode()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> GaussianAccountant:
        acc = cls(state.get("mechanism", "rdp"))
        acc.load_state_dict(state)
        return acc

    @classmethod
    def from_bytes(cls, data: bytes) -> GaussianAccountant:
        return cls.from_state_dict(json.loads(data.decode()))


def _epsilon(mechanism: Mechanism, history: list[tuple[float, float, int]], delta: float) -> float:
    _check_delta(delta)
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    opacus_acc = create_accountant(mechanism=mechanism)
    opacus_acc.history = list(history)
    return float(opacus_acc.get_epsilon(delta=delta))


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: Mechanism = "rdp",
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) that keeps ``steps`` steps within budget."""
    _check_delta(delta)
    _check_step(0.0, sample_rate, steps)
    return _calibrated(target_epsilon, delta, sample_rate, steps, mechanism)


@functools.lru_cache(maxsize=256)
def _calibrated(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: Mechanism
) -> float:
    # A pure function of its arguments, and a bisection of about 16 accountings (2.4 s for a
    # bank-complaints site): a site plans the same mechanism every round, so it is remembered.
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=mechanism,
            )
        )
    except ValueError as err:
        raise PrivacyError(f"`target_epsilon` {target_epsilon} is unreachable: {err}") from None


# ---------------------------------------------------------------- record level, per site


@dataclass(frozen=True)
class RecordPlan:
    """What a site's DP-SGD does per step and spends over the whole planned run."""

    num_records: int
    sample_rate: float  # expected logical batch / records (Poisson sampling)
    expected_batch_size: int
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    epsilon: float  # if the site takes part in every round
    # What each step's noisy sum is divided by: `train.batch_size` under
    # `privacy.record.sample_rate` (a public constant), else the expected batch (None).
    normalizer: int | None = None

    @property
    def step_divisor(self) -> int:
        return self.normalizer if self.normalizer is not None else self.expected_batch_size


def record_plan(cfg: Config, num_records: int) -> RecordPlan:
    """The record-level mechanism a site with ``num_records`` records runs under ``cfg``."""
    rec, train = cfg.privacy.record, cfg.train
    # `train.batch_size` is the records per optimizer step with or without DP; `grad_accum`
    # only splits it into micro-batches (the expected Poisson batch here).
    # With `privacy.record.sample_rate` every site samples at that rate and divides each noisy
    # sum by `train.batch_size`: post-processing by a public constant, so the sum of the sites'
    # updates is the noisy sum over all their records (records weighting, no count disclosed).
    batch, normalizer = train.batch_size, None
    steps = cfg.federation.rounds * train.local_steps
    if rec.sample_rate is not None:
        q, normalizer = rec.sample_rate, batch
        batch = max(1, round(q * num_records))
    elif batch >= num_records:
        raise PrivacyError(
            f"`train.batch_size` ({batch}) is not below the site's {num_records} records: "
            "DP-SGD needs a sample rate below 1 (or set `privacy.record.sample_rate`)"
        )
    else:
        q = batch / num_records
    delta = rec.delta if rec.delta is not None else default_delta(num_records)
    check_record_delta(delta, num_records)
    sigma = rec.noise_multiplier
    if sigma is None:
        target = rec.target_epsilon if rec.target_epsilon is not None else math.inf
        sigma = calibrate_noise(
            target_epsilon=target, delta=delta, sample_rate=q, steps=steps,
            mechanism=rec.accountant,
        )  # fmt: skip
    acc = GaussianAccountant(rec.accountant)
    eps = acc.projected_epsilon(steps=steps, sample_rate=q, noise_multiplier=sigma, delta=delta)
    return RecordPlan(
        num_records, q, batch, train.local_steps, cfg.federation.rounds, sigma,
        rec.max_grad_norm, delta, eps, normalizer,
    )  # fmt: skip


def decline_reason(
    accountant: GaussianAccountant, plan: RecordPlan, budget_epsilon: float | None
) -> str | None:
    """Why a site must decline its next round (budget would be exceeded), else None."""
    if budget_epsilon is None:
        return None
    after = accountant.projected_epsilon(
        steps=plan.steps_per_round, sample_rate=plan.sample_rate,
        noise_multiplier=plan.noise_multiplier, delta=plan.delta,
    )  # fmt: skip
    if after <= budget_epsilon:
        return None
    spent = accountant.epsilon(plan.delta)
    return (
        f"declining to train: record-level epsilon would reach {after:.3f} > budget "
        f"{budget_epsilon:.3f} (spent so far {spent:.3f}, delta {plan.delta:.2e})"
    )


# ---------------------------------------------------------------- institution level


def clip_update(vec: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``vec`` to L2 norm at most ``clip_norm``; returns (clipped, original norm)."""
    if clip_norm <= 0:
        raise PrivacyError(f"`clip_norm` must be positive (got {clip_norm})")
    flat = np.asarray(vec, dtype=np.float64)
    norm = float(np.linalg.norm(flat))
    if not math.isfinite(norm):
        raise PrivacyError("update has a non-finite norm; refusing to clip it")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = (flat * scale).astype(np.asarray(vec).dtype, copy=False)
    return clipped, norm


def add_server_noise(
    total: np.ndarray,
    *,
    noise_multiplier: float,
    clip_norm: float,
    rng: SecureRandom | None = None,
) -> np.ndarray:
    """Server noise: the coordinator adds std ``sigma*C`` to the clipped sum, from a CSPRNG
    (a floating-point Gaussian: Box-Muller on 53-bit uniforms; the distributed path, noise at
    the sites, is the exact discrete Gaussian instead)."""
    _check_step(noise_multiplier, 1.0, 0)
    gen = rng if rng is not None else SecureRandom()
    noise = gen.normal(int(np.size(total))).reshape(np.shape(total)) * (
        noise_multiplier * clip_norm
    )
    return (total + noise).astype(np.asarray(total).dtype)


INSTITUTION_SAMPLE_RATE = 1.0
"""q of the institution-level accountant: no amplification by a sample the coordinator draws."""


class InstitutionAccountant:
    """Server-side epsilon of each institution's whole dataset, one full step per round.

    Accounts the planned ``noise_multiplier`` at q = 1 (see the module docstring): with
    distributed noise and more than ``min_sites`` survivors the sum carries more noise than
    planned, so this is an upper bound.
    """

    def __init__(self, cfg: InstitutionDPConfig) -> None:
        sample_rate = INSTITUTION_SAMPLE_RATE
        _check_step(cfg.noise_multiplier, sample_rate, 0)
        self.noise_multiplier, self.sample_rate, self.delta = (
            cfg.noise_multiplier, sample_rate, cfg.delta,
        )  # fmt: skip
        self.accountant = GaussianAccountant(cfg.accountant)

    def step_round(self) -> float:
        """Account one aggregated round; returns epsilon so far."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.epsilon()

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def epsilon_with(self, mechanism: Mechanism) -> float:
        """The same history accounted with another accountant (e.g. PRV beside RDP)."""
        return _epsilon(mechanism, self.accountant.history, self.delta)

    def state_dict(self) -> dict[str, Any]:
        return self.accountant.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accountant.load_state_dict(state)


def institution_epsilon_planned(cfg: Config, num_sites: int, dim: int | None = None) -> float:
    """Institution-level epsilon after ``federation.rounds`` rounds. With distributed noise
    (the discrete Gaussian) the bound depends on ``dim``, the exchanged update's length."""
    inst = cfg.privacy.institution
    if cfg.site_weighting != "uniform":
        # A weight w_i scales a site's contribution to the sum, and so its sensitivity, to w_i*C.
        raise PrivacyError(
            "institution-level DP needs `federation.weighting` = `uniform` (got "
            f"`{cfg.site_weighting}`): weighted sums break the clip bound "
            "`privacy.institution.clip_norm`"
        )
    if cfg.institution_noise_at == "sites":
        from common.privacy.ddg import epsilon_from_rho, plan_for

        if dim is None:
            raise PrivacyError("planning the distributed discrete Gaussian needs the update size")
        ddg = plan_for(cfg, dim, cfg.federation.sites_per_round or num_sites)
        return epsilon_from_rho(cfg.federation.rounds * ddg.round_rho(), inst.delta)
    acc = GaussianAccountant(inst.accountant)
    return acc.projected_epsilon(
        steps=cfg.federation.rounds, sample_rate=INSTITUTION_SAMPLE_RATE,
        noise_multiplier=inst.noise_multiplier, delta=inst.delta,
    )  # fmt: skip
