"""The distributed discrete Gaussian (DDG): institution-level noise under secure aggregation.

Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
Secure Aggregation", ICML 2021 (arXiv:2102.06387). Each site, after clipping its update to L2
norm C:

1. rotates it (a random sign flip and a normalised Walsh-Hadamard transform per block of
   ``block`` coordinates: an orthogonal map, so the norm stays C; it spreads the vector over
   the coordinates so that the modular sum rarely wraps). When the modulus holds the sum of n
   sites even with a whole update in one coordinate (32 bits and the sampler's largest noise
   usually do), no sum can wrap and the rotation is skipped (``block`` 1);
2. scales it by ``s`` (integer units per unit of the update);
3. rounds it to integers at random (floor, then +1 with the fractional part's probability),
   redrawing until the rounded vector's L2 norm is at most ``sensitivity`` (the *conditional*
   randomized rounding of the paper, Theorem 2 with beta = exp(-1/2));
4. adds N_Z(0, variance) per coordinate, sampled exactly (common/privacy/discrete_gaussian.py);
5. reduces mod 2^b: the secure sum is computed in Z_{2^b}.

This module is the mechanism's arithmetic: the parameters for a run (:func:`plan_ddg`, the same
on the coordinator and every site, from public values only), the bits they need, and the
privacy bound the accountant uses (:meth:`DdgPlan.round_rho`). The encoding itself lives with
the secure sum (common/secagg/ddg.py).

The bound (the paper's Theorem 1): the sum of ``n`` independent N_Z(0, sigma^2) on Z^D,
shifted by a vector of L2 norm at most Delta, is (1/2) eps^2-concentrated DP (rho-zCDP with
rho = eps^2 / 2) for

    eps = min( sqrt(Delta^2 / (n sigma^2) + tau D / 2),  Delta / (sqrt(n) sigma) + tau sqrt(D) ),
    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)).

zCDP composes by adding rho over rounds; rho-zCDP is (alpha, alpha rho)-RDP for every alpha > 1,
converted to (epsilon, delta) with Opacus' RDP conversion.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.core.config import Config
from common.core.errors import PrivacyError
from common.privacy.discrete_gaussian import DiscreteGaussian, SecureRandom

BETA = math.exp(-0.5)
"""The conditional rounding's failure probability per draw (the paper's choice)."""

MAX_VARIANCE = 1 << 26
"""Largest per-site variance (integer units) the exact int64 sampler takes (2 a t^2 < 2^54)."""

MAX_BLOCK = 1 << 16
"""Largest Hadamard block: a vector is padded to a multiple of it (< 1 block of overhead)."""

WRAP_STDS = 6.0
"""The modular sum must hold this many standard deviations of a coordinate of the noisy sum."""

MAX_ROUNDING_DRAWS = 200
"""Conditional rounding redraws at most this often (P[redraw] <= beta: ~1.6 draws on average)."""

MAX_INFLATION = 1.05
"""Rounding may raise a site's L2 sensitivity by at most 5 % over C * s; more needs more bits."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class DdgPlan:
    """The mechanism's parameters for one run: public, identical at every party."""

    dim: int  # d, the update's length
    block: int  # Hadamard block (a power of 2)
    scale: float  # s, integer units per unit of the update
    variance: int  # sigma^2 of each site's N_Z noise, integer units
    sensitivity: float  # Delta: L2 bound of one site's rounded vector, integer units
    min_sites: int  # m, the fewest noise shares any unmasked sum holds
    modulus_bits: int  # b
    bits_needed: int  # the fewest b with which these d, n, C and noise work

    @property
    def padded(self) -> int:
        """D, the length of the rotated (and masked) vector."""
        return -(-self.dim // self.block) * self.block

    def round_rho(self, shares: int | None = None, replace_one: bool = False) -> float:
        """rho (zCDP) of one round's sum holding ``shares`` noise shares (default m).

        ``replace_one``: one institution's update replaced by another (the sum moves by up to
        2 Delta) instead of added or removed (up to Delta)."""
        n = self.min_sites if shares is None else shares
        delta = (2.0 if replace_one else 1.0) * self.sensitivity
        return ddg_rho(delta, self.variance, n, self.padded)

    def digest(self) -> str:
        """sha256 of the plan: bound into the secure-aggregation parameters every site signs."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DdgPlan:
        """Inverse of :meth:`to_dict`; a malformed plan raises PrivacyError."""
        try:
            plan = cls(
                int(data["dim"]), int(data["block"]), float(data["scale"]),
                int(data["variance"]), float(data["sensitivity"]), int(data["min_sites"]),
                int(data["modulus_bits"]), int(data["bits_needed"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            raise PrivacyError(f"malformed distributed-noise plan: {err!r}") from err
        return plan

    def refusal(self, cfg: Config, dim: int, digest: str) -> str | None:
        """Why a site must not encode under this plan (None: it may). The site checks what its
        privacy rests on, from its own values, whatever the coordinator computed: its update's
        length; the noise (any m shares carry at least z C in integer units: m variance >=
        (z C s)^2); the rounding bound (at most :data:`MAX_INFLATION` C s and at least the
        clipped norm C s, so rounding can meet it); the sampler's range; that the plan is the
        one the round's parameters, signed by every site, name."""
        inst = cfg.privacy.institution
        z, c, m = inst.noise_multiplier, inst.clip_norm, cfg.federation.min_sites
        cs = c * self.scale
        checks = [
            (self.dim == dim, f"it is for {self.dim} coordinates, this update has {dim}"),
            (self.min_sites == m, f"its min_sites {self.min_sites} is not `federation.min_sites`"),
            (self.modulus_bits == cfg.secagg.modulus_bits, "its b is not `secagg.modulus_bits`"),
            (self.block >= 1 and self.block & (self.block - 1) == 0 and self.block <= MAX_BLOCK,
             f"its block {self.block} is not a power of 2 up to {MAX_BLOCK}"),
            (math.isfinite(self.scale) and self.scale > 0, "its scale is not a positive number"),
            (0 < self.variance <= MAX_VARIANCE, f"its variance {self.variance} is out of range"),
            (m * self.variance >= (z * cs) ** 2 * (1 - 1e-9),
             f"its noise is below the run's noise multiplier {z}"),
            (cs <= self.sensitivity <= MAX_INFLATION * cs * (1 + 1e-9),
             "its rounding bound is not between C s and (1 + 5%) C s"),
            (self.digest() == digest, "it is not the plan the round's signed parameters name"),
        ]  # fmt: skip
        problems = [why for ok, why in checks if not ok]
        return "; ".join(problems) if problems else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim, "block": self.block, "scale": self.scale, "variance": self.variance,
            "sensitivity": self.sensitivity, "min_sites": self.min_sites,
            "modulus_bits": self.modulus_bits, "bits_needed": self.bits_needed,
        }  # fmt: skip


