"""From a folder's valid rows to documents: the text fields a rule may change, the label, the split.

Rows are read and validated by :func:`common.core.records.read_records`, the reader training uses,
so a folder that passes here also passes training. The same :class:`Doc` view is built from rows
(``data prepare``) and from :class:`~common.core.records.Record` s (the ClientApp on the fly), so
both see the same texts.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.core.config import DataConfig
from common.core.records import FolderRecords, Record, read_records

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
    """A folder as training reads it, with one document per valid row and the fields seen."""

    read: FolderRecords
    docs: list[Doc] = field(default_factory=list)
    fields: Counter[str] = field(default_factory=Counter)


def is_eval_file(name: str) -> bool:
    """Files named like ``eval``, ``test``, ``valid`` or ``dev`` hold the evaluation split."""
    return bool(EVAL_FILE.search(name.rsplit(".", 1)[0]))


def load_folder(folder: Path, data: DataConfig) -> Loaded:
    """Every file of ``folder`` read and checked; raises DataError only for the folder itself."""
    read = read_records(folder, data.form, data.labels, data.prepare.max_line_bytes)
    out = Loaded(read)
    for row, form, record in zip(read.rows, read.forms, read.records, strict=True):
        texts = row_texts(row.data, form)
        out.docs.append(Doc(row.where, texts, record.label, is_eval_file(row.file)))
        out.fields.update(row.data.keys())
    return out


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
