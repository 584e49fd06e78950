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
