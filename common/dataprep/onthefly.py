"""The ClientApp's preparation: the same steps on records already read, in memory.

:func:`load_prepared` reads a site's folder as training does and, when ``data.prepare`` enables a
rule, prepares the records; it returns the counts (never contents) with them, for the site's
preflight and metrics to pass on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.core.config import DataConfig, PrepareConfig
from common.core.errors import DataError
from common.core.records import Record, read_folder
from common.dataprep.pipeline import Steps, prepare_docs
from common.dataprep.rows import docs_from_records, record_with_texts

logger = logging.getLogger(__name__)


def prepare_records(
    records: list[Record], cfg: PrepareConfig
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
    return out, counts


def load_prepared(folder: str | Path, data: DataConfig) -> tuple[list[Record], dict[str, int]]:
    """The records of ``folder`` for training, prepared when ``data.prepare`` enables a rule,
    and the preparation counts ({} when no rule is on)."""
    records = read_folder(folder, data.form, data.labels, data.prepare.max_line_bytes)
    if not data.prepare.enabled:
        return records, {}
    prepared, counts = prepare_records(records, data.prepare)
    if not prepared:
        raise DataError(f"data folder `{folder}`: no records left after `data.prepare`")
    logger.info("prepared %s on the fly: %d -> %d records", folder, len(records), len(prepared))
    return prepared, counts
