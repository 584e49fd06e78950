"""Bad data gives an error naming file, line and field; good data in every form and format reads."""

import json
from pathlib import Path

import pytest

from common.core.errors import DataError
from common.core.records import read_folder, read_records


def write(folder: Path, name: str, content: bytes | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_all_three_forms_and_csv(tmp_path: Path):
    write(
        tmp_path, "a.jsonl", jsonl({"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"})
    )
    chat = {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    }
    write(tmp_path, "b.jsonl", jsonl(chat))
    write(tmp_path, "c.csv", "text,label\nI feel low,Depression\n")
    records = read_folder(tmp_path)
    assert [r.answer for r in records] == ["Hi Bob", "4", "Depression"]
    assert records[0].messages[0]["content"] == "Say hi\n\nto Bob"
    assert records[2].label == "Depression"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "x.jsonl",
            jsonl({"text": "ok", "label": "a"}) + '{"text": "broken\n',
            "x.jsonl:2: bad JSON",
        ),
        (
            "x.jsonl",
            jsonl({"text": "ok", "label": "a"}, {"text": "no label"}),
            "x.jsonl:2: missing field `label`",
        ),
        ("x.jsonl", "", "x.jsonl: empty file (no records)"),
        ("x.jsonl", "\n  \n", "x.jsonl: empty file (no records)"),
        ("x.csv", "text,label\n", "x.csv: empty file (no records)"),
        (
            "x.jsonl",
            jsonl({"text": "ok", "label": "a"}).encode() + b'{"text": "\xff\xfe", "label": "a"}\n',
            "x.jsonl:2: not UTF-8",
        ),
        (
            "x.jsonl",
            jsonl({"text": "ok", "label": "zebra"}),
            "x.jsonl:1: field `label`: unknown label (not one of `data.labels`",
        ),
        ("x.csv", "text,label\nfine,a\n,a\n", "x.csv:3: missing field `text`"),
        ("x.csv", "text,label\nfine,a\nto,o,many\n", "x.csv:3: 3 values for 2 columns"),
        ("x.csv", 'text,label\n"unterminated,a\n', "x.csv:2: bad CSV"),
        ("x.jsonl", "[1]\n", "x.jsonl:1: expected a JSON object"),
        ("x.jsonl", "\ufeff{}".encode("utf-16"), "x.jsonl: UTF-16 LE text (byte-order mark)"),
        (
            "x.jsonl",
            jsonl({"instruction": "do", "output": "done"}, {"text": "t", "label": "a"}),
            "x.jsonl:2: classification record in a instruction file",
        ),
        ("x.jsonl", jsonl({"foo": 1}), "x.jsonl:1: no known form"),
        (
            "x.jsonl",
            jsonl({"messages": [{"role": "user", "content": "hi"}]}),
            "x.jsonl:1: field `messages`: the last message",
        ),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path: Path, name, content, expected):
    write(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        read_folder(tmp_path, labels=["a", "b"])
    assert expected in str(err.value)


def test_problems_are_collected_not_first_only(tmp_path: Path):
    write(
        tmp_path,
        "x.jsonl",
        jsonl({"text": "t", "label": "a"}, {"text": "t"}, {"text": "t", "label": "q"}),
    )
    with pytest.raises(DataError) as err:
        read_folder(tmp_path, labels=["a"])
    assert "2 problem(s)" in str(err.value)


def test_errors_never_echo_record_text(tmp_path: Path):
    write(tmp_path, "x.jsonl", jsonl({"text": "patient John Doe, MRN 12345"}))
    with pytest.raises(DataError) as err:
        read_folder(tmp_path)
    assert "John" not in str(err.value)


def test_missing_and_empty_folders(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        read_folder(tmp_path / "nope")
    with pytest.raises(DataError, match=r"has no .jsonl, .csv, .parquet files"):
        read_folder(tmp_path)


def test_utf8_bom_is_dropped_as_utf8_sig_does(tmp_path: Path):
    bom = "\ufeff".encode()
    write(tmp_path, "a.jsonl", bom + jsonl({"text": "one", "label": "a"}).encode())
    write(tmp_path, "b.csv", bom + b"text,label\r\ntwo,b\r\n")
    records = read_folder(tmp_path)
    assert [(r.answer, r.where) for r in records] == [("a", "a.jsonl:1"), ("b", "b.csv:2")]
    assert records[0].messages[0]["content"] == "one"


def test_a_bom_after_the_start_is_a_bad_line(tmp_path: Path):
    write(tmp_path, "a.jsonl", jsonl({"text": "t", "label": "a"}) + "\ufeff" + jsonl({"text": "u"}))
    with pytest.raises(DataError, match=r"a\.jsonl:2: bad JSON \(Unexpected UTF-8 BOM"):
        read_folder(tmp_path)


def test_line_ends_blank_lines_and_quoted_newlines(tmp_path: Path):
    write(tmp_path, "a.jsonl", '{"text": "t", "label": "a"}\r\n\r\n{"text": "u", "label": "b"}')
    write(tmp_path, "b.csv", 'text,label\r\n"two\r\nlines",c\r\n,\r\n')
    records = read_folder(tmp_path)
    assert [r.where for r in records] == ["a.jsonl:1", "a.jsonl:3", "b.csv:3"]
    assert records[2].messages[0]["content"] == "two\r\nlines"  # a quoted field keeps its ends


def test_parquet_is_read_like_jsonl(tmp_path: Path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    tmp_path.mkdir(exist_ok=True)
    pq.write_table(pa.table({"text": ["a", ""], "label": ["x", "y"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match="t.parquet:2: missing field `text`"):
        read_folder(tmp_path)
    write(tmp_path, "broken.parquet", b"PAR1 not really")
    read = read_records(tmp_path)
    assert [str(p) for p in read.problems()] == [
        "broken.parquet: not a readable Parquet file (ArrowInvalid)",
        "t.parquet:2: missing field `text` (classification form)",
    ]


def test_lines_over_the_limit_are_problems_not_memory(tmp_path: Path):
    write(
        tmp_path, "a.jsonl", jsonl({"text": "x" * 500, "label": "a"}, {"text": "ok", "label": "a"})
    )
    with pytest.raises(DataError, match="a.jsonl:1: line longer than 100 bytes"):
        read_folder(tmp_path, max_line_bytes=100)
    assert len(read_folder(tmp_path)) == 2


def test_problems_are_listed_by_file_then_line(tmp_path: Path):
    write(
        tmp_path,
        "a.jsonl",
        jsonl({"text": "", "label": "a"}) + "{bad\n" + jsonl({"text": "t", "label": "a"}),
    )
    write(tmp_path, "b.jsonl", "")
    read = read_records(tmp_path)
    assert [p.where for p in read.problems()] == ["a.jsonl:1", "a.jsonl:2", "b.jsonl"]
    assert [p.kind for p in read.problems()] == ["empty", "json", "empty-file"]
    assert [r.where for r in read.records] == ["a.jsonl:3"]
    assert read.file_forms == {"a.jsonl": "classification"}
