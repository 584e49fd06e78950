"""The round loop with the real ClientApp in-process: preflight, failures, min_sites."""

import json
from pathlib import Path

import pytest
from flwr.app import Error, Message

from client.app import app as client_app
from common.core.errors import RoundError
from server.run import FederatedRun
from simulations.run import prepare
from tests.server.inprocess import InProcessGrid


def setup_run(tiny_cfg, tmp_path: Path, overrides=None):
    cfg = tiny_cfg.model_copy(
        update={
            "federation": tiny_cfg.federation.model_copy(
                update={"round_timeout_s": 1.0, **(overrides or {})}  # in-process: a drop waits
            )
        }
    )
    cfg = prepare(cfg, tmp_path)
    nodes = {
        100 + i: {"data-dir": str(tmp_path / "sites" / f"site-{i}"), "site-name": f"site-{i}"}
        for i in range(3)
    }
    return cfg, nodes


def test_bad_site_data_stops_the_run_before_training(tiny_cfg, tmp_path: Path):
    cfg, nodes = setup_run(tiny_cfg, tmp_path)
    with (tmp_path / "sites" / "site-1" / "records.jsonl").open("a") as f:
        f.write('{"text": "ok", "label": "purple"}\n')
    grid = InProcessGrid(client_app, nodes)
    with pytest.raises(RoundError) as err:
        FederatedRun(cfg, tmp_path / "run", grid).execute()
    msg = str(err.value)
    assert "preflight failed, nothing was trained" in msg
    assert "records.jsonl:" in msg and "unknown label (not one of" in msg and "purple" not in msg
    assert all(m.metadata.message_type == "query.check" for m in grid.sent)
    assert not list((tmp_path / "run" / "rounds").iterdir())


def test_a_failed_site_is_recorded_and_the_round_goes_on(tiny_cfg, tmp_path: Path):
    cfg, nodes = setup_run(tiny_cfg, tmp_path, {"min_sites": 2, "rounds": 1})

    def fault(node, msg):
        if node == 101 and msg.metadata.message_type == "train":
            return Message(Error(code=1, reason="GPU on fire"), reply_to=msg)
        return None

    summary = FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes, fault)).execute()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["sites"] == ["site-0", "site-2"]
    assert row["sites_failed"] == {"site-1": "GPU on fire"}
    assert summary["rounds"] == 1


def test_too_few_sites_is_an_error_not_a_silent_success(tiny_cfg, tmp_path: Path):
    cfg, nodes = setup_run(tiny_cfg, tmp_path, {"min_sites": 3, "rounds": 2})

    def fault(node, msg):
        return "drop" if node == 102 and msg.metadata.message_type == "train" else None

    with pytest.raises(
        RoundError, match="round 1: 2 site\\(s\\) succeeded, `federation.min_sites` is 3"
    ):
        FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes, fault)).execute()
    assert not (tmp_path / "run" / "summary.json").exists()


def test_malformed_update_is_rejected(tiny_cfg, tmp_path: Path):
    import numpy as np
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from common.protocol.wire import to_record

    cfg, nodes = setup_run(tiny_cfg, tmp_path, {"min_sites": 2, "rounds": 1})

    def fault(node, msg):
        if node == 100 and msg.metadata.message_type == "train":
            bad = {
                k: np.full(v.numpy().shape, np.inf, np.float32)
                for k, v in msg.content["adapter"].items()
            }
            content = RecordDict(
                {
                    "update": to_record(bad),
                    "metrics": MetricRecord({"train-loss": 1.0, "num-examples": 5}),
                    "site": ConfigRecord({"name": "site-0"}),
                }
            )
            return Message(content, reply_to=msg)
        return None

    FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes, fault)).execute()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "site-0" not in row["sites"] and "NaN or Inf" in row["sites_failed"]["site-0"]


def test_on_the_fly_preparation_counts_reach_the_summary(tiny_cfg, tmp_path: Path):
    cfg, nodes = setup_run(tiny_cfg, tmp_path, {"rounds": 1})
    prep = cfg.data.prepare.model_copy(
        update={"dedup": cfg.data.prepare.dedup.model_copy(update={"enabled": True})}
    )
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"prepare": prep})})
    site0 = tmp_path / "sites" / "site-0" / "records.jsonl"
    first = site0.read_text().splitlines()[0]
    site0.write_text(site0.read_text() + first + "\n")  # one exact duplicate
    summary = FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes)).execute()
    counts = summary["sites"]["site-0"]["prepare"]
    assert (
        counts["prepare.dedup.exact"] == 1
        and counts["prepare.records_out"] == counts["prepare.records_in"] - 1
    )
    assert all(isinstance(v, int) for v in counts.values())


