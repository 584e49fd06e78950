"""From raw rows to documents: the text fields a rule may change, the label, and the split.

A row is valid when :mod:`common.core.records` would accept it, so a folder that passes here also
passes training. The same :class:`Doc` view is built from rows (``data prepare``) and from
:class:`~common.core.records.Record` s (the ClientApp on the fly), so both see the same texts.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from common.core.records import FORMS, Record, _to_record, detect_form
from common.dataprep.readers import FileRows, Issue, RawRow

EVAL_FILE = re.compile(r"(?:^|[-_.])(?:eval|test|valid|validation|dev)(?:[-_.]|$)", re.I)
INSTRUCTION_FIELDS = ("instruction", "input", "output")


@dataclass
class Doc:
    """The texts of one record that rules may change; ``label`` is never changed."""

    where: str
    texts: list[str]
    label: str | None
    eval: bool = False

    @property
    def content(self) -> str:
        """What lengths and duplicates are judged on (the prompt and answer, not the label)."""
        return "\n\n".join(t for t in self.texts if t)


@dataclass
class Loaded:
    """Valid rows of a folder, with their documents and records, and every issue met."""

    rows: list[RawRow] = field(default_factory=list)
    forms: list[str] = field(default_factory=list)
    docs: list[Doc] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    fields: Counter[str] = field(default_factory=Counter)
    file_forms: dict[str, str] = field(default_factory=dict)


def is_eval_file(name: str) -> bool:
    """Files named like ``eval``, ``test``, ``valid`` or ``dev`` hold the evaluation split."""
    return bool(EVAL_FILE.search(name.rsplit(".", 1)[0]))


def load_rows(files: list[FileRows], form: str, labels: list[str]) -> Loaded:
    """Check every row of every file; valid ones become documents and records."""
    out = Loaded()
    for f in files:
        out.issues.extend(f.issues)
        file_form = None if form == "auto" else form
        for row in f.rows:
            file_form = _add_row(out, row, file_form, labels) or file_form
        if file_form:
            out.file_forms[f.path.name] = file_form
    return out


def _add_row(out: Loaded, row: RawRow, file_form: str | None, labels: list[str]) -> str | None:
    found = detect_form(row.data)
    row_form = file_form or found
    if row_form is None:
        out.issues.append(Issue(row.where, "form", f"no known form: fields {sorted(row.data)}"))
        return None
    if found is not None and found != row_form:
        out.issues.append(Issue(row.where, "mixed-form", f"{found} record in a {row_form} file"))
        return row_form
    try:
        record = _to_record(row.data, row_form, row.where, labels)
    except ValueError as err:
        kind = "empty" if str(err).startswith("missing field") else "invalid"
        out.issues.append(Issue(row.where, kind, str(err)))
        return row_form
    out.rows.append(row)
    out.forms.append(row_form)
    out.records.append(record)
    texts = row_texts(row.data, row_form)
    out.docs.append(Doc(row.where, texts, record.label, is_eval_file(row.file)))
    out.fields.update(row.data.keys())
    return row_form


def row_texts(data: dict[str, Any], form: str) -> list[str]:
    if form == "classification":
        return [str(data["text"])]
    if form == "instruction":
        return [str(data[k]) for k in INSTRUCTION_FIELDS if data.get(k) not in (None, "")]
    return [str(m["content"]) for m in _messages(data)]


def with_texts(data: dict[str, Any], form: str, texts: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with its text fields replaced (other fields kept as they were)."""
    out = dict(data)
    if form == "classification":
        out["text"] = texts[0]
    elif form == "instruction":
        present = [k for k in INSTRUCTION_FIELDS if data.get(k) not in (None, "")]
        out.update(zip(present, texts, strict=True))
    else:
        messages = [{**m, "content": t} for m, t in zip(_messages(data), texts, strict=True)]
        was_text = isinstance(data["messages"], str)
        out["messages"] = json.dumps(messages, ensure_ascii=False) if was_text else messages
    return out


def _messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    messages = data["messages"]
    parsed: list[dict[str, Any]] = json.loads(messages) if isinstance(messages, str) else messages
    return parsed


def docs_from_records(records: list[Record]) -> list[Doc]:
    """Documents of records already read (the ClientApp path); the label is left alone."""
    return [Doc(r.where, _record_texts(r), r.label) for r in records]


def _record_texts(record: Record) -> list[str]:
    texts = [m["content"] for m in record.messages]
    return texts if record.label is not None else [*texts, record.answer]


def record_with_texts(record: Record, texts: list[str]) -> Record:
    turns = len(record.messages)
    messages = [{**m, "content": t} for m, t in zip(record.messages, texts[:turns], strict=True)]
    answer = record.answer if record.label is not None else texts[turns]
    return replace(record, messages=messages, answer=answer)


def known_forms() -> str:
    return "; ".join(f"{form}: {', '.join(keys)}" for form, keys in FORMS.items())
