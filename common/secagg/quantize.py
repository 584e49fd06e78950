"""Fixed-point encoding of float updates into Z_{2^b} such that a sum of n never wraps.

A value x is clipped to [-c, c] and mapped to an integer q in [0, L] with
``L = 2^min(b - ceil(log2 n), 52) - 1``: the sum of n such integers is at most n * L < 2^b, so the
modular sum computed under masking equals the integer sum (Bonawitz et al. 2017, §3 assume inputs
in Z_R with the sum below R). With step ``delta = 2c / L`` the decoded sum of m inputs, each within
[-c, c], is off by less than ``m * delta`` per coordinate with stochastic rounding (unbiased), and
by at most ``m * delta / 2`` with nearest rounding. Values outside [-c, c] are clipped first; that
error is not covered (clip upstream, e.g. institution-level DP clipping, to stay inside).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.core.errors import SecAggError
from common.secagg import crypto
from common.secagg.params import SecAggParams

logger = logging.getLogger(__name__)


def secure_uniform(size: int) -> NDArray[np.float64]:
    """(size,) uniforms in [0, 1) from a CSPRNG: the AES-CTR keystream (crypto.prg) under a fresh
    key from ``os.urandom``, 53 bits per value. The rounding is part of what hides a site's
    value (under distributed DP it is the randomized rounding of Kairouz et al. 2021), so it
    must be unpredictable: numpy's default generator is not a cryptographic one."""
    words = crypto.prg(os.urandom(crypto.KEY_BYTES), size, np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class Quantizer:
    """Encoding for one round, fixed by the parameters and the number of sites that advertised."""

    params: SecAggParams
    max_sites: int

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """uint32 when b <= 32, else uint64; arithmetic wraps natively, masked to b bits."""
        return np.uint32 if self.params.modulus_bits <= 32 else np.uint64

    @property
    def modulus_mask(self) -> int:
        """2^b - 1: ``v & mask`` reduces mod 2^b."""
        return (1 << self.params.modulus_bits) - 1

    @property
    def levels(self) -> int:
        """L, the largest integer one value maps to."""
        headroom = math.ceil(math.log2(self.max_sites)) if self.max_sites > 1 else 0
        bits = self.params.modulus_bits - headroom
        if bits < 1:
            raise SecAggError(
                f"`modulus_bits` {self.params.modulus_bits} is too small for "
                f"{self.max_sites} sites: need more than ceil(log2 n) = {headroom} bits"
            )
        # float64 encodes exactly only up to 2^53: cap L there (more headroom, never a wrap).
        return (1 << min(bits, 52)) - 1

    @property
    def step(self) -> float:
        """delta = 2c / L, the value of one quantization level."""
        return 2 * self.params.clip_range / self.levels

    def error_bound(self, contributors: int) -> float:
        """Largest per-coordinate error of a decoded sum of ``contributors`` in-range inputs."""
        per_value = self.step if self.params.stochastic_rounding else self.step / 2
        return contributors * per_value

    def encode(self, update: NDArray[np.floating]) -> NDArray[np.unsignedinteger]:
        """(d,) float -> (d,) integers in [0, L] of :attr:`dtype`."""
        c = self.params.clip_range
        # float64: L is up to 2^52, beyond float32's 24-bit mantissa. In place to spare copies.
        scaled = update.astype(np.float64)
        np.clip(scaled, -c, c, out=scaled)
        scaled += c
        scaled *= self.levels / (2 * c)
        if self.params.stochastic_rounding:
            # floor(z + u), u ~ U[0, 1): unbiased; stays <= L since z <= L and u < 1.
            scaled += secure_uniform(scaled.shape[0])
            np.floor(scaled, out=scaled)
        else:
            np.rint(scaled, out=scaled)
        np.minimum(scaled, self.levels, out=scaled)
        return scaled.astype(self.dtype)

    def decode_sum(
        self, total: NDArray[np.unsignedinteger], contributors: int
    ) -> NDArray[np.float64]:
        """Integer sum of ``contributors`` encodings -> float64 sum of their values."""
        c = self.params.clip_range
        return total.astype(np.float64) * self.step - contributors * c
