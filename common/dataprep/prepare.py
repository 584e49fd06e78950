"""``data prepare``: a cleaned copy of a site's folder and a report of every change.

The source folder is only read. The copy is written to a temporary folder beside ``out`` and
renamed into place, so ``out`` is either the previous result or the new one, never half of each.
Each file keeps its name and format (Parquet becomes ``<name>.parquet.jsonl``, which training
reads); rows keep their fields, only text fields change. Dropped records are listed by source
file and line. Output is canonical, so preparing a prepared folder writes the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.core.config import Config, PrepareConfig
from common.core.errors import DataError
from common.core.readers import FileRows
from common.dataprep.pipeline import Prepared, Steps, prepare_docs
from common.dataprep.report import REPORT_NAME, PrepareReport
from common.dataprep.rows import Loaded, load_folder, with_texts

logger = logging.getLogger(__name__)


def prepare_folder(
    src: str | Path, out: str | Path, clean: bool, dedup: bool, redact: bool, cfg: Config
) -> PrepareReport:
    """Write the prepared copy of ``src`` to ``out``; steps on by flag or by ``data.prepare``."""
    src, out = Path(src).resolve(), Path(out).resolve()
    _check_paths(src, out)
    pcfg = cfg.data.prepare
    steps = Steps(clean or pcfg.clean.enabled, dedup or pcfg.dedup.enabled,
                  redact or pcfg.redact.enabled)  # fmt: skip
    loaded = load_folder(src, cfg.data)
    prepared = prepare_docs(loaded.docs, pcfg, steps)
    report = _report(src, out, steps, pcfg, loaded, prepared)
    outputs = _outputs(loaded, prepared)
    report.written = {name: len(rows) for name, rows in outputs.items()}
    _write_atomically(out, outputs, loaded.read.files, report)
    logger.info("prepared %s: %d -> %d records", src, report.records_in, report.records_out)
    return report


def _check_paths(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise DataError(f"data folder `{src}` does not exist or is not a folder")
    if out == src or out.is_relative_to(src) or src.is_relative_to(out):
        raise DataError(
            f"`--out` ({out}) must be outside the data folder `{src}` and not contain it"
        )
    if out.exists() and not out.is_dir():
        raise DataError(f"`--out` ({out}) exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_NAME).is_file():
        raise DataError(
            f"`--out` ({out}) is not empty and holds no {REPORT_NAME}: it is not a previous "
            "prepare output, so it is left alone; choose another folder"
        )


def _report(
    src: Path, out: Path, steps: Steps, pcfg: PrepareConfig, loaded: Loaded, prepared: Prepared
) -> PrepareReport:
    read = loaded.read
    report = PrepareReport(str(src), str(out), asdict(steps), _settings(pcfg))
    report.records_in = len(read.rows) + len(read.issues)
    report.records_out = len(prepared.kept)
    report.counts = dict(sorted(prepared.counts.items()))
    unread = [
        {"where": i.where, "rule": f"read.{i.kind}", "detail": i.message} for i in read.issues
    ]
    report.dropped = unread + [asdict(d) for d in prepared.dropped]
    for issue in read.issues:
        report.counts[f"read.{issue.kind}"] = report.counts.get(f"read.{issue.kind}", 0) + 1
    report.skipped_files = {f.name: f.skipped for f in read.files if f.skipped}
    return report


def _settings(pcfg: PrepareConfig) -> dict[str, Any]:
    """The rules' parameters, without the configured names (they are personal data)."""
    settings = pcfg.model_dump(mode="json", exclude={"redact": {"names"}})
    settings["redact"]["names"] = f"{len(pcfg.redact.names)} configured"
    return settings


def _outputs(loaded: Loaded, prepared: Prepared) -> dict[str, list[dict[str, Any]]]:
    """Output file name -> rows to write, in source order; files with nothing kept are left out."""
    read = loaded.read
    by_file: dict[str, list[dict[str, Any]]] = {}
    for i in prepared.kept:
        row, doc = read.rows[i], prepared.docs[i]
        if doc is None:
            continue
        by_file.setdefault(row.file, []).append(with_texts(row.data, read.forms[i], doc.texts))
    names = {f.name: _out_name(f.path) for f in read.files}
    return {names[name]: rows for name, rows in by_file.items()}


def _out_name(path: Path) -> str:
    return path.name + ".jsonl" if path.suffix == ".parquet" else path.name


def _write_atomically(
    out: Path,
    outputs: dict[str, list[dict[str, Any]]],
    files: list[FileRows],
    report: PrepareReport,
) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fields = {_out_name(f.path): f.csv_fields for f in files}
        for name, rows in outputs.items():
            text = _csv_text(rows, fields[name]) if name.endswith(".csv") else _jsonl_text(rows)
            (tmp / name).write_text(text, encoding="utf-8", newline="")
        (tmp / REPORT_NAME).write_text(report.to_json(), encoding="utf-8")
        _swap(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``: the old folder moves aside first and is removed last."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _jsonl_text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _csv_text(rows: list[dict[str, Any]], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
