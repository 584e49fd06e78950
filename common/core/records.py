"""Record files: JSONL or CSV, in instruction, chat or classification form.

A data folder is read completely and checked before any training: every problem is collected with
its file, line and field, and reported at once, so a run stops before training, never half-way.
Record contents never appear in logs or errors (only positions and field names).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.core.errors import DataError

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".csv")
FORMS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "output"),
    "chat": ("messages",),
    "classification": ("text", "label"),
}
ROLES = {"system", "user", "assistant"}
MAX_PROBLEMS = 20


@dataclass
class Record:
    """One training example: the prompt turns, the answer, and the label for classification."""

    messages: list[dict[str, str]]
    answer: str
    label: str | None
    where: str  # "file:line", for error messages only


@dataclass
class Problems:
    items: list[str] = field(default_factory=list)

    def add(self, where: str, msg: str) -> None:
        self.items.append(f"{where}: {msg}")

    def raise_if_any(self, folder: Path) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_PROBLEMS]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise DataError(
            f"data folder `{folder}` has {len(self.items)} problem(s):\n  "
            + "\n  ".join(shown)
            + tail
        )


def detect_form(row: dict[str, Any]) -> str | None:
    for form, required in FORMS.items():
        if all(k in row for k in required):
            return form
    return None


def _to_record(row: dict[str, Any], form: str, where: str, labels: list[str]) -> Record:
    """Build a record from a parsed row; raises ValueError naming the field."""
    missing = [k for k in FORMS[form] if row.get(k) in (None, "")]
    if missing:
        raise ValueError(f"missing field `{missing[0]}` ({form} form)")
    if form == "instruction":
        text = str(row["instruction"])
        if row.get("input"):
            text = f"{text}\n\n{row['input']}"
        return Record([{"role": "user", "content": text}], str(row["output"]), None, where)
    if form == "chat":
        return _chat_record(row["messages"], where)
    label = str(row["label"])
    if labels and label not in labels:
        # The value itself stays out: a label (a diagnosis) can be private and errors travel.
        raise ValueError(
            f"field `label`: unknown label (not one of `data.labels`: {', '.join(labels)})"
        )
    return Record([{"role": "user", "content": str(row["text"])}], label, label, where)


def _chat_record(messages: Any, where: str) -> Record:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise ValueError("field `messages`: not a JSON list") from None
    if not isinstance(messages, list) or not messages:
        raise ValueError("field `messages`: expected a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
            raise ValueError(f"field `messages[{i}]`: expected role in {sorted(ROLES)} and content")
    if messages[-1]["role"] != "assistant":
        raise ValueError("field `messages`: the last message must be the assistant's answer")
    turns = [{"role": m["role"], "content": str(m["content"])} for m in messages[:-1]]
    return Record(turns, str(messages[-1]["content"]), None, where)


def _decode_lines(path: Path, problems: Problems) -> Iterator[tuple[int, str]]:
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.add(f"{path.name}:{lineno}", f"not UTF-8 (byte {err.start})")


def _rows_jsonl(path: Path, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in _decode_lines(path, problems):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.add(f"{path.name}:{lineno}", f"bad JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            problems.add(f"{path.name}:{lineno}", "expected a JSON object")
            continue
        yield lineno, row


def _rows_csv(path: Path, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        problems.add(f"{path.name}:{line}", f"not UTF-8 (byte {err.start})")
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        yield reader.line_num, {k: v for k, v in row.items() if k is not None}


def read_file(path: Path, form: str, labels: list[str], problems: Problems) -> list[Record]:
    """Records of one file; problems are collected, not raised."""
    rows = _rows_jsonl(path, problems) if path.suffix == ".jsonl" else _rows_csv(path, problems)
    records: list[Record] = []
    seen_form = None if form == "auto" else form
    for lineno, row in rows:
        where = f"{path.name}:{lineno}"
        row_form = seen_form or detect_form(row)
        if row_form is None:
            problems.add(where, f"no known form: fields {sorted(row)} (expected {_forms_text()})")
            continue
        seen_form = row_form
        try:
            records.append(_to_record(row, row_form, where, labels))
        except ValueError as err:
            problems.add(where, str(err))
    if not records and not any(p.startswith(f"{path.name}:") for p in problems.items):
        problems.add(path.name, "empty file (no records)")
    return records


def _forms_text() -> str:
    return "; ".join(f"{form}: {', '.join(keys)}" for form, keys in FORMS.items())


def read_folder(
    folder: str | Path, form: str = "auto", labels: list[str] | None = None
) -> list[Record]:
    """Read and check every record file in ``folder``; all problems raised at once as DataError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder `{folder}` does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"data folder `{folder}` has no {' or '.join(SUFFIXES)} files")
    problems = Problems()
    records: list[Record] = []
    for path in files:
        records.extend(read_file(path, form, list(labels or []), problems))
    problems.raise_if_any(folder)
    logger.info("read %d records from %d file(s) in %s", len(records), len(files), folder)
    return records


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
