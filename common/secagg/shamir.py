"""Shamir secret sharing (Shamir 1979) over the Mersenne prime field GF(2^521 - 1).

Bonawitz et al. 2017, §4 share each site's secrets t-out-of-n so that any t holders can rebuild a
dropped site's contribution while fewer than t learn nothing (information-theoretically). The
field is larger than 2^256, so a whole 256-bit key is one field element: no chunking, no padding.
A share is the 66-byte big-endian value of the polynomial at ``x = holder_id + 1`` (x = 0 is the
secret itself, so holder ids are shifted by one).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence

from common.core.errors import SecAggError

logger = logging.getLogger(__name__)

PRIME = 2**521 - 1
SHARE_BYTES = 66
SECRET_BYTES = 32


def _x(holder: int) -> int:
    if not 0 <= holder < PRIME - 1:
        raise SecAggError(f"`site_id` must be a non-negative integer below 2^521 - 2, got {holder}")
    return holder + 1


def split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of a 32-byte ``secret``, one per holder; any ``threshold`` of them rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise SecAggError(f"`threshold` {threshold} must be in [1, {len(holders)}] (holders)")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for holder in holders:
        x, y = _x(holder), 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[holder] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at x = 0)."""
    if len(shares) < threshold:
        raise SecAggError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    points = [(_x(h), _share_value(s)) for h, s in sorted(shares.items())[:threshold]]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("reconstructed secret is out of range: inconsistent shares")
    return secret.to_bytes(SECRET_BYTES, "big")


def _share_value(share: bytes) -> int:
    if len(share) != SHARE_BYTES:
        raise SecAggError(f"a share must be {SHARE_BYTES} bytes, got {len(share)}")
    value = int.from_bytes(share, "big")
    if value >= PRIME:
        raise SecAggError("share value is outside the field")
    return value
