"""The user's own records as a simulation's corpus: one folder per site, or one file to split.

Every folder and file is read by :func:`common.core.records.read_records`, the reader a real site
uses, and refused as a real site would refuse it: every problem is reported at once, by file and
line, before any virtual site is written (so before any training). The valid rows become rows of
their form (README, "A site's data") for :func:`simulations.run.write_sites`; with
``source = folders`` or scheme ``column`` each row keeps the site the data gives it (its folder,
its value of the column) as its group.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.core.config import Config
from common.core.errors import DataError
from common.core.readers import SUFFIXES, Issue, RawRow
from common.core.records import Record, detect_form, raise_problems, read_records
from simulations.corpora import Corpus, Row

logger = logging.getLogger(__name__)


@dataclass
class Pool:
    """Valid rows in their form, with the group (site) each belongs to, if the data gives one."""

    rows: list[Row]
    groups: list[str] | None = None


def user_corpus(cfg: Config) -> Corpus:
    """The user's records for `simulation.partition.source` = `folders` or `file`."""
    part = cfg.simulation.partition
    if part.source == "folders":
        pool = read_site_folders(Path(part.sites_dir), cfg)
    else:
        pool = read_pool(Path(part.path), cfg, part.column if part.scheme == "column" else "")
    _one_form(pool.rows, part.sites_dir or part.path)
    rng = np.random.default_rng(part.seed)
    if part.test_dir:
        test = read_pool(Path(part.test_dir), cfg).rows
        train = pool
    else:
        train, test = hold_out(pool, part.test_fraction, rng)
    order = rng.permutation(len(train.rows))  # caps (`max_train_records`) then take a sample
    groups = [train.groups[i] for i in order] if train.groups is not None else None
    logger.info("user data: %d training and %d test records", len(train.rows), len(test))
    return Corpus([train.rows[i] for i in order], test, None, groups)


def read_site_folders(sites_dir: Path, cfg: Config) -> Pool:
    """Every sub-folder of ``sites_dir`` is a site, its name the group; all checked first."""
    if not sites_dir.is_dir():
        raise DataError(
            f"`simulation.partition.sites_dir`: `{sites_dir}` does not exist or is not a folder"
        )
    folders = sorted(p for p in sites_dir.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"`simulation.partition.sites_dir`: `{sites_dir}` has no site folders")
    pool = Pool([], [])
    errors: list[str] = []
    for folder in folders:
        try:
            rows = read_pool(folder, cfg).rows
        except DataError as err:
            errors.append(str(err))  # every site's problems, not just the first site's
            continue
        pool.rows += rows
        pool.groups = [*(pool.groups or []), *[folder.name] * len(rows)]
    if errors:
        raise DataError("\n".join(errors))
    return pool


def read_pool(path: Path, cfg: Config, column: str = "") -> Pool:
    """A file or folder of records, checked as a site's folder; ``column``: each row's group."""
    with _as_folder(path) as folder:
        read = read_records(folder, cfg.data.form, cfg.data.labels, cfg.data.prepare.max_line_bytes)
    raise_problems(path, read.problems())
    rows = [
        form_row(raw, form, rec)
        for raw, form, rec in zip(read.rows, read.forms, read.records, strict=True)
    ]
    if not column:
        return Pool(rows)
    why = f"no value in field `{column}` (`simulation.partition.column`)"
    raise_problems(
        path, [Issue(r.file, r.line, "column", why) for r in read.rows if _blank(r, column)]
    )
    return Pool(rows, [str(r.data[column]) for r in read.rows])


def _blank(row: RawRow, column: str) -> bool:
    return row.data.get(column) in (None, "")


def form_row(raw: RawRow, form: str, record: Record) -> Row:
    """The row as its form's fields only (other columns stay behind), as the reader parsed it."""
    if form == "classification":
        return {"text": str(raw.data["text"]), "label": record.label}
    if form == "instruction":
        row = {"instruction": str(raw.data["instruction"]), "output": record.answer}
        if raw.data.get("input") not in (None, ""):
            row["input"] = str(raw.data["input"])
        return row
    return {"messages": [*record.messages, {"role": "assistant", "content": record.answer}]}


def hold_out(pool: Pool, fraction: float, rng: np.random.Generator) -> tuple[Pool, list[Row]]:
    """``fraction`` of each group (of the pool when there are none) becomes the test set."""
    groups = pool.groups if pool.groups is not None else [""] * len(pool.rows)
    buckets: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        buckets.setdefault(group, []).append(i)
    test: list[int] = []
    for idx in buckets.values():
        k = min(round(len(idx) * fraction), len(idx) - 1)  # every site keeps a record
        test += [int(i) for i in rng.permutation(idx)[:k]]
    held = set(test)
    keep = [i for i in range(len(pool.rows)) if i not in held]
    train = Pool(
        [pool.rows[i] for i in keep],
        [groups[i] for i in keep] if pool.groups is not None else None,
    )
    return train, [pool.rows[i] for i in sorted(test)]


def _one_form(rows: list[Row], where: str) -> None:
    forms = {str(detect_form(row)) for row in rows}
    if len(forms) > 1:
        raise DataError(
            f"the records at `{where}` mix record forms ({', '.join(sorted(forms))}): "
            "a virtual site's file holds one form; convert them to one"
        )


@contextmanager
def _as_folder(path: Path) -> Iterator[Path]:
    """``path`` if it is a folder; a file is linked alone into a scratch folder (its name kept,
    so problems name it), since the reader reads folders."""
    if not path.is_file():
        yield path
        return
    if path.suffix not in SUFFIXES:
        raise DataError(f"`{path}` is not a record file ({', '.join(SUFFIXES)})")
    with tempfile.TemporaryDirectory(prefix="fedtune-file-") as tmp:
        link = Path(tmp) / path.name
        link.symlink_to(path.resolve())
        yield Path(tmp)