def ddg_rho(sensitivity: float, variance: int, shares: int, dim: int) -> float:
    """rho of the sum of ``shares`` N_Z(0, variance) on Z^dim shifted by L2 <= ``sensitivity``
    (Kairouz et al. 2021, Theorem 1)."""
    if shares < 1 or variance <= 0 or dim < 1:
        raise PrivacyError(f"DDG bound needs shares >= 1, variance > 0, dim >= 1 (got "
                           f"{shares}, {variance}, {dim})")  # fmt: skip
    s2 = float(variance)
    tau = 10.0 * sum(math.exp(-2 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, shares))
    eps = min(
        math.sqrt(sensitivity**2 / (shares * s2) + tau * dim / 2),
        sensitivity / math.sqrt(shares * s2) + tau * math.sqrt(dim),
    )
    return eps * eps / 2


def rounded_norm_bound(norm: float, dim: int) -> float:
    """Delta: the L2 norm the conditionally rounded vector may have, for an input of L2 norm at
    most ``norm`` (integer units) in ``dim`` coordinates (Kairouz et al. 2021, Theorem 2)."""
    root = math.sqrt(2 * math.log(1 / BETA))
    conditioned = norm**2 + dim / 4 + root * (norm + math.sqrt(dim) / 2)
    return min(math.sqrt(conditioned), norm + math.sqrt(dim))


