"""check and prepare on real folders: bad input, originals untouched, idempotence, drug reviews;
and training, the site's preflight and ``data check`` agreeing on the same folders."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from cli.data import data_check, data_prepare
from client.site import SiteInfo, check_site, load_records
from common.core.config import Config
from common.core.errors import DataError
from common.core.records import Record, read_folder
from common.core.tiny import byte_tokenizer
from common.dataprep import CheckReport, check_folder, prepare_folder
from common.dataprep.onthefly import load_prepared
from common.dataprep.rows import load_folder

CFG = Config.model_validate({"model": {"source": "tiny:llama", "max_length": 64}})
TOK = byte_tokenizer()
TEXT = "the patient reported a mild headache after the second dose and recovered"


def _jsonl(path: Path, rows: list[object]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    src = tmp_path / "site"
    src.mkdir()
    _jsonl(src / "a.jsonl", [
        {"text": f"<b>{TEXT}</b> &amp; more", "label": "x"},
        {"text": "call +31 6 1234 5678 or mail a.b@c.org, card 4111 1111 1111 1111", "label": "y"},
        {"text": f"{TEXT} &amp; more", "label": "x"},
        {"text": "", "label": "x"},
        {"text": f"{TEXT} &amp; less", "label": "y"},
    ])  # fmt: skip
    with (src / "b.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["text", "label"], ["seen 2021-03-04, ok", "x"], ["plain text", "y"]])
    (src / "c.jsonl").write_bytes(
        b'{"text": "caf\xe9", "label": "x"}\n{"text": "fine", "label": "y"}\n'
    )
    (src / "d.jsonl").write_bytes("\ufeff".encode("utf-16") + b"x\x00")
    (src / "README.txt").write_text("not records")
    return src


def test_check_reports_problems_by_file_and_line_without_contents(site: Path) -> None:
    report = check_folder(site, CFG, TOK)
    assert not report.usable
    assert report.records == 7 and report.forms == {"classification": 7}
    assert report.issues_by_kind == {"empty": 1, "encoding": 1}
    assert any(i.startswith("a.jsonl:4:") for i in report.issues)
    assert any(i.startswith("c.jsonl:1:") for i in report.issues)
    assert {f.name: f.skipped[:9] for f in report.files}["d.jsonl"] == "UTF-16 LE"
    assert report.ignored_files == ["README.txt"]
    assert report.labels == {"x": 3, "y": 4}
    assert report.duplicates["exact"] == 0 and report.duplicates["near"] == 1  # raw text
    pii = report.personal_data
    assert pii["phone"] == 1 and pii["email"] == 1 and pii["card"] == 1 and pii["date"] == 1
    blob = report.to_json()
    assert "a.b@c.org" not in blob and "1234 5678" not in blob and TEXT not in blob
    assert report.tokens.max > 64 and 1 <= report.tokens.truncated < 7


def test_prepare_writes_copy_report_and_leaves_original_alone(site: Path, tmp_path: Path) -> None:
    before = _digest(site)
    out = tmp_path / "out"
    report = prepare_folder(site, out, clean=True, dedup=True, redact=True, cfg=CFG)
    assert _digest(site) == before
    assert sorted(p.name for p in out.iterdir()) == [
        "a.jsonl",
        "b.csv",
        "c.jsonl",
        "prepare-report.json",
    ]
    rows = [json.loads(line) for line in (out / "a.jsonl").read_text().splitlines()]
    assert rows[0] == {"text": f"{TEXT} & more", "label": "x"}
    assert rows[1]["text"] == "call [PHONE] or mail [EMAIL], card [CARD]"
    dropped = {(d["where"], d["rule"]) for d in report.dropped}
    assert ("a.jsonl:3", "dedup.exact") in dropped and ("a.jsonl:5", "dedup.near") in dropped
    assert ("a.jsonl:4", "read.empty") in dropped
    assert ("c.jsonl:1", "read.encoding") in dropped
    assert report.skipped_files == {"d.jsonl": pytest.approx(report.skipped_files["d.jsonl"])}
    assert report.counts["clean.html"] == 3 and report.counts["redact.card"] == 1
    saved = json.loads((out / "prepare-report.json").read_text())
    assert saved["records_out"] == report.records_out == 5
    assert list(csv.reader((out / "b.csv").open()))[1] == ["seen [DATE], ok", "x"]


def test_prepare_is_idempotent_and_rewrites_atomically(site: Path, tmp_path: Path) -> None:
    out, again = tmp_path / "out", tmp_path / "again"
    prepare_folder(site, out, True, True, True, CFG)
    first = _digest(out)
    prepare_folder(site, out, True, True, True, CFG)  # re-run into the same folder
    assert _digest(out) == first
    report = prepare_folder(out, again, True, True, True, CFG)
    data = {k: v for k, v in _digest(again).items() if k != "prepare-report.json"}
    assert data == {k: v for k, v in first.items() if k != "prepare-report.json"}
    assert report.dropped == [] and report.records_in == report.records_out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prepare_refuses_unsafe_out_and_empty_folders(site: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="outside"):
        prepare_folder(site, site / "out", True, False, False, CFG)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare_folder(site, other, True, False, False, CFG)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no"):
        check_folder(empty, CFG, TOK)
    assert data_check(empty) == 2


def test_huge_lines_bad_json_bad_csv_and_mixed_forms(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    huge = json.dumps({"text": "x" * 5000, "label": "a"})
    (src / "a.jsonl").write_text(f'{huge}\n{{"text": "ok", "label": "a"}}\n{{bad\n[1]\n')
    (src / "b.jsonl").write_text(
        '{"instruction": "do", "output": "done"}\n{"text": "t", "label": "a"}\n'
    )
    (src / "c.csv").write_text('text,label\n"unterminated,a\n')
    cfg = CFG.model_copy(deep=True)
    cfg.data.prepare.max_line_bytes = 1000
    report = check_folder(src, cfg, TOK)
    kinds = report.issues_by_kind
    assert kinds["too-long"] == 1 and kinds["json"] == 2 and kinds["mixed-form"] == 1
    assert report.records == 2 and not report.usable
    assert "mixed record forms" in " ".join(report.warnings)


def test_parquet_is_read_and_converted(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    src = tmp_path / "s"
    src.mkdir()
    pq.write_table(pa.table({"text": ["a &amp; b", "c"], "label": ["x", "y"]}), src / "t.parquet")
    report = check_folder(src, CFG, TOK)
    assert report.records == 2 and report.usable and not report.warnings
    assert [r.answer for r in read_folder(src)] == ["x", "y"]  # training reads it too
    assert data_prepare(src, tmp_path / "o", clean=True) == 0
    rows = (tmp_path / "o" / "t.parquet.jsonl").read_text().splitlines()
    assert json.loads(rows[0]) == {"text": "a & b", "label": "x"}


def test_client_prepares_on_the_fly_like_the_cli(site: Path, tmp_path: Path) -> None:
    for bad in ("c.jsonl", "d.jsonl"):
        (site / bad).unlink()
    _jsonl(
        site / "a.jsonl",
        [
            r
            for i, r in enumerate(map(json.loads, (site / "a.jsonl").read_text().splitlines()))
            if i != 3
        ],
    )
    cfg = CFG.model_copy(deep=True)
    for section in (cfg.data.prepare.clean, cfg.data.prepare.dedup, cfg.data.prepare.redact):
        section.enabled = True
    records = load_records(SiteInfo("s", site, 0), cfg)
    prepare_folder(site, tmp_path / "o", False, False, False, cfg)
    assert records == [r for r in read_folder(tmp_path / "o")]
    again, counts = load_prepared(site, cfg.data)
    assert again == records
    assert counts["prepare.records_out"] == len(records) and counts["prepare.dedup.exact"] == 1
    assert all(isinstance(v, int) for v in counts.values())


def test_drug_reviews_go_through_check_and_prepare(tmp_path: Path) -> None:
    from simulations.corpora import drugreview

    corpus = drugreview()
    src = tmp_path / "drugs"
    src.mkdir()
    _jsonl(src / "train.jsonl", corpus.train)
    _jsonl(src / "test.jsonl", corpus.test)
    report = check_folder(src, CFG, TOK)
    assert report.usable and report.records == len(corpus.train) + len(corpus.test)
    assert "Bipolar Disorde" in report.labels and report.tokens.truncated > 0
    assert report.duplicates["eval_with_duplicate_in_train"] >= 1
    prepared = prepare_folder(src, tmp_path / "out", True, True, True, CFG)
    assert (
        prepared.records_out
        == report.records - report.duplicates["exact"] - report.duplicates["near"]
    )
    assert prepared.counts["redact.date"] == report.personal_data["date"]
    assert check_folder(tmp_path / "out", CFG, TOK).duplicates["exact"] == 0


def _parquet(table: dict[str, list[str]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(table), buf)
    return buf.getvalue()


BOM = "\ufeff".encode()
ROWS = b'{"text": "one", "label": "x"}\n{"text": "two", "label": "y"}\n'
CHAT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
FOLDERS: dict[str, tuple[dict[str, bytes], bool]] = {  # files, usable
    "bom-jsonl": ({"a.jsonl": BOM + ROWS}, True),
    "bom-csv": ({"a.csv": BOM + b"text,label\r\none,x\r\ntwo,y\r\n"}, True),
    "bad-json-line": ({"a.jsonl": ROWS + b'{"text": broken\n'}, False),
    "empty-file": ({"a.jsonl": ROWS, "b.jsonl": b""}, False),
    "only-blank-lines": ({"a.jsonl": b"\n \n\r\n"}, False),
    "not-utf8-line": ({"a.jsonl": ROWS + b'{"text": "caf\xe9", "label": "x"}\n'}, False),
    "utf16-file": ({"a.jsonl": ROWS, "b.jsonl": ROWS.decode().encode("utf-16")}, False),
    "forms-across-files": (
        {
            "a.jsonl": b'{"instruction": "do", "output": "done"}\n',
            "b.jsonl": json.dumps(CHAT).encode() + b"\n",
            "c.csv": b"text,label\none,x\n",
        },
        True,
    ),
    "forms-within-a-file": (
        {"a.jsonl": b'{"instruction": "do", "output": "done"}\n' + ROWS},
        False,
    ),
    "csv-blank-rows": ({"a.csv": b"text,label\none,x\n\n,\ntwo,y\n"}, True),
    "csv-wrong-width": ({"a.csv": b"text,label\none,x\nshort\nthree,x,y\n"}, False),
    "crlf-jsonl": ({"a.jsonl": ROWS.replace(b"\n", b"\r\n")}, True),
    "parquet-and-jsonl": (
        {"a.jsonl": ROWS, "b.parquet": _parquet({"text": ["p"], "label": ["x"]})},
        True,
    ),
    "not-a-record-file": ({"a.jsonl": ROWS, "notes.txt": b"\xff"}, True),
}


def _training(folder: Path) -> list[Record] | set[str]:
    """What training reads: the records, or the problems listed by its DataError."""
    try:
        return read_folder(folder, CFG.data.form, CFG.data.labels)
    except DataError as err:
        return {line.strip() for line in str(err).splitlines()[1:]}


def _preflight(folder: Path) -> dict[str, object] | set[str]:
    try:
        return check_site(SiteInfo("s", folder, 0), CFG)
    except DataError as err:
        return {line.strip() for line in str(err).splitlines()[1:]}


def _check_problems(report: CheckReport) -> set[str]:
    """The problems `data check` lists: each bad line, and each file bad as a whole."""
    names = {f.name for f in report.files}
    return set(report.issues) | {r for r in report.reasons if r.split(":", 1)[0] in names}


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_training_preflight_and_check_agree(name: str, tmp_path: Path) -> None:
    files, usable = FOLDERS[name]
    for file, content in files.items():
        (tmp_path / file).write_bytes(content)
    report = check_folder(tmp_path, CFG, TOK)
    training, preflight = _training(tmp_path), _preflight(tmp_path)
    assert report.usable is usable
    if usable:
        assert isinstance(training, list) and isinstance(preflight, dict)
        assert len(training) == report.records == preflight["records"]
        assert dict(Counter(r.label for r in training if r.label)) == report.labels
        assert load_folder(tmp_path, CFG.data).read.records == training
    else:
        assert training == preflight == _check_problems(report)
        assert all(p.startswith(tuple(files)) for p in training)  # each names its file


@pytest.mark.parametrize(("name", "header"), [("a.jsonl", b""), ("a.csv", b"text,label\n")])
def test_a_utf8_bom_changes_nothing(name: str, header: bytes, tmp_path: Path) -> None:
    rows = ROWS if name.endswith(".jsonl") else b"one,x\ntwo,y\n"
    plain, bom = tmp_path / "plain", tmp_path / "bom"
    for folder, start in ((plain, b""), (bom, BOM)):
        folder.mkdir()
        (folder / name).write_bytes(start + header + rows)
    assert read_folder(bom) == read_folder(plain) and len(read_folder(bom)) == 2
    with_bom, without = check_folder(bom, CFG, TOK), check_folder(plain, CFG, TOK)
    assert with_bom.usable and with_bom.issues == [] and with_bom.records == 2
    assert with_bom.fields == without.fields == {"text": 2, "label": 2}
