"""Reports of ``data check`` and ``data prepare``: counts and positions, never record contents.

Both are plain dataclasses that serialize to JSON (``--json``, the prepare report file) and
render as rich tables for people.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

MAX_LISTED = 1000  # positions listed in a report; the counts stay exact
REPORT_NAME = "prepare-report.json"  # written into `data prepare`'s output folder


@dataclass
class Lengths:
    """Token lengths of whole examples (prompt + answer) for the configured model."""

    max_length: int = 0
    min: int = 0
    p50: int = 0
    p90: int = 0
    p99: int = 0
    max: int = 0
    mean: float = 0.0
    truncated: int = 0  # examples longer than `model.max_length`


@dataclass
class FileSummary:
    name: str
    rows: int = 0
    records: int = 0
    form: str = ""
    skipped: str = ""
    issues: int = 0


@dataclass
class CheckReport:
    folder: str
    usable: bool = False
    reasons: list[str] = field(default_factory=list)  # why not usable
    warnings: list[str] = field(default_factory=list)
    records: int = 0
    files: list[FileSummary] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    forms: dict[str, int] = field(default_factory=dict)
    fields: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    tokens: Lengths = field(default_factory=Lengths)
    issues_by_kind: dict[str, int] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)  # "file:line: message", at most MAX_LISTED
    duplicates: dict[str, int] = field(default_factory=dict)
    personal_data: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)


@dataclass
class PrepareReport:
    source: str
    out: str
    steps: dict[str, bool] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    records_in: int = 0
    records_out: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # per rule
    dropped: list[dict[str, str]] = field(default_factory=list)  # where, rule, detail
    skipped_files: dict[str, str] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)  # output file -> records

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


def _table(title: str, rows: dict[str, Any], key: str = "", value: str = "") -> Table:
    table = Table(title=title, show_header=bool(key))
    table.add_column(key)
    table.add_column(value, justify="right")
    for k, v in rows.items():
        table.add_row(str(k), str(v))
    return table


def render_check(report: CheckReport, console: Console) -> None:
    verdict = "[green]usable[/]" if report.usable else "[red]not usable[/]"
    console.print(f"[bold]{report.folder}[/]: {report.records} records, {verdict}")
    files = Table(title="files")
    for col in ("file", "form", "rows", "records", "issues", "skipped"):
        files.add_column(col)
    for f in report.files:
        files.add_row(f.name, f.form, str(f.rows), str(f.records), str(f.issues), f.skipped)
    console.print(files)
    console.print(_table("fields", report.fields, "field", "records"))
    if report.labels:
        console.print(_table("labels", _top(report.labels, 30), "label", "records"))
    console.print(_table("tokens per example", asdict(report.tokens)))
    console.print(_table("duplicates", report.duplicates))
    console.print(_table("suspected personal data (counts only)", report.personal_data))
    _render_lists(report, console)


def _render_lists(report: CheckReport, console: Console) -> None:
    if report.issues:
        console.print(_table("problems by kind", report.issues_by_kind))
        for line in report.issues[:50]:
            console.print(f"  {line}", markup=False, highlight=False)
        if len(report.issues) > 50:
            console.print(f"  ... {len(report.issues) - 50} more (see --json)")
    for w in report.warnings:
        console.print(f"[yellow]warning[/]: {w}", highlight=False)
    for r in report.reasons:
        console.print(f"[red]not usable[/]: {r}", highlight=False)


def render_prepare(report: PrepareReport, console: Console) -> None:
    console.print(
        f"[bold]{report.source}[/] -> [bold]{report.out}[/]: "
        f"{report.records_in} records in, {report.records_out} out"
    )
    console.print(_table("changes per rule", report.counts, "rule", "records"))
    for name, why in report.skipped_files.items():
        console.print(f"[yellow]skipped[/] {name}: {why}", highlight=False)


def _top(counts: dict[str, int], n: int) -> dict[str, int]:
    top = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n])
    if len(counts) > n:
        top[f"({len(counts) - n} more)"] = sum(counts.values()) - sum(top.values())
    return top
