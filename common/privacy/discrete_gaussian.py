"""Random draws that protect privacy: a CSPRNG, and (below) the exact discrete Gaussian.

:class:`SecureRandom` is the one generator every privacy-relevant draw uses (DP-SGD noise and
Poisson sampling in client/dp.py, the discrete Gaussian below): the AES-256-CTR keystream under a
fresh 256-bit key from ``os.urandom`` (the construction of NIST SP 800-90A's CTR_DRBG, without
reseeding: one generator serves one round at one site). A generator seeded from a public or
guessable value, or a Mersenne Twister whose state its outputs reveal, lets whoever knows it
subtract the noise; numpy's and torch's default generators are both. ``cryptography`` provides AES.
"""

from __future__ import annotations

import logging
import math
import os
from fractions import Fraction

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray

from common.core.errors import PrivacyError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
_TWO_PI = 2.0 * math.pi


class SecureRandom:
    """A CSPRNG: AES-256-CTR keystream, key from ``os.urandom`` (``key`` is for tests only)."""

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(KEY_BYTES) if key is None else key
        if len(key) != KEY_BYTES:
            raise PrivacyError(f"a SecureRandom key must be {KEY_BYTES} bytes, got {len(key)}")
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def bytes(self, n: int) -> bytes:
        """``n`` pseudorandom bytes (the keystream continues across calls)."""
        out = bytearray(n + 15)  # update_into needs block_size - 1 spare bytes
        self._stream.update_into(bytes(n), out)
        return bytes(out[:n])

    def words(self, n: int) -> NDArray[np.uint64]:
        """(n,) uniform 64-bit words."""
        return np.frombuffer(self.bytes(8 * n), dtype=np.uint64).copy()

    def uniform(self, n: int) -> NDArray[np.float64]:
        """(n,) uniform floats in [0, 1): 53 random bits each, the whole float64 mantissa."""
        return (self.words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def normal(self, n: int) -> NDArray[np.float64]:
        """(n,) standard normal floats (Box-Muller on two 53-bit uniforms per pair)."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs).reshape(2, pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]: log never sees 0
        angle = _TWO_PI * u[1]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


# -- The exact discrete Gaussian (Canonne, Kamath, Steinke 2020, arXiv:2004.00010) ------------
#
# N_Z(0, s2) has P[X = x] proportional to exp(-x^2 / (2 s2)) on the integers. It is sampled
# exactly, with integer arithmetic only and uniform integers from the CSPRNG, never a float
# Gaussian that is rounded (Mironov 2012 and Jin et al. 2021 attack those):
#
#   Algorithm 1  Bernoulli(exp(-g)), g = num/den rational: for g <= 1, draw A_k ~ Bernoulli(g/k)
#                for k = 1, 2, ... until one is 0; return 1 iff that k is odd. For g > 1, floor(g)
#                Bernoulli(exp(-1)) that must all be 1, then Bernoulli(exp(-(g - floor g))).
#   Algorithm 2  discrete Laplace of scale t (an integer): U ~ uniform{0..t-1} kept with probability
#                exp(-U/t); V = number of Bernoulli(exp(-1)) successes before the first failure;
#                a sign bit B; reject (B = 1, U = 0, V = 0); return (1 - 2B)(U + tV).
#   Algorithm 3  discrete Gaussian: t = floor(sqrt(s2)) + 1; Y ~ Lap_Z(t), kept with probability
#                exp(-(|Y| - s2/t)^2 / (2 s2)).
#
# The vectorised sampler runs every lane of a batch through the same loops with numpy int64
# arithmetic; lanes whose integers would leave int64 (astronomically far tails) are finished by
# the scalar reference below, in exact Python integers.

_WORD_LIMIT = 1 << 62  # every rational denominator handled in int64 stays below this


def _as_fraction(sigma_squared: Fraction | int) -> Fraction:
    value = Fraction(sigma_squared)
    if value <= 0:
        raise PrivacyError(f"the discrete Gaussian's variance parameter must be > 0, got {value}")
    return value


class DiscreteGaussian:
    """Exact sampler of N_Z(0, sigma_squared) (``sigma_squared`` rational: pass a Fraction or an
    int; the accountant must use the same value). Draws come from ``rng`` (a fresh CSPRNG)."""

    def __init__(self, sigma_squared: Fraction | int, rng: SecureRandom | None = None) -> None:
        self.s2 = _as_fraction(sigma_squared)
        self.rng = rng if rng is not None else SecureRandom()
        a, b = self.s2.numerator, self.s2.denominator
        self.t = math.isqrt(a // b) + 1  # floor(sigma) + 1
        # Acceptance exponent (|Y| - s2/t)^2 / (2 s2) = (|Y| t b - a)^2 / (2 a t^2 b).
        self._den = 2 * a * self.t * self.t * b
        self._y_max = (math.isqrt(_WORD_LIMIT) + a) // (self.t * b)  # int64-safe |Y|
        if self._den >= _WORD_LIMIT >> 8:
            raise PrivacyError(
                f"sigma^2 = {self.s2} is too large or too finely divided for the int64 sampler "
                "(2 a t^2 b must stay below 2^54): use a smaller variance or a simpler fraction"
            )

    def sample(self, size: int) -> NDArray[np.int64]:
        """(size,) independent draws of N_Z(0, sigma_squared)."""
        out = np.zeros(size, dtype=np.int64)
        todo = np.arange(size)
        while todo.size:
            y = _laplace(self.rng, self.t, todo.size)
            keep = self._accept(y)
            out[todo[keep]] = y[keep]
            todo = todo[~keep]
        return out

    def _accept(self, y: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Algorithm 3's test, Bernoulli(exp(-(|Y| t b - a)^2 / (2 a t^2 b))) per lane."""
        a, b = self.s2.numerator, self.s2.denominator
        mag = np.abs(y)
        safe = mag <= self._y_max
        keep = np.zeros(y.shape, dtype=np.bool_)
        diff = mag[safe] * (self.t * b) - a
        keep[safe] = bernoulli_exp(self.rng, diff * diff, self._den)
        for i in np.flatnonzero(~safe):  # far tails: exact Python integers
            num = (int(mag[i]) * self.t * b - a) ** 2
            keep[i] = _bernoulli_exp_scalar(self.rng, Fraction(num, self._den))
        return keep

    def sample_reference(self, size: int) -> NDArray[np.int64]:
        """The same distribution, one draw at a time in exact Python arithmetic (Algorithm 3 as
        printed): the test oracle for :meth:`sample`."""
        return np.array([_gaussian_scalar(self.rng, self.s2) for _ in range(size)], np.int64)


def discrete_gaussian_variance(sigma_squared: Fraction | int, terms: int = 0) -> float:
    """Var[N_Z(0, s2)] from its pmf (a hair below s2 for s2 >= 1: CKS 2020, Corollary 9)."""
    s2 = float(_as_fraction(sigma_squared))
    reach = terms or int(40 * math.sqrt(s2)) + 40
    x = np.arange(-reach, reach + 1, dtype=np.float64)
    w = np.exp(-(x * x) / (2 * s2))
    return float((w * x * x).sum() / w.sum())


# -- vectorised building blocks (one denominator per call: every caller has one) -------------
def _below(rng: SecureRandom, den: int, size: int) -> NDArray[np.int64]:
    """(size,) exactly uniform integers in [0, den), den < 2^62: rejection from 63-bit words."""
    if not 0 < den < _WORD_LIMIT:
        raise PrivacyError(f"uniform integers below {den} are outside the int64 sampler")
    limit = np.uint64((1 << 63) - (1 << 63) % den)  # the largest multiple of den <= 2^63
    words = rng.words(size) >> np.uint64(1)
    ok = words < limit
    if ok.all():  # nearly always: a word is rejected with probability (2^63 mod den) / 2^63
        return (words % np.uint64(den)).astype(np.int64)
    out = np.empty(size, dtype=np.uint64)
    out[ok] = words[ok] % np.uint64(den)
    todo = np.flatnonzero(~ok)
    while todo.size:
        words = rng.words(todo.size) >> np.uint64(1)
        ok = words < limit
        out[todo[ok]] = words[ok] % np.uint64(den)
        todo = todo[~ok]
    return out.astype(np.int64)


def _bernoulli_exp_small(rng: SecureRandom, num: NDArray[np.int64], den: int) -> NDArray[np.bool_]:
    """Algorithm 1 for g = num/den in [0, 1]: 1 iff the first failing Bernoulli(g/k) has odd k."""
    result = np.zeros(num.shape, dtype=np.bool_)
    todo = np.arange(num.size)
    k = 1
    while todo.size:
        if den * k >= _WORD_LIMIT:  # k past ~2^8: never in practice; kept exact anyway
            for i in todo:
                result[i] = _bernoulli_exp_scalar(rng, Fraction(int(num[i]), den))
            break
        success = _below(rng, den * k, todo.size) < num[todo]  # Bernoulli(g / k)
        result[todo[~success]] = k % 2 == 1
        todo = todo[success]
        k += 1
    return result


def bernoulli_exp(rng: SecureRandom, num: NDArray[np.int64], den: int) -> NDArray[np.bool_]:
    """Bernoulli(exp(-num/den)) per lane, exactly (Algorithm 1 with its g > 1 extension)."""
    whole, rest = np.divmod(num, den)
    alive = np.ones(num.shape, dtype=np.bool_)
    rounds = int(whole.max()) if whole.size else 0
    for r in range(1, rounds + 1):  # floor(g) Bernoulli(exp(-1)) that must all succeed
        lanes = np.flatnonzero(alive & (whole >= r))
        if not lanes.size:  # each round kills a lane with probability 1 - 1/e: a few dozen
            break
        alive[lanes] = _bernoulli_exp_small(rng, np.ones(lanes.size, dtype=np.int64), 1)
    lanes = np.flatnonzero(alive)
    alive[lanes] = _bernoulli_exp_small(rng, rest[lanes], den)
    return alive


def _laplace(rng: SecureRandom, t: int, size: int) -> NDArray[np.int64]:
    """(size,) draws of the discrete Laplace of scale t (Algorithm 2), exactly."""
    out = np.zeros(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        m = todo.size
        u = _below(rng, t, m)
        kept = bernoulli_exp(rng, u, t)
        v = np.zeros(m, dtype=np.int64)
        going = np.arange(m)
        while going.size:  # V: successes of Bernoulli(exp(-1)) before the first failure
            hit = _bernoulli_exp_small(rng, np.ones(going.size, dtype=np.int64), 1)
            v[going[hit]] += 1
            going = going[hit]
        sign = (rng.words(m) & np.uint64(1)).astype(np.int64)
        ok = kept & ~((sign == 1) & (u == 0) & (v == 0))
        out[todo[ok]] = ((1 - 2 * sign) * (u + t * v))[ok]
        todo = todo[~ok]
    return out


# -- scalar reference (CKS 2020's pseudocode, exact Python integers) ---------------------------
def _below_scalar(rng: SecureRandom, bound: int) -> int:
    nbytes = (bound.bit_length() + 7) // 8 + 8
    span = 1 << (8 * nbytes)
    limit = span - span % bound
    while True:
        value = int.from_bytes(rng.bytes(nbytes), "big")
        if value < limit:
            return value % bound


def _bernoulli_exp_scalar(rng: SecureRandom, gamma: Fraction) -> bool:
    while gamma > 1:
        if not _bernoulli_exp_scalar(rng, Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while _below_scalar(rng, gamma.denominator * k) < gamma.numerator:
        k += 1
    return k % 2 == 1


def _laplace_scalar(rng: SecureRandom, t: int) -> int:
    while True:
        u = _below_scalar(rng, t)
        if not _bernoulli_exp_scalar(rng, Fraction(u, t)):
            continue
        v = 0
        while _bernoulli_exp_scalar(rng, Fraction(1)):
            v += 1
        sign = _below_scalar(rng, 2)
        if sign == 1 and u == 0 and v == 0:
            continue
        return (1 - 2 * sign) * (u + t * v)


def _gaussian_scalar(rng: SecureRandom, s2: Fraction) -> int:
    t = math.isqrt(s2.numerator // s2.denominator) + 1
    while True:
        y = _laplace_scalar(rng, t)
        if _bernoulli_exp_scalar(rng, (abs(y) - s2 / t) ** 2 / (2 * s2)):
            return y
