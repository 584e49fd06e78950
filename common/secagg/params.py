"""Public parameters of a secure-aggregation round, identical on the server and every site."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from common.core.errors import SecAggError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggParams:
    """Protocol parameters (see docs/secure-aggregation.md, "Parameters").

    threshold: t, the number of surviving holders needed to rebuild a secret; also the fewest
        inputs the server may ever learn a sum of. Up to t - 1 sites colluding with the server
        learn nothing about another site's input. Against a server that deviates, t must be a
        strict majority of each site's m share holders (:meth:`require_majority`).
    neighbours: k, each site's number of neighbours (SecAgg+); 0 means everyone (SecAgg). Even;
        t <= k + 1 (a site's secrets are shared among itself and its neighbours) and 2t > k + 1.
    modulus_bits: b, masked vectors live in Z_{2^b} (uint32 for b <= 32, else uint64).
    clip_range: c, values are clipped to [-c, c] before quantization.
    stochastic_rounding: unbiased random rounding (error < 1 step) instead of nearest (<= 1/2).
    encoding: "" for the fixed-point quantizer above (sites give floats); else the sha256 (hex)
        of an integer encoding the sites apply themselves (the distributed discrete Gaussian,
        common/privacy/ddg.py): they give vectors in Z_{2^b}, the sum comes back as integers.
        Being part of the digest every advert signs, sites given different encodings (a
        smaller noise, say) never form one round.
    """

    threshold: int
    neighbours: int = 0
    modulus_bits: int = 32
    clip_range: float = 1.0
    stochastic_rounding: bool = True
    encoding: str = ""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.threshold, bool) or self.threshold < 2:
            problems.append(f"`threshold` must be an integer >= 2, got {self.threshold!r}")
        if self.neighbours < 0 or self.neighbours % 2:
            problems.append(
                f"`neighbours` must be 0 (everyone) or an even k >= 2, got {self.neighbours!r}"
            )
        if 0 < self.neighbours < self.threshold - 1:
            problems.append(
                f"`neighbours` ({self.neighbours}) + 1 must be >= `threshold` ({self.threshold}):"
                " a site's secrets are shared among itself and its neighbours"
            )
        if self.neighbours > 0 and 2 * self.threshold <= self.neighbours + 1:
            problems.append(
                f"`threshold` ({self.threshold}) must be more than half of a neighbourhood "
                f"(`neighbours` + 1 = {self.neighbours + 1}): with fewer, a server that lies about "
                "who survived collects both kinds of a site's shares (Bell et al. 2020)"
            )
        if not 8 <= self.modulus_bits <= 64:
            problems.append(f"`modulus_bits` must be in [8, 64], got {self.modulus_bits!r}")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            problems.append(f"`clip_range` must be a finite number > 0, got {self.clip_range!r}")
        if self.encoding and not re.fullmatch(r"[0-9a-f]{64}", self.encoding):
            problems.append(
                f"`encoding` must be empty or a sha256 hex digest, got {self.encoding!r}"
            )
        if problems:
            raise SecAggError("invalid secure-aggregation parameters: " + "; ".join(problems))

    def require_majority(self, holders: int, who: str) -> None:
        """Refuse a round where t is not a strict majority of the ``holders`` of a site's shares.

        An honest holder reveals, for a given site, either its self-mask share (the site
        survived) or its pair-key shares (the site dropped), never both. A server that tells
        different holders different stories obtains t shares of both kinds only if 2t <= m
        (holders m, Bonawitz et al. 2017, §6: t > n/2 for the complete graph; Bell et al. 2020
        apply it per neighbourhood of k + 1). With c colluding holders the bound is 2t > m + c.
        """
        if 2 * self.threshold <= holders:
            raise SecAggError(
                (f"{who}: " if who else "")
                + f"`threshold` {self.threshold} is not more than half of the {holders} "
                "holders of each site's shares: a server that lies about who survived could "
                "unmask a site (Bonawitz et al. 2017, §6); refusing the round"
            )

    def signatures_needed(self, advertised: int) -> int:
        """Survivor-list signatures a site must see before it reveals anything: t, and a strict
        majority of the ``advertised`` sites. Two different lists can then never both collect
        enough signatures unless some site signed both (Bonawitz et al. 2017, §6; an honest
        site signs one list per round); under SecAgg+ t alone is a majority of a neighbourhood
        only, hence the second term."""
        return max(self.threshold, advertised // 2 + 1)

    def digest(self) -> bytes:
        """SHA-256 of the canonical parameters: every site signs it into its advert, so sites
        given different parameters (a smaller t, say) never form one round."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).digest()

    def to_dict(self) -> dict[str, Any]:
        """Plain values (int, float, bool) for a Flower ConfigRecord."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SecAggParams:
        """Inverse of :meth:`to_dict`; unknown or missing fields raise :class:`SecAggError`."""
        try:
            return cls(**data)
        except TypeError as exc:
            raise SecAggError(f"malformed secure-aggregation parameters: {exc}") from exc
