"""Config section of secure aggregation (docs/secure-aggregation.md)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from common.core.config.section import Section

DEFAULT_CLIP_RANGE = 8.0


class SecAggConfig(Section):
    enabled: bool = Field(False, description="Aggregate under secure aggregation.")
    neighbours: int = Field(
        0,
        ge=0,
        description=(
            "0 = everyone (SecAgg); an even k >= 2 = each site masks with k neighbours of a random "
            "k-regular graph (SecAgg+, Bell et al. 2020); k >= sites - 1 is the complete graph."
        ),
    )
    threshold: float = Field(
        0.66,
        gt=0.5,
        le=1,
        description=(
            "Share t/m of a site's share holders needed to unmask, m being all sampled sites "
            "(SecAgg) or the site and its k neighbours (SecAgg+); t = max(2, ceil(threshold * m)). "
            "Must be > 0.5: a dishonest coordinator that shows different survivor lists to "
            "different sites collects both kinds of a site's secrets unless t > m/2 (Bonawitz "
            "et al. 2017, §6; Bell et al. 2020 per neighbourhood). t - 1 colluders learn nothing."
        ),
    )
    modulus_bits: int = Field(32, ge=16, le=62, description="Quantized values live mod 2^bits.")
    clip_range: float | Literal["auto"] = Field(
        "auto",
        description=(
            "Quantization range per coordinate of a (weighted) update; values beyond are clipped "
            "and counted. The error bound grows with it: range * 2 * n / 2^modulus_bits. "
            f"`auto`: {DEFAULT_CLIP_RANGE}, or C + 6 noise std when the sites add "
            "institution-level noise shares, if that is larger."
        ),
    )

    @field_validator("threshold", mode="before")
    @classmethod
    def _majority(cls, value: object) -> object:
        # pydantic's own `gt` message would not say why: this one does (the field is named by
        # the loader from the error's location).
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0.5:
            raise ValueError(
                "must be > 0.5 (a strict majority of each site's share holders): with t <= m/2 "
                "a coordinator that lies about who survived can unmask a site (Bonawitz et al. "
                "2017, §6)"
            )
        return value

    @field_validator("neighbours")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(
                "must be 0 (everyone) or even: the SecAgg+ graph gives each site k/2 neighbours "
                "on each side of a ring (Bell et al. 2020, §3.2)"
            )
        return value

    @field_validator("clip_range")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not (math.isfinite(value) and value > 0):
            raise ValueError("must be a finite number > 0 or `auto`")
        return value