def test_a_site_declining_at_preflight_is_left_out_and_named(tiny_cfg, tmp_path: Path):
    from common.protocol.wire import declined

    cfg, nodes = setup_run(tiny_cfg, tmp_path, {"min_sites": 2, "rounds": 1})

    def fault(node, msg):
        if node == 101 and msg.metadata.message_type == "query.check":
            return Message(
                declined("site-1", "my policy requires `secagg.enabled`", 0), reply_to=msg
            )
        return None

    grid = InProcessGrid(client_app, nodes, fault)
    summary = FederatedRun(cfg, tmp_path / "run", grid).execute()
    assert sorted(summary["sites"]) == ["site-0", "site-2"]
    assert summary["declined_at_preflight"] == {"site-1": "my policy requires `secagg.enabled`"}
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert trained == {100, 102}
    cfg3, _ = setup_run(tiny_cfg, tmp_path / "b", {"min_sites": 3, "rounds": 1})
    with pytest.raises(RoundError, match=r"only 2 site\(s\) accept .*declined: site-1: my policy"):
        FederatedRun(
            cfg3, tmp_path / "b" / "run", InProcessGrid(client_app, nodes, fault)
        ).execute()


@pytest.mark.parametrize("private", [False, True], ids=["no-dp", "record-dp"])
def test_each_site_evaluates_the_global_model_on_its_own_held_out_split(
    tiny_cfg, tmp_path: Path, private, caplog
):
    cfg, nodes = setup_run(tiny_cfg, tmp_path, {"rounds": 2})
    update = {"data": cfg.data.model_copy(update={"eval_fraction": 0.25})}
    if private:
        record = cfg.privacy.record.model_copy(update={"enabled": True, "target_epsilon": 8.0})
        update["privacy"] = cfg.privacy.model_copy(update={"record": record})
        for i, node in enumerate(nodes.values()):
            node["state-dir"] = str(tmp_path / "state" / str(i))
    cfg = cfg.model_copy(update=update)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"local_steps": 5})})
    caplog.set_level("INFO")
    summary = FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes)).execute()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if private:  # figures on private records leave no site: they stay in its own log
        assert "site_evaluation" not in summary and all("site_eval" not in r for r in rows)
        kept = [r.message for r in caplog.records if "held-out records" in r.message]
        assert any("(kept here)" in m and "final global model" in m for m in kept)
        assert not (tmp_path / "run" / "plots" / "sites.png").exists()
        return
    # round r's reply holds each site's figures for the global model it received (round r-1)
    assert [r["site_eval"]["of_round"] for r in rows] == [0, 1]
    assert set(rows[0]["site_eval"]["sites"]) == {"site-0", "site-1", "site-2"}
    final = summary["site_evaluation"]
    assert final["round"] == 2 and set(final["sites"]) == {"site-0", "site-1", "site-2"}
    accuracies = [f["accuracy"] for f in final["sites"].values()]
    assert final["gap"] == pytest.approx(max(accuracies) - min(accuracies))
    for site, figures in final["sites"].items():  # a quarter held out, the rest trained on
        info = summary["sites"][site]
        assert figures["examples"] == info["held_out_records"]
        assert info["held_out_records"] == int((info["held_out_records"] + info["records"]) * 0.25)
    assert (tmp_path / "run" / "plots" / "sites.png").is_file()


def test_a_coordinator_asking_for_held_out_figures_without_dp_gets_none_from_a_dp_site(
    tiny_cfg, tmp_path: Path
):
    """A patched coordinator sends `evaluate` with a config that has no DP and no secure
    aggregation, to a site whose own policy requires record-level DP: no figure leaves it."""
    from flwr.app import Context, RecordDict

    from client.site import site_model
    from common.core.adapters import get_state
    from common.protocol import keys
    from common.protocol.wire import config_record, to_record

    cfg, nodes = setup_run(tiny_cfg, tmp_path, {"rounds": 1})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval_fraction": 0.25})})
    sm = site_model(cfg)
    content = RecordDict({
        keys.ADAPTER: to_record(get_state(sm.model, sm.keys)),
        keys.CONFIG: config_record(cfg, {keys.ROUND: 1, keys.FINGERPRINT: sm.fingerprint}),
    })  # fmt: skip
    replies = {}
    for strict in (False, True):
        node = dict(nodes[100])
        if strict:
            node["require-record-dp"] = True
        msg = Message(content, dst_node_id=100, message_type=keys.EVALUATE)
        msg.metadata.__dict__["_message_id"] = f"m{strict}"
        ctx = Context(run_id=1, node_id=100, node_config=node, state=RecordDict(), run_config={})
        reply = client_app(msg, ctx)
        assert not reply.has_error(), reply.error
        replies[strict] = dict(reply.content.metric_records[keys.METRICS])
    assert f"{keys.SITE_EVAL_PREFIX}loss" in replies[False]  # the same site, policy permitting
    assert replies[True] == {}
