"""Config sections of the federation: rounds, sampling, weighting, evaluation at the coordinator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.core.config.section import Section


class EarlyStopConfig(Section):
    """Stop the run when the coordinator's evaluation stops improving (off while patience is 0)."""

    metric: Literal["loss", "accuracy"] = Field(
        "loss", description="The held-out metric watched: `loss` (lower is better) or `accuracy`."
    )
    patience: int = Field(
        0,
        ge=0,
        description=(
            "Stop after this many evaluations in a row without an improvement of at least "
            "`min_delta` over the best; 0 = never stop early."
        ),
    )
    min_delta: float = Field(0.0, ge=0, description="The smallest change that counts as better.")


class FederationConfig(Section):
    rounds: int = Field(3, gt=0, le=10000, description="Number of federated rounds.")
    sites_per_round: int = Field(0, ge=0, description="Sites sampled per round; 0 = all.")
    min_sites: int = Field(1, gt=0, description="A round with fewer successful sites is an error.")
    round_timeout_s: float = Field(3600.0, gt=0, description="Seconds to wait for replies.")
    server_lr: float = Field(
        1.0, gt=0, description="Server step size (eta) applied to the round's averaged update."
    )
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam", "fedyogi"] = Field(
        "fedavg",
        description=(
            "How the coordinator steps the global adapter by the round's average (Reddi et al. "
            "2021): `fedavg` (x += server_lr * average), `fedavgm` (server momentum), `fedadam`, "
            "`fedyogi` (adaptive; pair with `train.optimizer = sgd`). Acts on the aggregate "
            "only, so it works with secure aggregation and both DP levels."
        ),
    )
    server_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description=(
            "Server step size over the rounds: `constant`, or decayed from `server_lr` in round 1 "
            "towards 0 after the last round (`linear`: server_lr * (1 - s / rounds) at the s-th "
            "step, `cosine`: server_lr * (1 + cos(pi s / rounds)) / 2). Under DP a decaying step "
            "stops the last rounds' noise from moving the model as far as the first rounds' "
            "signal did (post-processing: no privacy cost)."
        ),
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="Server momentum (`fedavgm`).")
    server_betas: tuple[float, float] = Field(
        (0.9, 0.99), description="First- and second-moment decay (`fedadam`, `fedyogi`)."
    )
    server_tau: float = Field(
        1e-3,
        gt=0,
        description="Adaptivity floor added to the root second moment (`fedadam`, `fedyogi`).",
    )
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
    early_stop: EarlyStopConfig = Field(
        default_factory=EarlyStopConfig,
        description=(
            "Early stopping on the coordinator's evaluation; the best round is written to "
            "summary.json and `fedtune publish` defaults to it."
        ),
    )

    @model_validator(mode="after")
    def _early_stop_needs_evaluations(self) -> FederationConfig:
        if self.early_stop.patience and not self.evaluate_every:
            raise ValueError(
                f"`federation.early_stop.patience` = {self.early_stop.patience} needs the "
                "coordinator to evaluate during the run: `federation.evaluate_every` is 0 "
                "(only the last round is evaluated, so the run could never stop early)"
            )
        return self

    @field_validator("server_betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each decay must be in [0, 1) (got {list(value)})")
        return value


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
