"""Config sections of `fedtune simulate`: how a corpus is split into virtual sites."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.core.config.section import Section


class PartitionConfig(Section):
    corpus: Literal["drugreview", "sms-spam", "synthetic"] = Field(
        "synthetic", description="Packaged corpus split across the virtual sites."
    )
    num_sites: int = Field(3, gt=0, le=1000, description="Number of virtual sites.")
    scheme: Literal["iid", "dirichlet"] = Field("iid", description="How records are split.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = less IID).")
    top_labels: int = Field(0, ge=0, description="Keep only the N most frequent labels; 0 = all.")
    max_train_records: int = Field(0, ge=0, description="Cap on pooled training records; 0 = all.")
    max_test_records: int = Field(0, ge=0, description="Cap on held-out test records; 0 = all.")
    seed: int = Field(0, description="Seed of the split.")


class SimulationConfig(Section):
    partition: PartitionConfig = Field(
        default_factory=PartitionConfig, description="How the corpus is split into sites."
    )
    backend_cpus_per_site: float = Field(1.0, gt=0, description="Ray CPUs reserved per site.")
