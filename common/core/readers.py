"""Reading a site's record files row by row, without ever stopping half-way.

This is the one reader of site folders: training, the site's preflight and ``fedtune data check``
all start here, so they see the same rows. Every file is read on its own: a file that cannot be
read, is not UTF-8 (UTF-16 and binary files are recognised and skipped whole), or has bad lines
yields :class:`Issue` s naming file and line, and the rest of the folder is still read. A UTF-8
byte-order mark at the start of a file is dropped (``utf-8-sig`` semantics). Lines end at
``\\n`` (``\\r\\n`` too); blank lines and all-empty CSV rows are skipped. Lines longer than a limit
are skipped without being held in memory. Record contents never appear in issues.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common.core.errors import DataError

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".csv", ".parquet")
MAX_LINE_BYTES = 16 * 2**20  # the default of `data.prepare.max_line_bytes`
_UTF8_BOM = b"\xef\xbb\xbf"
_BOMS = {b"\xff\xfe": "UTF-16 LE", b"\xfe\xff": "UTF-16 BE"}


@dataclass(frozen=True)
class Issue:
    """One problem at a place; ``line`` 0 is the whole file. ``kind`` is a short slug
    (``encoding``, ``json``, ``csv``, ``form`` ...)."""

    file: str
    line: int
    kind: str
    message: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class RawRow:
    """One parsed row (a JSON object, a CSV row by header, a Parquet row) and where it was."""

    file: str
    line: int
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class FileRows:
    """What one file gave: its rows and issues, or why it was skipped whole."""

    path: Path
    rows: list[RawRow] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    skipped: str = ""
    csv_fields: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def add(self, line: int, kind: str, message: str) -> None:
        self.issues.append(Issue(self.name, line, kind, message))

    def problem(self) -> Issue | None:
        """What is wrong with the file as a whole: skipped, or empty (no rows and no issues)."""
        if self.skipped:
            return Issue(self.name, 0, "skipped", self.skipped)
        if not self.rows and not self.issues:
            return Issue(self.name, 0, "empty-file", "empty file (no records)")
        return None


def list_files(folder: Path) -> tuple[list[Path], list[str]]:
    """Record files of ``folder`` (sorted) and the names of other entries, which are ignored."""
    if not folder.is_dir():
        raise DataError(f"data folder `{folder}` does not exist or is not a folder")
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        raise DataError(f"data folder `{folder}` cannot be listed ({err.strerror})") from None
    files = [p for p in entries if p.suffix in SUFFIXES and p.is_file()]
    if not files:
        raise DataError(f"data folder `{folder}` has no {', '.join(SUFFIXES)} files")
    return files, [p.name for p in entries if p not in files]


def read_file(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> FileRows:
    """All rows of one file; never raises for bad content, only records issues."""
    out = FileRows(path)
    try:
        with path.open("rb") as f:
            out.skipped = _sniff(f.read(4096))
            if not out.skipped:
                f.seek(0)
                _READERS[path.suffix](f, out, max_line_bytes)
    except OSError as err:
        out.skipped = f"cannot be read ({err.strerror or err})"
    if out.skipped:
        logger.warning("skipped %s: %s", path.name, out.skipped)
    return out


def _sniff(head: bytes) -> str:
    """Why a file is not UTF-8 text at all ('' when it may be)."""
    for bom, name in _BOMS.items():
        if head.startswith(bom):
            return f"{name} text (byte-order mark); convert it to UTF-8"
    if b"\x00" in head and not head.startswith(b"PAR1"):
        return "binary, not UTF-8 text"
    return ""


def _lines(f: IO[bytes], out: FileRows, max_bytes: int) -> Iterator[tuple[int, str]]:
    """Decoded lines with their line ends and numbers; too-long and non-UTF-8 lines are
    reported and skipped."""
    lineno = 0
    while chunk := f.readline(max_bytes + 1):
        lineno += 1
        if len(chunk) > max_bytes and not chunk.endswith(b"\n"):
            while (rest := f.readline(max_bytes)) and not rest.endswith(b"\n"):
                pass  # drain the rest of the huge line without keeping it
            out.add(lineno, "too-long", f"line longer than {max_bytes} bytes, skipped")
            continue
        if lineno == 1 and chunk.startswith(_UTF8_BOM):
            chunk = chunk[len(_UTF8_BOM) :]
        try:
            yield lineno, chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            out.add(lineno, "encoding", f"not UTF-8 (byte {err.start}), skipped")


def _read_jsonl(f: IO[bytes], out: FileRows, max_bytes: int) -> None:
    for lineno, line in _lines(f, out, max_bytes):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            out.add(lineno, "json", f"bad JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            out.add(lineno, "json", "expected a JSON object")
            continue
        out.rows.append(RawRow(out.name, lineno, row))


def _read_csv(f: IO[bytes], out: FileRows, max_bytes: int) -> None:
    numbered = _lines(f, out, max_bytes)
    last = [0]

    def text() -> Iterator[str]:
        for lineno, line in numbered:
            last[0] = lineno
            yield line  # with its line end, so a quoted field keeps its own

    csv.field_size_limit(max(csv.field_size_limit(), max_bytes))
    reader = csv.reader(text(), strict=True)
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            out.add(last[0], "csv", f"bad CSV ({err})")
            if not out.csv_fields:
                return  # without a header no row can be read
            continue
        _add_csv_row(out, values, last[0])


def _add_csv_row(out: FileRows, values: list[str], lineno: int) -> None:
    if not out.csv_fields:
        out.csv_fields = values  # the header: the first row that is not blank
    elif not any(values):
        return  # a blank row (a spreadsheet's empty line), like a blank JSONL line
    elif len(values) != len(out.csv_fields):
        out.add(lineno, "csv", f"{len(values)} values for {len(out.csv_fields)} columns")
    else:
        out.rows.append(RawRow(out.name, lineno, dict(zip(out.csv_fields, values, strict=True))))


def _read_parquet(f: IO[bytes], out: FileRows, max_bytes: int) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        out.skipped = "Parquet, which needs the `pyarrow` package"
        return
    try:
        table = pq.ParquetFile(f)
        lineno = 0
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                lineno += 1
                out.rows.append(RawRow(out.name, lineno, row))
    except Exception as err:  # pyarrow raises many types for a damaged file
        out.skipped = f"not a readable Parquet file ({type(err).__name__})"
        out.rows.clear()


_READERS = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
