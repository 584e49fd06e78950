"""Reading a config: TOML files, ``--set a.b=v`` overrides, Flower's flat run config.

Invalid input is reported all at once, each problem naming its dotted field path.
"""

from __future__ import annotations

import copy
import json
import logging
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from common.core.config.recipes import apply_recipe
from common.core.config.tree import Config
from common.core.errors import ConfigError

logger = logging.getLogger(__name__)


def format_validation_error(err: ValidationError, source: str) -> str:
    """All problems at once, each as ``field.path: message``."""
    lines = [f"{source}: {err.error_count()} invalid field(s):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if e["type"] != "missing" and "input" in e else ""
        if isinstance(e.get("input"), dict):
            got = ""
        # Cross-field rules name their fields in the message itself.
        lines.append(f"  - `{loc}`: {msg}{got}" if loc else f"  - {msg}")
    return "\n".join(lines)


def parse_value(raw: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as a TOML value, else as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override `{item}` must look like `section.field=value`")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override `{key}`: `{part}` is a value, not a section")
            node = child
        node[parts[-1]] = parse_value(raw.strip())
    return tree


def build_config(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict into a :class:`Config`; every error at once, as ConfigError.
    ``recipe`` fills in the groups of settings the tree leaves unset (:mod:`.recipes`)."""
    if tree.get("recipe", "none") != "none":
        tree = copy.deepcopy(tree)  # the caller's tree stays as it was
    applied, kept = apply_recipe(tree)
    if applied:  # a resolved tree (a run folder's config, Flower's run config) fills nothing
        logger.info(
            "%s: recipe `%s`: filled in %s%s",
            source,
            tree.get("recipe"),
            ", ".join(applied),
            f"; your own values kept for {', '.join(kept)}" if kept else "",
        )
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file `{path}` does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file `{path}` is not UTF-8 ({err.reason})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file `{path}` is not valid TOML: {err}") from None


PRIVATE = "private"  # a scenario's table of settings for when record-level DP is on


def record_dp_on(tree: dict[str, Any]) -> bool:
    """Whether a config tree turns record-level DP on (itself, or by `privacy.enabled`)."""
    privacy = tree.get("privacy", {})
    if not isinstance(privacy, dict):
        return False
    record = privacy.get("record", {})
    own = _flag(record.get("enabled") if isinstance(record, dict) else None)
    return own is True or (own is None and _flag(privacy.get("enabled")) is True)


def _flag(value: Any) -> bool | None:
    """A switch as the config reads it (pydantic: `true`, `"true"`, `"True"`, 1, ...); None if
    unset or not a switch (validation then names it)."""
    if value is None:
        return None
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return None


def _merge(tree: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``tree`` (in place): tables merge, values replace."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = copy.deepcopy(value)
    return tree


def _dotted(overlay: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in overlay.items():
        out += _dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def _check_private(overlay: Any, source: str) -> dict[str, Any]:
    """`[private]`: a table of existing settings, none of which turns DP itself on or off."""
    if not isinstance(overlay, dict):
        raise ConfigError(f"{source}: `{PRIVATE}` must be a table (`[{PRIVATE}]`)")

    def walk(node: dict[str, Any], model: type[BaseModel], prefix: str) -> None:
        for key, value in node.items():
            field = model.model_fields.get(key)
            if field is None:
                raise ConfigError(f"{source}: `[{PRIVATE}]`: `{prefix}{key}` is not a setting")
            sub = field.annotation
            if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(value, sub, f"{prefix}{key}.")

    walk(overlay, Config, "")
    switches = ("privacy.enabled", "privacy.record.enabled", "privacy.institution.enabled")
    dotted = _dotted(overlay)
    for key in (*switches, PRIVATE, "recipe"):
        if any(k == key or k.startswith(key + ".") for k in dotted):
            raise ConfigError(f"{source}: `[{PRIVATE}]` cannot set `{key}`")
    return overlay


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config (or the defaults when ``path`` is None) and apply ``--set`` overrides.

    A `[private]` table holds the settings a scenario wants when record-level DP is on (its DP
    recipe: e.g. another method or clip bound); they apply over the file's own when the config
    and the overrides turn record-level DP on, and ``--set`` still wins over both."""
    source = str(path or "defaults")
    tree = read_toml(path) if path is not None else {}
    overlay = tree.pop(PRIVATE, None)
    if overlay is not None:
        overlay = _check_private(overlay, source)
    plain = apply_overrides(copy.deepcopy(tree), overrides or [])
    if overlay is None or not record_dp_on(plain):
        return build_config(plain, source)
    logger.info(
        "%s: record-level DP is on: `[%s]` sets %s", source, PRIVATE, ", ".join(_dotted(overlay))
    )
    return build_config(apply_overrides(_merge(tree, overlay), overrides or []), source)


def to_toml(cfg: Config) -> str:
    import tomli_w

    data = cfg.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


def from_run_config(run_config: dict[str, Any]) -> Config:
    """The one bridge from Flower's flat ``run_config`` to the config tree.

    Flower's run config is flat (``str -> scalar``). fedtune ships the whole resolved tree as one
    JSON string under ``fedtune-config``; otherwise ``scenario`` names a TOML file and ``overrides``
    holds ``;``-separated ``key=value`` pairs; any other dotted key is an override too.
    """
    if "fedtune-config" in run_config:
        return build_config(json.loads(str(run_config["fedtune-config"])), "run_config")
    reserved = {
        "scenario", "overrides", "out", "data-root", "simulate-sites", "resume", "monitor-port",
        "monitor-host",
    }  # fmt: skip
    scenario = run_config.get("scenario")
    overrides = [o for o in str(run_config.get("overrides", "")).split(";") if o.strip()]
    overrides += [f"{k}={json.dumps(v)}" for k, v in run_config.items() if k not in reserved]
    return load_config(str(scenario) if scenario else None, overrides)
