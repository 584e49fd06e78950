"""Records of a site's folder: JSONL, CSV or Parquet, in instruction, chat or classification form.

A data folder is read completely and checked before any training: every problem is collected with
its file, line and field, and reported at once, so a run stops before training, never half-way.
:func:`read_records` is the one path from a folder to validated records; training
(:func:`read_folder`), the site's preflight and ``fedtune data check`` all go through it, so they
agree on every folder. Record contents never appear in logs or errors (only positions and fields).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.core.errors import DataError
from common.core.readers import MAX_LINE_BYTES, FileRows, Issue, RawRow, list_files, read_file

logger = logging.getLogger(__name__)

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
class FolderRecords:
    """A folder read and checked: the valid rows with their forms and records (same order), the
    issues of rows that are not valid, and every file read (with its own problems)."""

    files: list[FileRows] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    rows: list[RawRow] = field(default_factory=list)
    forms: list[str] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    file_forms: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[Issue]:
        """Everything that makes the folder unusable for training, by file and line."""
        by_file: dict[str, list[Issue]] = {}
        for issue in self.issues:
            by_file.setdefault(issue.file, []).append(issue)
        out: list[Issue] = []
        for f in self.files:
            whole = f.problem()
            out += [whole] if whole else sorted(by_file.get(f.name, []), key=lambda i: i.line)
        return out


def detect_form(row: dict[str, Any]) -> str | None:
    """The first form whose required fields are all present in ``row`` (None if none is)."""
    for form, required in FORMS.items():
        if all(k in row for k in required):
            return form
    return None


def known_forms() -> str:
    return "; ".join(f"{form}: {', '.join(keys)}" for form, keys in FORMS.items())


def to_record(row: dict[str, Any], form: str, where: str, labels: list[str]) -> Record:
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


def read_records(
    folder: str | Path,
    form: str = "auto",
    labels: list[str] | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> FolderRecords:
    """Read and check every record file of ``folder``; problems are collected, not raised.

    Raises DataError only for the folder itself (missing, unlistable, no record files). A file's
    form is ``form``, or with ``auto`` that of its first row of a known form.
    """
    paths, ignored = list_files(Path(folder))
    out = FolderRecords(ignored=ignored)
    allowed = list(labels or [])
    for path in paths:
        rows = read_file(path, max_line_bytes)
        out.files.append(rows)
        out.issues.extend(rows.issues)
        file_form = None if form == "auto" else form
        for row in rows.rows:
            file_form = _add_row(out, row, file_form, allowed) or file_form
        if file_form:
            out.file_forms[rows.name] = file_form
    return out


def _add_row(out: FolderRecords, row: RawRow, file_form: str | None, labels: list[str]) -> str:
    """Check one row against its file's form; returns the form ('' when none is known yet)."""
    found = detect_form(row.data)
    row_form = file_form or found
    if row_form is None:
        message = f"no known form: fields {sorted(row.data)} (expected {known_forms()})"
        out.issues.append(Issue(row.file, row.line, "form", message))
        return ""
    if found is not None and not all(k in row.data for k in FORMS[row_form]):
        message = f"{found} record in a {row_form} file"
        out.issues.append(Issue(row.file, row.line, "mixed-form", message))
        return row_form
    try:
        record = to_record(row.data, row_form, row.where, labels)
    except ValueError as err:
        kind = "empty" if str(err).startswith("missing field") else "invalid"
        out.issues.append(Issue(row.file, row.line, kind, str(err)))
        return row_form
    out.rows.append(row)
    out.forms.append(row_form)
    out.records.append(record)
    return row_form


def raise_problems(folder: str | Path, problems: list[Issue]) -> None:
    """One DataError listing the first problems (and how many more), if there are any."""
    if not problems:
        return
    shown = [str(p) for p in problems[:MAX_PROBLEMS]]
    more = len(problems) - len(shown)
    tail = f"\n  ... and {more} more" if more else ""
    raise DataError(
        f"data folder `{folder}` has {len(problems)} problem(s):\n  " + "\n  ".join(shown) + tail
    )


def read_folder(
    folder: str | Path,
    form: str = "auto",
    labels: list[str] | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> list[Record]:
    """The records of ``folder`` for training: every problem raised at once as DataError."""
    read = read_records(folder, form, labels, max_line_bytes)
    raise_problems(folder, read.problems())
    logger.info("read %d records from %d file(s) in %s", len(read.records), len(read.files), folder)
    return read.records


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
