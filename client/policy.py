"""A site's own privacy policy: what it accepts, whatever the coordinator asks.

The coordinator sends the whole run config with every message; a site that took its protection
from there would protect itself only as much as the coordinator wants. So the policy is the
site's: node config keys and/or a TOML file named by node config ``policy-file`` (for a virtual
site of a simulation, the file written beside its data folder). The coordinator can ask for more
protection, never less: :func:`refusals` lists every way a run's config asks for less, and the
site declines with that reason (client/site.py).

Keys (node config or file; ``-`` or ``_``, e.g. ``max-epsilon`` or ``max_epsilon``)::

    require-record-dp = true        # default: true whenever max-epsilon is set
    max-epsilon = 10.0              # over ALL runs on these records (alias: budget-epsilon)
    max-delta = 1e-6                # default min(1e-5, 1/(10 records)); >= 1/records: refused
    min-noise-multiplier = 0.8      # DP-SGD noise floor
    accept-server-noise = false     # refuse institution-level DP without secure aggregation
    require-secagg = true           # refuse unless secagg.enabled
    dataset-id = "notes-2024"       # which ledger these records charge (default "default")
    state-dir = "/var/lib/fedtune"  # the ledger's folder (relative: to the policy file)

Node config keys win over the file's.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common.core.config import Config, format_validation_error
from common.core.config.simulation import SitePolicyConfig, default_site_state
from common.core.errors import ConfigError
from common.privacy.accounting import RecordPlan, default_delta

logger = logging.getLogger(__name__)

POLICY_FILE = "policy-file"  # node config: the site's policy TOML file
ALIASES = {"budget_epsilon": "max_epsilon"}  # the node-config key before policies existed
# Node-config keys that are the site's settings but not policy fields (Flower's, then fedtune's).
NODE_KEYS = {
    "partition_id", "num_partitions", "data_dir", "site_name", "policy_file",
    "identity_key", "identity_cert", "ca_cert",  # secure aggregation: client/secagg_site.py
}  # fmt: skip


class SitePolicy(SitePolicyConfig):
    """The policy a site enforces (fields: common/core/config/simulation.py)."""

    @property
    def record_dp_required(self) -> bool:
        if self.require_record_dp is None:
            return self.max_epsilon is not None
        return self.require_record_dp

    def delta_cap(self, records: int) -> float:
        """The largest record-level delta this site accepts for ``records`` records."""
        return self.max_delta if self.max_delta is not None else default_delta(records)

    def ledger_dir(self, site: str) -> Path:
        """Where the site's ledger lives: ``state-dir``, else a per-user default by site name."""
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        return default_site_state() / site


def read_policy(node_config: Mapping[str, Any], policy_file: Path | None = None) -> SitePolicy:
    """The site's policy: ``policy_file`` (if given), then the node config's policy keys."""
    fields: dict[str, Any] = {}
    sources = []
    if policy_file is not None:
        fields.update(_from_file(policy_file))
        sources.append(f"policy file `{policy_file}`")
    from_node = _fields(node_config, "node config", strict=False)
    if from_node:
        sources.append("node config")
    fields.update(from_node)
    try:
        return SitePolicy.model_validate(fields)
    except ValidationError as err:
        raise ConfigError(
            format_validation_error(err, "site policy (" + " + ".join(sources) + ")")
        ) from None


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"site policy file `{path}` (node config `policy-file`) does not exist"
        ) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"site policy file `{path}` is not valid UTF-8 TOML: {err}") from None
    fields = _fields(data, f"policy file `{path}`", strict=True)
    state = fields.get("state_dir")
    if isinstance(state, str) and state and not Path(state).expanduser().is_absolute():
        fields["state_dir"] = str(path.parent / state)  # relative to the file, not the cwd
    return fields


def _fields(raw: Mapping[str, Any], source: str, *, strict: bool) -> dict[str, Any]:
    """Policy fields by their Python names. A file's unknown keys are errors (pydantic names
    them); node config also holds Flower's and fedtune's other keys, so unknown ones are logged."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if name in out:
            raise ConfigError(f"{source}: `{key}` sets `{name}` a second time")
        if name in SitePolicy.model_fields or strict:
            out[name] = value
        elif name not in NODE_KEYS:
            logger.warning("%s: `%s` is not a site setting; ignored", source, key)
    return out


def refusals(policy: SitePolicy, cfg: Config, plan: RecordPlan | None) -> list[str]:
    """Every way ``cfg`` asks for less protection than ``policy`` (empty: acceptable).

    ``plan``: the record-level mechanism ``cfg`` runs at this site (None without record DP).
    The budget is checked against the ledger (client/privacy_site.py: ``budget_refusal``).
    """
    out: list[str] = []
    if policy.record_dp_required and not cfg.privacy.record.enabled:
        out.append(
            "this site requires record-level DP (`require-record-dp`, or a `max-epsilon` cap) "
            "and the run has `privacy.record.enabled` = false"
        )
    if plan is not None:
        out += _record_refusals(policy, plan)
    if policy.require_secagg and not cfg.secagg.enabled:
        out.append(
            "this site requires secure aggregation (`require-secagg`) and the run has "
            "`secagg.enabled` = false"
        )
    if cfg.institution_noise_at == "server" and not policy.accept_server_noise:
        out.append(
            "this site does not accept institution-level noise added by the coordinator "
            "(`accept-server-noise` = false): it needs `secagg.enabled`, the noise added at "
            "the sites"
        )
    return out


def _record_refusals(policy: SitePolicy, plan: RecordPlan) -> list[str]:
    out = []
    cap = policy.delta_cap(plan.num_records)
    if plan.delta > cap:
        # The default cap follows the record count: name the rule, not the number.
        limit = f"{cap:g} (`max-delta`)" if policy.max_delta is not None else (
            "min(1e-5, 1/(10 records)) (default; set `max-delta` to change it)"
        )  # fmt: skip
        out.append(f"`privacy.record.delta` ({plan.delta:g}) is above this site's cap {limit}")
    if plan.noise_multiplier < policy.min_noise_multiplier:
        out.append(
            f"the DP-SGD noise multiplier {plan.noise_multiplier:.4g} (`privacy.record."
            "noise_multiplier`, or calibrated from `target_epsilon`) is below this site's "
            f"floor {policy.min_noise_multiplier:g} (`min-noise-multiplier`)"
        )
    return out
