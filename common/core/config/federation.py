"""Config sections of the federation: rounds, sampling, weighting, evaluation at the coordinator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.core.config.section import Section


class FederationConfig(Section):
    rounds: int = Field(3, gt=0, le=10000, description="Number of federated rounds.")
    sites_per_round: int = Field(0, ge=0, description="Sites sampled per round; 0 = all.")
    min_sites: int = Field(1, gt=0, description="A round with fewer successful sites is an error.")
    round_timeout_s: float = Field(3600.0, gt=0, description="Seconds to wait for replies.")
    server_lr: float = Field(1.0, gt=0, description="Step size applied to the averaged update.")
    weighting: Literal["auto", "records", "uniform"] = Field(
        "auto",
        description=(
            "Weight of each site in the average: its record count (`records`), or equal "
            "(`uniform`); `auto`: `uniform` with either DP level (sites then send no counts), "
            "else `records`."
        ),
    )
    evaluate_every: int = Field(1, ge=0, description="Evaluate the global model every N rounds.")
    seed: int = Field(0, description="Seed of site sampling.")


class EvalConfig(Section):
    test_dir: str = Field(
        "",
        description=(
            "Held-out records the coordinator evaluates the global model on (a data folder); "
            "`fedtune simulate` fills it in. Empty: no server-side evaluation."
        ),
    )
    max_records: int = Field(0, ge=0, description="Evaluate on at most N records; 0 = all.")
    batch_size: int = Field(16, gt=0, description="Records per evaluation forward pass.")
