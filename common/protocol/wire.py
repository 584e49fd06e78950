"""What crosses the wire: adapter arrays <-> Flower ArrayRecords, and the round's config.

The server sends the resolved config tree as one JSON string, so every site trains with exactly the
coordinator's settings; site-local settings (data folder, name, budgets) come from node config.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.core.config import Config, build_config
from common.core.errors import ModelError

CONFIG_KEY = "fedtune-config"


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(
    record: ArrayRecord, expected: dict[str, np.ndarray] | None = None
) -> OrderedDict[str, np.ndarray]:
    """Arrays of a record; with ``expected``, keys, shapes and dtypes must match and be finite."""
    state = OrderedDict((k, record[k].numpy()) for k in record)
    if expected is None:
        return state
    problems = sorted(set(expected) ^ set(state))
    if problems:
        raise ModelError(f"update has wrong keys: {', '.join(f'`{k}`' for k in problems[:5])}")
    for key, ref in expected.items():
        got = state[key]
        if got.shape != ref.shape or got.dtype != np.float32:
            raise ModelError(
                f"update `{key}`: expected float32 {ref.shape}, got {got.dtype} {got.shape}"
            )
        if not np.isfinite(got).all():
            raise ModelError(f"update `{key}` has NaN or Inf values")
    return state


def config_record(cfg: Config, **extra: Any) -> ConfigRecord:
    payload: dict[str, Any] = {CONFIG_KEY: json.dumps(cfg.model_dump(mode="json"))}
    payload.update({k.replace("_", "-"): v for k, v in extra.items()})
    return ConfigRecord(payload)


def config_from_record(record: ConfigRecord) -> Config:
    return build_config(json.loads(str(record[CONFIG_KEY])), "round config")
