"""Early stopping (`federation.early_stop`): the stopper's rule on hand-made evaluations, and a
federated run that stops, names its best round, and is published at that round by default."""

import json
from pathlib import Path

import pytest

from client.app import app as client_app
from common.core.config import EarlyStopConfig
from common.core.errors import RoundError
from server.publishing.publish import read_run
from server.run import FederatedRun
from server.strategy import EarlyStopper
from tests.server.inprocess import InProcessGrid
from tests.server.test_run import setup_run


def test_loss_patience_counts_evaluations_without_improvement():
    stop = EarlyStopper(EarlyStopConfig(metric="loss", patience=2, min_delta=0.01))
    assert not stop.observe(1, {"loss": 1.0})
    assert not stop.observe(2, {"loss": 0.995})  # better by less than min_delta: not counted
    assert not stop.observe(3, {"loss": 0.9})  # better: patience resets
    assert not stop.observe(4, {"loss": 0.95})
    assert stop.observe(5, {"loss": 0.91})
    assert stop.best_round == 3 and stop.best_metrics == {"loss": 0.9}


def test_accuracy_is_maximised_and_rows_rebuild_the_state():
    cfg = EarlyStopConfig(metric="accuracy", patience=1)
    rows = [
        {"round": 1, "eval_accuracy": 0.5, "eval_loss": 1.0},
        {"round": 2, "train_loss": 0.3},  # not evaluated
        {"round": 3, "eval_accuracy": 0.7, "eval_loss": 1.2},
    ]
    stop = EarlyStopper(cfg, rows)
    assert stop.best_round == 3 and stop.since_best == 0
    assert stop.observe(4, {"accuracy": 0.69, "loss": 0.5})


def test_off_never_stops_and_a_missing_metric_names_the_field():
    off = EarlyStopper(EarlyStopConfig())
    assert not any(off.observe(r, {"loss": 1.0}) for r in range(1, 20))
    with pytest.raises(RoundError, match="early_stop.metric"):
        EarlyStopper(EarlyStopConfig(metric="accuracy", patience=1)).observe(1, {"loss": 1.0})


def test_a_run_stops_early_and_publishes_its_best_round(tiny_cfg, tmp_path: Path):
    # min_delta far above any change: round 1 stays best, round 2 uses up the patience.
    stop = EarlyStopConfig(metric="loss", patience=1, min_delta=100.0)
    cfg, nodes = setup_run(tiny_cfg, tmp_path, {"rounds": 4, "early_stop": stop})
    summary = FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes)).execute()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert summary["rounds"] == 2
    assert summary["early_stop"]["best_round"] == 1 and summary["early_stop"]["stopped_early"]
    assert summary["early_stop"]["best"]["loss"] == pytest.approx(rows[0]["eval_loss"])
    assert read_run(tmp_path / "run").round == 1
    assert read_run(tmp_path / "run", 2).round == 2
