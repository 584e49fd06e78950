"""`fedtune data check` / `data prepare` as a site operator runs them (real process, real files)."""

import json

from tests.conftest import SCENARIOS
from tests.e2e.conftest import fedtune


def test_check_and_prepare_a_site_folder(tmp_path):
    src = tmp_path / "records"
    src.mkdir()
    rows = [
        {"text": "Call me at +1 415 555 0100 about the red car", "label": "red"},
        {"text": "Call me at +1 415 555 0100 about the red car", "label": "red"},
        {"text": "the blue door &amp; <b>old</b> hat", "label": "blue"},
    ]
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = (src / "train.jsonl").read_bytes()
    tiny = str(SCENARIOS / "tiny.toml")
    proc = fedtune("data", "check", str(src), "--config", tiny, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["records"] == 3
    assert "415" not in proc.stdout  # counts only, never the values
    out = tmp_path / "prepared"
    proc = fedtune(
        "data",
        "prepare",
        str(src),
        "--out",
        str(out),
        "--clean",
        "--dedup",
        "--redact",
        "--config",
        tiny,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    prepared = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(prepared) == 2
    assert "[PHONE]" in prepared[0]["text"] and prepared[1]["text"] == "the blue door & old hat"
    assert (src / "train.jsonl").read_bytes() == before


def test_check_names_the_bad_line(tmp_path):
    src = tmp_path / "records"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "fine", "label": "red"}\n{"text": broken\n')
    proc = fedtune("data", "check", str(src), "--config", str(SCENARIOS / "tiny.toml"))
    assert proc.returncode != 0
    assert "a.jsonl:2" in proc.stdout + proc.stderr


def test_check_passes_a_bom_file_that_training_reads(tmp_path):
    from common.core.records import read_folder

    src = tmp_path / "records"
    src.mkdir()
    rows = '{"text": "fine", "label": "red"}\n{"text": "also fine", "label": "blue"}\n'
    (src / "a.jsonl").write_bytes("\ufeff".encode() + rows.encode())
    proc = fedtune("data", "check", str(src), "--config", str(SCENARIOS / "tiny.toml"), "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["usable"] and report["records"] == 2 and report["issues"] == []
    assert [r.answer for r in read_folder(src)] == ["red", "blue"]
