"""Config sections of `fedtune simulate`: where virtual sites' records come from, how they split."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.core.config.section import Section


class PartitionConfig(Section):
    """Where the virtual sites' records come from and how they are split among the sites.

    ``source``: a packaged ``corpus``; the user's ``folders`` (one sub-folder of ``sites_dir``
    per site: the natural partition); or one ``file`` (or folder) of records at ``path`` split
    by ``scheme``. User records are in the forms a site's folder holds (README, "A site's data").
    Relative paths are taken from the working directory of the command that loads the config.
    """

    source: Literal["corpus", "folders", "file"] = Field(
        "corpus",
        description=(
            "`corpus`: a packaged corpus (`corpus`); `folders`: one sub-folder of `sites_dir` per "
            "site, as it is; `file`: the records at `path` split across `num_sites` by `scheme`."
        ),
    )
    corpus: Literal["drugreview", "sms-spam", "synthetic", "complaints", "icd10cm-chapters"] = (
        Field(
            "synthetic", description="Packaged corpus split across the sites (`source = corpus`)."
        )
    )
    path: str = Field(
        "",
        description="A record file (.jsonl, .csv, .parquet) or a folder of them (`source = file`).",
    )
    sites_dir: str = Field(
        "",
        description=(
            "A folder with one sub-folder of records per site, taken in name order as site-0, "
            "site-1, ... (`source = folders`)."
        ),
    )
    test_dir: str = Field(
        "",
        description=(
            "Held-out records the global model is evaluated on (user data only); empty: "
            "`test_fraction` of the records is held out."
        ),
    )
    test_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description=(
            "Share of the user's records held out for testing when `test_dir` is empty (of the "
            "pool with `source = file`, of each site's folder with `source = folders`)."
        ),
    )
    num_sites: int = Field(
        3,
        gt=0,
        le=1000,
        description=(
            "Number of virtual sites (with `folders`: the number of sub-folders; with scheme "
            "`column`: the number of distinct values)."
        ),
    )
    scheme: Literal["iid", "dirichlet", "column"] = Field(
        "iid",
        description=(
            "How pooled records are split: `iid`, `dirichlet` over labels (`alpha`), or "
            "`column`: one site per value of `column` (name order). Not used with `folders`."
        ),
    )
    column: str = Field(
        "", description="The field whose values name the sites (scheme `column`), e.g. `hospital`."
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = less IID).")
    top_labels: int = Field(0, ge=0, description="Keep only the N most frequent labels; 0 = all.")
    max_train_records: int = Field(0, ge=0, description="Cap on pooled training records; 0 = all.")
    max_test_records: int = Field(0, ge=0, description="Cap on held-out test records; 0 = all.")
    seed: int = Field(0, description="Seed of the split.")

    @field_validator("path", "sites_dir", "test_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        """Absolute at load time: the ServerApp that reads them runs in another folder."""
        return str(Path(value).expanduser().resolve()) if value else value

    @model_validator(mode="after")
    def _source_fields(self) -> PartitionConfig:
        problems = [f"`simulation.partition.{field}` {why}" for field, why in self._problems()]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for every rule the fields break together."""
        src, out = self.source, []
        for field, needed_by in (("path", "file"), ("sites_dir", "folders")):
            if src == needed_by and not getattr(self, field):
                out.append((field, f"is required with `source = {needed_by}`"))
            if src != needed_by and getattr(self, field):
                out.append((field, f"is used only with `source = {needed_by}`"))
        if src == "corpus" and self.test_dir:
            out.append(("test_dir", "is for user data (a packaged corpus has its own test split)"))
        if src != "corpus" and not self.test_dir and not self.test_fraction:
            out.append(("test_fraction", "must be above 0 when `test_dir` is empty"))
        if src == "folders" and self.scheme != "iid":
            out.append(("scheme", "does not apply with `source = folders` (folders are sites)"))
        if self.scheme == "column" and src != "file":
            out.append(("scheme", "`column` needs `source = file`"))
        if self.scheme == "column" and not self.column:
            out.append(("column", "is required with scheme `column`"))
        if self.scheme != "column" and self.column:
            out.append(("column", "is used only with scheme `column`"))
        return out


class SimulationConfig(Section):
    partition: PartitionConfig = Field(
        default_factory=PartitionConfig, description="How the corpus is split into sites."
    )
    backend_cpus_per_site: float = Field(1.0, gt=0, description="Ray CPUs reserved per site.")
