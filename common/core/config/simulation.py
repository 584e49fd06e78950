"""Config sections of `fedtune simulate`: where virtual sites' records come from, how they split."""

from __future__ import annotations

import os
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
    reference_records: int = Field(
        0,
        ge=0,
        description=(
            '`model.head_input = "whitened"`: this many held-out records, after the test '
            "records and never trained on or tested on, become the coordinator's public "
            "reference texts (their labels dropped), written to `reference/` in the run folder "
            "and named by `model.head_reference` (replacing any it had). 0: use "
            "`model.head_reference` as given."
        ),
    )
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


VIRTUAL_SITE_POLICY = "site-policies/{site}.toml"
"""A virtual site's policy file in the run folder, beside the data folders (`OUT/sites/site-0/`,
`OUT/site-policies/site-0.toml`): the site reads its policy there, never from the config the
coordinator sends."""


def default_site_state() -> Path:
    """Where a site keeps its ledger unless its policy says (`<site>`, or `<scenario>/<site>` for
    a virtual site): the user's state folder, `$XDG_STATE_HOME/fedtune/site-state` (default
    `~/.local/state/...`). State, not cache: clearing a cache must never reset a budget."""
    root = os.environ.get("XDG_STATE_HOME") or "~/.local/state"
    return Path(root).expanduser() / "fedtune" / "site-state"


DATASET_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class SitePolicyConfig(Section):
    """A site's own privacy policy: what it accepts from any coordinator, which can only ask for
    more protection. A real site writes it in node config or a policy file (client/policy.py);
    a scenario sets it for its virtual sites (`[simulation.site_policy]`). Sites never take it
    from the run's config."""

    require_record_dp: bool | None = Field(
        None,
        description=(
            "Refuse to train unless `privacy.record.enabled`; unset: required whenever "
            "`max_epsilon` is set."
        ),
    )
    max_epsilon: float | None = Field(
        None,
        gt=0,
        description=(
            "Most record-level epsilon these records may spend over ALL runs, composed in the "
            "site's ledger (node-config alias `budget-epsilon`); unset: no cap."
        ),
    )
    max_delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "Largest record-level delta accepted; unset: min(1e-5, 1/(10·records)). A delta at "
            "or above 1/records is refused whatever this says."
        ),
    )
    min_noise_multiplier: float = Field(
        0.0,
        ge=0,
        description=(
            "Refuse a DP-SGD noise multiplier below this (`privacy.record.noise_multiplier`, or "
            "the one calibrated from `target_epsilon`)."
        ),
    )
    accept_server_noise: bool = Field(
        True,
        description=(
            "Accept institution-level DP whose noise the coordinator adds (no secure "
            "aggregation: the coordinator sees this site's clipped update before the noise)."
        ),
    )
    require_secagg: bool = Field(
        False,
        description="Refuse to send an update unless `secagg.enabled` (the coordinator sees "
        "only the masked sum).",
    )
    dataset_id: str = Field(
        "default",
        pattern=DATASET_ID,
        description=(
            "The ledger these records charge: a site serving several datasets from one state "
            "folder gives each its own id (letters, digits, `.`, `_`, `-`)."
        ),
    )
    state_dir: str | None = Field(
        None,
        description=(
            "Folder of the site's ledger; unset: ~/.local/state/fedtune/site-state/<site name> "
            "(for a virtual site: ~/.local/state/fedtune/site-state/<scenario name>/<site name>; "
            "`$XDG_STATE_HOME` moves both)."
        ),
    )

    @model_validator(mode="after")
    def _cap_needs_dp(self) -> SitePolicyConfig:
        if self.require_record_dp is False and self.max_epsilon is not None:
            raise ValueError(
                "`max_epsilon` caps record-level DP, which `require_record_dp` = false lets the "
                "coordinator turn off (training without it spends an unbounded epsilon)"
            )
        return self


class AuditConfig(Section):
    """Canaries for `fedtune audit`: records of random words (and a random label or secret)
    put into the virtual sites' data before training, each with probability 1/2, so that an
    attack on the trained model can be measured against the run's privacy claim."""

    canaries: int = Field(
        0, ge=0, description="Canary records made (about half are trained on); 0 = no audit."
    )
    seed: int = Field(0, description="Seed of the canaries, their inclusion and their sites.")
    members: int = Field(
        500, ge=10, description="Training records (and as many held-out ones) attacked."
    )
    candidates: int = Field(
        99, ge=1, description="Other secrets each generation canary is ranked against."
    )


class SimulationConfig(Section):
    partition: PartitionConfig = Field(
        default_factory=PartitionConfig, description="How the corpus is split into sites."
    )
    backend_cpus_per_site: float = Field(1.0, gt=0, description="Ray CPUs reserved per site.")
    site_policy: SitePolicyConfig = Field(
        default_factory=SitePolicyConfig,
        description="Every virtual site's own privacy policy (written beside its data folder).",
    )
    audit: AuditConfig = Field(
        default_factory=AuditConfig, description="Canaries of an empirical privacy audit."
    )
    site_policies: dict[str, SitePolicyConfig] = Field(
        default_factory=dict,
        description=(
            "One virtual site's policy by name (`[simulation.site_policies.site-1]`), in place "
            "of `site_policy` for that site."
        ),
    )

    @model_validator(mode="after")
    def _known_sites(self) -> SimulationConfig:
        names = {f"site-{i}" for i in range(self.partition.num_sites)}
        unknown = sorted(set(self.site_policies) - names)
        if unknown:
            raise ValueError(
                f"`simulation.site_policies` names no virtual site: {', '.join(unknown)} "
                f"(the sites are site-0 .. site-{self.partition.num_sites - 1})"
            )
        return self

    def policy_of(self, site: str) -> SitePolicyConfig:
        """The policy a virtual site is given: its own table, else `site_policy`."""
        return self.site_policies.get(site, self.site_policy)
