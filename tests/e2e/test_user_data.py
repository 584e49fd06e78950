"""End to end: `fedtune simulate` over the user's own records (folders per site, or one file split
IID, by Dirichlet over labels, or by a column), through Flower's simulation engine, on tiny:llama.

The records are the synthetic colour task (simulations/corpora.py), written here as a user would
have them: JSONL, CSV and Parquet files, one folder per department, or one CSV with a `hospital`
column. A bad record anywhere stops the run before any training, naming its file and line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from simulations.corpora import synthetic
from tests.conftest import SCENARIOS
from tests.e2e.conftest import fedtune

pytestmark = pytest.mark.slow
QUICK = ["federation.rounds=1", "train.local_steps=60", "model.source=tiny:llama"]
HOSPITALS = ["north", "south", "west"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def colours():
    corpus = synthetic(n_train=240, n_test=60, seed=3)
    return corpus.train, corpus.test


def _simulate(tmp: Path, *overrides: str):
    out = tmp / "run"
    args = [f"--set={o}" for o in [*QUICK, *overrides]]
    proc = fedtune("simulate", "--config", str(SCENARIOS / "tiny.toml"), "--out", str(out), *args)
    return out, proc


def _summary(out: Path, proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "rounds" / "1" / "adapter_model.safetensors").is_file()
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").open()] == [1]
    return json.loads((out / "summary.json").read_text())


def test_one_folder_per_site_with_a_test_folder(tmp_path, colours):
    train, test = colours
    sites = tmp_path / "departments"
    _write_jsonl(sites / "cardiology" / "records.jsonl", train[:60])
    _write_csv(sites / "oncology" / "export.csv", train[60:150])
    _write_parquet(sites / "radiology" / "part-0.parquet", train[150:])
    _write_jsonl(tmp_path / "held-out" / "test.jsonl", test)
    out, proc = _simulate(
        tmp_path,
        "simulation.partition.source=folders",
        f"simulation.partition.sites_dir={sites}",
        f"simulation.partition.test_dir={tmp_path / 'held-out'}",
        "simulation.partition.scheme=iid",
    )
    summary = _summary(out, proc)
    # site-i is the i-th folder in name order; every record of it, as the user wrote them.
    assert {s: v["records"] for s, v in summary["sites"].items()} == {
        "site-0": 60,
        "site-1": 90,
        "site-2": 90,
    }
    written = [json.loads(line) for line in (out / "sites" / "site-1" / "records.jsonl").open()]
    assert sorted(written, key=json.dumps) == sorted(train[60:150], key=json.dumps)
    assert sum(1 for _ in (out / "test" / "records.jsonl").open()) == 60
    # Labels were not given: inferred from the records, most frequent first.
    config = (out / "config.toml").read_text()
    assert all(c in config for c in ('"red"', '"green"', '"blue"'))
    assert summary["final"]["accuracy"] > summary["base"]["accuracy"]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "column"])
def test_one_file_split_across_virtual_sites(tmp_path, colours, scheme):
    train, test = colours
    rows = [{**r, "hospital": HOSPITALS[i % 3]} for i, r in enumerate(train + test)]
    _write_csv(tmp_path / "records.csv", rows)
    split = [f"simulation.partition.scheme={scheme}"]
    if scheme == "column":
        split.append("simulation.partition.column=hospital")
    out, proc = _simulate(
        tmp_path,
        "simulation.partition.source=file",
        f"simulation.partition.path={tmp_path / 'records.csv'}",
        "simulation.partition.test_fraction=0.2",
        *split,
    )
    summary = _summary(out, proc)
    counts = {s: v["records"] for s, v in summary["sites"].items()}
    assert sorted(counts) == ["site-0", "site-1", "site-2"]
    assert sum(counts.values()) == 240  # 300 records, 20% held out
    assert sum(1 for _ in (out / "test" / "records.jsonl").open()) == 60
    if scheme == "column":
        assert list(counts.values()) == [80, 80, 80]  # 100 per hospital, 20 of each held out
    site = [json.loads(line) for line in (out / "sites" / "site-0" / "records.jsonl").open()]
    assert set(site[0]) == {"text", "label"}  # the form's fields; other columns stay behind


def test_a_bad_record_stops_the_run_before_training(tmp_path, colours):
    train, _ = colours
    sites = tmp_path / "departments"
    _write_jsonl(sites / "a" / "records.jsonl", train[:100])
    bad = sites / "b" / "records.jsonl"
    _write_jsonl(bad, train[100:])
    lines = bad.read_text().splitlines()
    lines[2] = '{"text": "a blue hat", "label": '  # line 3: cut short
    lines[6] = '{"text": "a red car"}'  # line 7: no label
    bad.write_text("\n".join(lines) + "\n")
    out, proc = _simulate(
        tmp_path,
        "simulation.partition.source=folders",
        f"simulation.partition.sites_dir={sites}",
        "simulation.partition.num_sites=2",
        "simulation.partition.scheme=iid",
    )
    assert proc.returncode != 0
    assert "records.jsonl:3: bad JSON" in proc.stderr
    assert "records.jsonl:7" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "sites").exists()


def test_a_bad_row_in_a_split_file_is_named_too(tmp_path, colours):
    train, _ = colours
    rows = [{**r, "hospital": HOSPITALS[i % 3]} for i, r in enumerate(train)]
    rows[41]["hospital"] = ""  # CSV line 43 (the header is line 1)
    _write_csv(tmp_path / "records.csv", rows)
    out, proc = _simulate(
        tmp_path,
        "simulation.partition.source=file",
        f"simulation.partition.path={tmp_path / 'records.csv'}",
        "simulation.partition.scheme=column",
        "simulation.partition.column=hospital",
    )
    assert proc.returncode != 0
    assert "records.csv:43: no value in field `hospital`" in proc.stderr
    assert not (out / "metrics.jsonl").exists()