def plan_ddg(
    *,
    noise_multiplier: float,
    clip_norm: float,
    min_sites: int,
    max_sites: int,
    dim: int,
    modulus_bits: int,
) -> DdgPlan:
    """The parameters for a run: the largest scale that the sampler takes and that keeps the
    sum of ``max_sites`` inside Z_{2^b} with :data:`WRAP_STDS` to spare; each site's variance
    is (z C s)^2 / m rounded up, so any m shares carry at least the planned noise z C.

    Raises PrivacyError naming `secagg.modulus_bits` when b is too small for rounding to stay
    within :data:`MAX_INFLATION` of the sensitivity C s (with the bits that would do)."""
    if noise_multiplier <= 0 or clip_norm <= 0 or min_sites < 1 or dim < 1:
        raise PrivacyError(
            "the distributed discrete Gaussian needs `privacy.institution.noise_multiplier` > 0, "
            "`clip_norm` > 0, `federation.min_sites` >= 1 and a non-empty update"
        )
    args = (noise_multiplier, clip_norm, min_sites, max(max_sites, min_sites), dim)
    fitted = _fit(*args, modulus_bits)
    if fitted is None:
        need = next((b for b in range(modulus_bits + 1, 65) if _fit(*args, b)), None)
        raise PrivacyError(
            f"`secagg.modulus_bits` = {modulus_bits} is too few for the distributed discrete "
            f"Gaussian with {dim} coordinates, up to {max_sites} sites and noise multiplier "
            f"{noise_multiplier}: rounding would raise each site's sensitivity by more than "
            f"{MAX_INFLATION - 1:.0%}; "
            + (f"use at least {need}" if need else "no modulus up to 64 bits suffices")
        )
    needed = next(b for b in range(8, modulus_bits + 1) if _fit(*args, b))
    block, scale, variance, sensitivity = fitted
    return DdgPlan(dim, block, scale, variance, sensitivity, min_sites, modulus_bits, needed)


def plan_for(cfg: Config, dim: int, max_sites: int) -> DdgPlan:
    """The run's plan from its config (institution noise and clip, min sites, modulus)."""
    inst = cfg.privacy.institution
    return plan_ddg(
        noise_multiplier=inst.noise_multiplier, clip_norm=inst.clip_norm,
        min_sites=cfg.federation.min_sites, max_sites=max_sites, dim=dim,
        modulus_bits=cfg.secagg.modulus_bits,
    )  # fmt: skip


class DdgAccountant:
    """Institution-level accounting of the DDG: rho adds up over rounds (each charged in full).

    Two figures: for the published model (add/remove one institution; the coordinator tops the
    sum up to the expected number of shares, at least m), and against the coordinator itself
    (it sees the sum of at least m contributors and knows who took part: one institution's
    update replaced by another)."""

    def __init__(self, plan: DdgPlan, delta: float) -> None:
        self.plan, self.delta, self.rounds = plan, delta, 0

    def step_round(self) -> float:
        self.rounds += 1
        return self.epsilon()

    def epsilon(self) -> float:
        return epsilon_from_rho(self.rounds * self.plan.round_rho(), self.delta)

    def epsilon_vs_coordinator(self) -> float:
        return epsilon_from_rho(self.rounds * self.plan.round_rho(replace_one=True), self.delta)

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "plan": self.plan.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if DdgPlan.from_dict(state["plan"]) != self.plan:
            raise PrivacyError("the checkpoint's distributed-noise plan differs from this run's")
        self.rounds = int(state["rounds"])


