"""The ClientApp's preparation: the same steps on records already read, in memory.

``load_records`` calls :func:`prepare_records` when ``data.prepare`` enables a rule; the counts
(never contents) are kept per site folder for the run's metrics (:func:`last_counts`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.core.config import PrepareConfig
from common.core.records import Record
from common.dataprep.pipeline import Steps, prepare_docs
from common.dataprep.rows import docs_from_records, record_with_texts

logger = logging.getLogger(__name__)
_COUNTS: dict[str, dict[str, int]] = {}


def prepare_records(
    records: list[Record], cfg: PrepareConfig, folder: str | Path = ""
) -> tuple[list[Record], dict[str, int]]:
    """Prepared records and the counts per rule (``prepare.<rule>`` keys, numbers only)."""
    prepared = prepare_docs(docs_from_records(records), cfg, Steps.from_config(cfg))
    out = [
        record_with_texts(records[i], doc.texts)
        for i, doc in enumerate(prepared.docs)
        if doc is not None
    ]
    counts = {"prepare.records_in": len(records), "prepare.records_out": len(out)}
    counts |= {f"prepare.{k}": int(v) for k, v in sorted(prepared.counts.items())}
    _COUNTS[str(folder)] = counts
    return out, counts


def last_counts(folder: str | Path) -> dict[str, int]:
    """Counts of the last on-the-fly preparation of ``folder`` ({} if none ran)."""
    return dict(_COUNTS.get(str(folder), {}))
