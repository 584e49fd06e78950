"""Bad data gives an error naming file, line and field; good data in every form reads."""

import json
from pathlib import Path

import pytest

from common.core.errors import DataError
from common.core.records import read_folder


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
        ("x.jsonl", "", "x.jsonl: empty file"),
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
    with pytest.raises(DataError, match="has no .jsonl or .csv files"):
        read_folder(tmp_path)
