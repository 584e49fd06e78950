"""A coordinator killed mid-run resumes after its last completed round: every round exactly once,
and the result equals an uninterrupted run with the same seed."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from client.app import app as client_app
from common.core.errors import FedtuneError
from server.run import FederatedRun
from tests.server.inprocess import InProcessGrid, ServerKilled, kill_in_round
from tests.server.test_run import setup_run


def setup(tiny_cfg, tmp_path: Path, **federation):
    return setup_run(tiny_cfg, tmp_path, {"rounds": 3, **federation})


# fedadam: its moments must come back from the checkpoint, or round 3's step differs; a linear
# server schedule: its step count must, or round 3 steps by server_lr instead of a third of it.
@pytest.mark.parametrize(
    "server",
    [{}, {"server_optimizer": "fedadam", "server_lr": 0.05}, {"server_schedule": "linear"}],
    ids=["fedavg", "fedadam", "fedavg-linear"],
)
def test_resume_continues_after_the_last_completed_round(tiny_cfg, tmp_path: Path, server):
    cfg, nodes = setup(tiny_cfg, tmp_path, **server)
    reference = FederatedRun(cfg, tmp_path / "ref", InProcessGrid(client_app, nodes)).execute()
    grid = InProcessGrid(client_app, nodes)
    grid.fault = kill_in_round(3)
    with pytest.raises(ServerKilled):
        FederatedRun(cfg, tmp_path / "run", grid).execute()
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["round"] == 2
    assert not (tmp_path / "run" / "summary.json").exists()
    states = sorted(p.name for p in (tmp_path / "run" / "server-optimizer").glob("*"))
    assert states == (
        ["2.safetensors"] if "server_optimizer" in server else []
    )  # only the checkpointed round's

    resumed_grid = InProcessGrid(client_app, nodes)
    summary = FederatedRun(cfg, tmp_path / "run", resumed_grid, resume=True).execute()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    trained = [m.metadata.group_id for m in resumed_grid.sent if m.metadata.message_type == "train"]
    assert set(trained) == {"3"}  # rounds 1 and 2 are not trained again
    assert summary["rounds"] == 3 and summary["run_id"] != reference["run_id"]
    a = load_file(str(tmp_path / "ref" / "rounds" / "3" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "rounds" / "3" / "adapter_model.safetensors"))
    for key in a:
        # float32 training: reduction order may differ (one element was seen 1.6e-5 off under
        # two test workers); a round lost or applied twice moves elements by ~1e-2
        np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-4)
    assert summary["final"]["loss"] == pytest.approx(reference["final"]["loss"], rel=1e-4)


def test_resume_refuses_a_different_config_or_no_checkpoint(tiny_cfg, tmp_path: Path):
    cfg, nodes = setup(tiny_cfg, tmp_path)
    with pytest.raises(FedtuneError, match="no round was completed"):
        FederatedRun(
            cfg, tmp_path / "none", InProcessGrid(client_app, nodes), resume=True
        ).execute()
    FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes)).execute()
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 0.5})})
    with pytest.raises(FedtuneError, match="configuration differs"):
        FederatedRun(
            other, tmp_path / "run", InProcessGrid(client_app, nodes), resume=True
        ).execute()


def test_resume_after_a_crash_between_a_rounds_adapter_and_its_checkpoint(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from server import checkpoint

    cfg, nodes = setup(tiny_cfg, tmp_path)
    real_save = checkpoint.save

    def save(out, ckpt):
        if ckpt.round == 2:
            raise ServerKilled("killed after rounds/2 was written, before its checkpoint")
        real_save(out, ckpt)

    monkeypatch.setattr(checkpoint, "save", save)
    with pytest.raises(ServerKilled):
        FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes)).execute()
    assert (tmp_path / "run" / "rounds" / "2" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["round"] == 1
    monkeypatch.undo()

    grid = InProcessGrid(client_app, nodes)
    summary = FederatedRun(cfg, tmp_path / "run", grid, resume=True).execute()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and summary["rounds"] == 3
    trained = [m.metadata.group_id for m in grid.sent if m.metadata.message_type == "train"]
    assert sorted(set(trained)) == ["2", "3"]  # round 2 had no checkpoint: it runs again
    assert not list((tmp_path / "run" / "rounds").glob(".*.tmp"))