def _fit(
    z: float, c: float, m: int, n: int, dim: int, bits: int
) -> tuple[int, float, int, float] | None:
    """(block, scale, variance, sensitivity) for ``bits``, or None if they do not fit."""
    block = min(_next_pow2(dim), MAX_BLOCK)
    padded = -(-dim // block) * block
    # Largest s with no wrap: n * ((c s)^2 / block + 1/4 + (z c s)^2 / m) <= (2^(b-1) / k)^2.
    room = (2.0 ** (bits - 1) / WRAP_STDS) ** 2 - n / 4
    if room <= 0:
        return None
    s_wrap = math.sqrt(room / (n * c * c * (1 / block + z * z / m)))
    # Largest s the sampler allows: m * variance = (z c s)^2 with variance <= MAX_VARIANCE.
    scale = min(math.sqrt(MAX_VARIANCE * m) / (z * c), s_wrap)
    variance = min(MAX_VARIANCE, max(1, math.ceil((z * c * scale) ** 2 / m)))
    if variance == MAX_VARIANCE:  # the noise sets the scale: exactly z c s = sqrt(m variance)
        scale = math.sqrt(variance * m) / (z * c)
    if _fits_unrotated(c * scale, variance, n, bits):
        block, padded = 1, dim  # no rotation needed: no sum of n can wrap, whatever the update
    sensitivity = rounded_norm_bound(c * scale, padded)
    if sensitivity > MAX_INFLATION * c * scale:
        return None
    return block, scale, variance, sensitivity


def _fits_unrotated(cs: float, variance: int, n: int, bits: int) -> bool:
    """Whether n unrotated vectors can never wrap the modular sum: each coordinate of a
    rounded vector is at most C s + 1 in size (its whole norm in one coordinate), and the sum
    of n noise shares stays within :data:`WRAP_STDS` of its std. The rotation (which only
    serves against wraps) is then skipped: no Hadamard work, no padding."""
    return n * (cs + 1) + WRAP_STDS * math.sqrt(n * variance) < 2.0 ** (bits - 1)


def epsilon_from_rho(rho: float, delta: float) -> float:
    """(epsilon, delta) of rho-zCDP, through RDP (alpha, alpha rho) at Opacus' orders and
    Opacus' conversion (the same as the Gaussian accountant's)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if rho <= 0:
        return 0.0
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    eps, _ = get_privacy_spent(orders=orders, rdp=[a * rho for a in orders], delta=delta)
    return float(eps)


# -- the encoding: rotate, scale, round, noise, reduce mod 2^b (and back) ------------------------


def rotation_seed(session: str, round_idx: int) -> bytes:
    """Public randomness of round ``round_idx`` in run ``session``: the sign flips. Nothing
    private rests on it (privacy holds for any rotation: it is orthogonal), only the chance of
    a wrap does."""
    return hashlib.sha256(f"fedtune-ddg-rotation\0{session}\0{round_idx}".encode()).digest()


class DdgEncoding:
    """One round's encoding under ``plan`` (the same object at the sites and the coordinator)."""

    def __init__(self, plan: DdgPlan, seed: bytes) -> None:
        self.plan = plan
        self.signs = np.ones(0)
        if plan.block > 1:
            words = SecureRandom(key=seed).words(plan.padded)  # a PRG keyed by a public seed
            self.signs = np.where(words & np.uint64(1), -1.0, 1.0)
        self.dtype: type[np.unsignedinteger] = np.uint32 if plan.modulus_bits <= 32 else np.uint64

    def rotate(self, vec: NDArray[np.floating]) -> NDArray[np.float64]:
        """Pad to D, flip signs, normalised Walsh-Hadamard per block (orthogonal)."""
        out = np.zeros(self.plan.padded, dtype=np.float64)
        out[: vec.shape[0]] = vec
        if self.plan.block == 1:  # no rotation (see the module docstring)
            return out
        out *= self.signs
        return _hadamard(out, self.plan.block)

    def unrotate(self, vec: NDArray[np.float64]) -> NDArray[np.float64]:
        """The inverse of :meth:`rotate` (the normalised transform is its own inverse)."""
        if self.plan.block == 1:
            return vec[: self.plan.dim]
        return (_hadamard(vec.copy(), self.plan.block) * self.signs)[: self.plan.dim]

    def encode(
        self, update: NDArray[np.floating], rng: SecureRandom | None = None
    ) -> NDArray[np.unsignedinteger]:
        """A site's (d,) update, already clipped to L2 <= C, to its noisy (D,) vector mod 2^b."""
        plan = self.plan
        if update.shape != (plan.dim,):
            raise PrivacyError(f"the update has shape {update.shape}, the plan ({plan.dim},)")
        rng = rng if rng is not None else SecureRandom()
        scaled = self.rotate(update) * plan.scale
        floor = np.floor(scaled)
        frac = scaled - floor
        for _ in range(MAX_ROUNDING_DRAWS):  # P[redraw] <= beta: ~1.6 draws on average
            rounded = floor + (rng.uniform(plan.padded) < frac)
            if float(np.linalg.norm(rounded)) <= plan.sensitivity:
                break
        else:
            raise PrivacyError(
                "conditional rounding failed: the update's norm exceeds the clip bound "
                "(clip it to `privacy.institution.clip_norm` first)"
            )
        noisy = rounded.astype(np.int64) + DiscreteGaussian(plan.variance, rng).sample(plan.padded)
        return _wrap(noisy, plan.modulus_bits, self.dtype)

    def noise(self, shares: int, rng: SecureRandom | None = None) -> NDArray[np.int64]:
        """The sum of ``shares`` sites' noise (the coordinator's top-up for missing sites)."""
        rng = rng if rng is not None else SecureRandom()
        total = np.zeros(self.plan.padded, dtype=np.int64)
        sampler = DiscreteGaussian(self.plan.variance, rng)
        for _ in range(shares):
            total += sampler.sample(self.plan.padded)
        return total

    def decode_sum(
        self, total: NDArray[np.unsignedinteger], top_up: int = 0
    ) -> NDArray[np.float64]:
        """The unmasked sum mod 2^b (plus ``top_up`` shares of noise, added here in integers)
        to the (d,) float sum of the sites' updates and noise."""
        bits = self.plan.modulus_bits
        signed = _centre(total, bits)
        if top_up:  # the sum stays in Z_{2^b}, as if the missing sites had uploaded their noise
            signed = _centre(_wrap(signed + self.noise(top_up), bits, np.uint64), bits)
        return self.unrotate(signed.astype(np.float64) / self.plan.scale)


def _centre(values: NDArray[np.unsignedinteger], bits: int) -> NDArray[np.int64]:
    """Z_{2^b} to the signed integers in [-2^(b-1), 2^(b-1))."""
    if bits == 64:
        return values.astype(np.uint64).view(np.int64)
    signed = values.astype(np.int64)
    return np.where(signed >= 1 << (bits - 1), signed - (1 << bits), signed)


def _wrap(values: NDArray[np.int64], bits: int, dtype: type[np.unsignedinteger]) -> NDArray[Any]:
    """Integers to Z_{2^b} as unsigned ``dtype`` (two's complement for b = 64)."""
    if bits == 64:
        return values.view(np.uint64).astype(dtype)
    return np.mod(values, np.int64(1) << np.int64(bits)).astype(dtype)


def _hadamard(vec: NDArray[np.float64], block: int) -> NDArray[np.float64]:
    """Normalised fast Walsh-Hadamard transform of each ``block`` of ``vec`` (in place)."""
    rows = vec.reshape(-1, block)
    h = 1
    while h < block:
        pairs = rows.reshape(rows.shape[0], -1, 2, h)
        a, b = pairs[:, :, 0, :].copy(), pairs[:, :, 1, :]
        pairs[:, :, 0, :] += b
        pairs[:, :, 1, :] = a - b
        h *= 2
    rows /= math.sqrt(block)
    return vec
