"""How a round's records are built and read: adapter arrays <-> ArrayRecords, the round's config,
metrics and declines (the names are in common/protocol/keys.py).

The server sends the resolved config tree as one JSON string, so every site trains with exactly the
coordinator's settings; site-local settings (data folder, name, budgets) come from node config.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.core.config import Config, build_config
from common.core.errors import ModelError
from common.protocol import keys


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


def config_record(cfg: Config, extra: Mapping[str, Any]) -> ConfigRecord:
    """The CONFIG record: the whole resolved tree plus the round's keys (ROUND, RUN_ID, ...)."""
    return ConfigRecord({keys.CONFIG_TREE: json.dumps(cfg.model_dump(mode="json")), **extra})


def config_from_record(record: ConfigRecord) -> Config:
    return build_config(json.loads(str(record[keys.CONFIG_TREE])), "round config")


def declined(name: str, reason: str, records: int) -> RecordDict:
    """A site's reply when it declines the round (e.g. over its privacy budget)."""
    return RecordDict(
        {
            keys.DECLINED: ConfigRecord({keys.NAME: name, keys.REASON: reason}),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: records}),
        }
    )


def declined_reason(content: RecordDict) -> str | None:
    """Why the site declined, or None if the reply is not a decline."""
    if keys.DECLINED not in content:
        return None
    return str(content.config_records[keys.DECLINED][keys.REASON])


def declined_name(content: RecordDict) -> str | None:
    """The name a declining site gave itself (None when it gave none)."""
    name = str(content.config_records[keys.DECLINED].get(keys.NAME, "")).strip()
    return name or None


def metrics_of(content: RecordDict) -> dict[str, float]:
    """The reply's metrics as floats (KeyError/ValueError on a malformed record)."""
    raw = content.metric_records[keys.METRICS]
    return {k: float(str(v)) for k, v in raw.items()}


def record_count(metrics: Mapping[str, float]) -> int | None:
    """The record count a site reported; None when it sends none (any DP level on)."""
    return int(metrics[keys.NUM_EXAMPLES]) if keys.NUM_EXAMPLES in metrics else None


def site_evaluation_shared(cfg: Config) -> bool:
    """Whether a site's evaluation on its own held-out split may leave it: only without DP
    (no accounting covers it, and noising it would spend the site's budget on a metric) and
    without secure aggregation (one site's figure would sit beside the masked sum)."""
    private = cfg.privacy.record.enabled or cfg.privacy.institution.enabled
    return not private and not cfg.secagg.enabled


def site_evaluation_of(metrics: Mapping[str, float]) -> dict[str, float]:
    """The `site-eval-*` figures of a reply's metrics, by their plain names."""
    n = len(keys.SITE_EVAL_PREFIX)
    return {k[n:]: v for k, v in metrics.items() if k.startswith(keys.SITE_EVAL_PREFIX)}
