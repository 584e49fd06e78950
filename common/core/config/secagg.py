"""Config section of secure aggregation (docs/secure-aggregation.md)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from common.core.config.section import Section

DEFAULT_CLIP_RANGE = 8.0


class SecAggConfig(Section):
    enabled: bool = Field(False, description="Aggregate under secure aggregation.")
    neighbours: int = Field(0, ge=0, description="0 = everyone (SecAgg); k = k-regular (SecAgg+).")
    threshold: float = Field(0.66, gt=0, le=1, description="Share of sites needed to unmask.")
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

    @field_validator("clip_range")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not (math.isfinite(value) and value > 0):
            raise ValueError("must be a finite number > 0 or `auto`")
        return value
