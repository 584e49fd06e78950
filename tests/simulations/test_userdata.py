"""The user's records as virtual sites: config rules, reading, holding out, grouping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.core.config import load_config
from common.core.errors import ConfigError, DataError
from simulations.partition import assign, by_group, select
from simulations.run import prepare
from simulations.userdata import Pool, hold_out, user_corpus
from tests.conftest import SCENARIOS


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(*overrides: str):
    return load_config(SCENARIOS / "tiny.toml", ["simulation.partition.scheme=iid", *overrides])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["simulation.partition.source=file"], "`simulation.partition.path` is required"),
        (["simulation.partition.source=folders"], "`simulation.partition.sites_dir` is required"),
        (["simulation.partition.path=/x.csv"], "`simulation.partition.path` is used only"),
        (["simulation.partition.test_dir=/t"], "`simulation.partition.test_dir` is for user"),
        (
            ["simulation.partition.source=file", "simulation.partition.path=/x.csv",
             "simulation.partition.scheme=column"],
            "`simulation.partition.column` is required",
        ),
        (
            ["simulation.partition.source=folders", "simulation.partition.sites_dir=/s",
             "simulation.partition.scheme=dirichlet"],
            "`simulation.partition.scheme` does not apply",
        ),
        (
            ["simulation.partition.source=file", "simulation.partition.path=/x.csv",
             "simulation.partition.test_fraction=0"],
            "`simulation.partition.test_fraction` must be above 0",
        ),
    ],
)  # fmt: skip
def test_each_rule_across_the_source_fields_names_its_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert field in str(err.value)


def test_paths_become_absolute_when_the_config_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("simulation.partition.source=file", "simulation.partition.path=data/r.jsonl")
    assert cfg.simulation.partition.path == str(tmp_path / "data" / "r.jsonl")


def test_by_group_gives_one_site_per_value_in_name_order():
    assert by_group(["b", "a", "b", "c"], 3) == [[1], [0, 2], [3]]
    with pytest.raises(ConfigError, match="num_sites"):
        by_group(["a", "b"], 3)


def test_select_keeps_unlabelled_rows_and_groups_follow_the_rows():
    cfg = _cfg("simulation.partition.max_train_records=2")
    rows = [{"text": "x", "label": "red"}, {"text": "y", "label": "pink"}, {"instruction": "z"}]
    train, groups, _ = select(rows, ["g0", "g1", "g2"], [], ["red"], cfg.simulation.partition)
    assert train == [rows[0], rows[2]] and groups == ["g0", "g2"]


def test_hold_out_takes_the_share_of_each_group_and_leaves_every_site_a_record():
    pool = Pool([{"text": str(i), "label": "a"} for i in range(12)], ["x"] * 10 + ["y"] * 2)
    train, test = hold_out(pool, 0.5, np.random.default_rng(0))
    assert len(test) == 5 + 1 and train.groups is not None
    assert sorted(train.groups) == ["x"] * 5 + ["y"]


def test_dirichlet_needs_labels():
    cfg = _cfg("simulation.partition.scheme=dirichlet")
    with pytest.raises(ConfigError, match="scheme"):
        assign([{"instruction": "a", "output": "b"}] * 10, None, cfg.simulation.partition)


def test_every_bad_record_of_every_site_is_named_before_any_site_is_written(tmp_path):
    good = [{"text": f"a red hat {i}", "label": "red"} for i in range(8)]
    _jsonl(tmp_path / "sites" / "a" / "records.jsonl", good)
    bad = _jsonl(tmp_path / "sites" / "b" / "records.jsonl", good)
    bad.write_text(bad.read_text() + '{"text": 1\n')
    (tmp_path / "sites" / "c").mkdir()
    (tmp_path / "sites" / "c" / "x.csv").write_text("text,label\na,b,c\n")
    cfg = _cfg(
        "simulation.partition.source=folders",
        f"simulation.partition.sites_dir={tmp_path / 'sites'}",
    )
    with pytest.raises(DataError) as err:
        prepare(cfg, tmp_path / "run")
    assert "records.jsonl:9: bad JSON" in str(err.value) and "x.csv:2" in str(err.value)
    assert not (tmp_path / "run" / "sites").exists()


def test_chat_and_instruction_records_keep_their_form(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = _jsonl(tmp_path / "chat.jsonl", [chat] * 10)
    cfg = _cfg("simulation.partition.source=file", f"simulation.partition.path={path}")
    corpus = user_corpus(cfg)
    assert corpus.train[0] == chat and len(corpus.test) == 2 and corpus.groups is None
    path = _jsonl(tmp_path / "i.jsonl", [{"instruction": "q", "output": "a"}] * 5 + [chat])
    cfg = _cfg("simulation.partition.source=file", f"simulation.partition.path={path}")
    with pytest.raises(DataError, match="mixed-form|mix record forms|chat record"):
        user_corpus(cfg)
