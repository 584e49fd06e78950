"""Both privacy levels through the real round loop (ClientApp in-process), and the ledger."""

import json
from pathlib import Path

from client.app import app as client_app
from client.privacy_site import SiteAccountant
from common.core.config import build_config
from common.privacy.accounting import GaussianAccountant
from server.run import FederatedRun
from simulations.run import prepare
from tests.server.inprocess import InProcessGrid


def private_cfg(tiny_cfg, **overrides):
    tree = tiny_cfg.model_dump(mode="json")
    tree["privacy"] = {"enabled": True, "record": {"max_grad_norm": 1.0}}
    tree["train"]["batch_size"] = 8
    del tree["federation"]["weighting"]  # left to follow the privacy setting
    for key, value in overrides.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return build_config(tree)


def nodes_for(tmp_path: Path, budgets=None):
    budgets = budgets or {}
    return {
        100 + i: {
            "data-dir": str(tmp_path / "sites" / f"site-{i}"),
            "site-name": f"site-{i}",
            "state-dir": str(tmp_path / "state" / f"site-{i}"),
            **({"budget-epsilon": budgets[i]} if i in budgets else {}),
        }
        for i in range(3)
    }


def test_both_levels_are_accounted_per_round(tiny_cfg, tmp_path: Path):
    cfg = prepare(private_cfg(tiny_cfg), tmp_path)
    assert cfg.site_weighting == "uniform"  # institution DP needs equal weights
    summary = FederatedRun(
        cfg, tmp_path / "run", InProcessGrid(client_app, nodes_for(tmp_path))
    ).execute()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for site in ("site-0", "site-1", "site-2"):
        eps = [row["record_epsilon"][site] for row in rows]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
    inst = [row["institution_epsilon"] for row in rows]
    assert 0 < inst[0] < inst[1]
    privacy = summary["privacy"]
    assert privacy["institution_epsilon"] == inst[-1]
    assert (
        "Each record" in privacy["statement"] and "Each institution" in privacy["statement"]
    )
    assert all((tmp_path / "state" / f"site-{i}").glob("accountant-*.json") for i in range(3))


def test_site_over_budget_declines_and_the_run_ends(tiny_cfg, tmp_path: Path):
    cfg = prepare(private_cfg(tiny_cfg, **{"federation.min_sites": 2}), tmp_path)
    grid = InProcessGrid(client_app, nodes_for(tmp_path, budgets={1: 0.01}))
    summary = FederatedRun(cfg, tmp_path / "run", grid).execute()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("site-1" in row["sites_declined"] for row in rows)
    assert "declining to train" in rows[0]["sites_declined"]["site-1"]
    assert all(row["sites"] == ["site-0", "site-2"] for row in rows)
    assert summary["rounds"] == 2 and "site-1" not in summary["privacy"]["record_epsilon"]


def test_restarted_site_continues_from_its_saved_epsilon(tmp_path: Path):
    path = tmp_path / "accountant-run.json"
    first = SiteAccountant({}, path, "rdp")
    first.accountant.step(noise_multiplier=1.0, sample_rate=0.1, steps=50)
    first.save()
    spent = first.accountant.epsilon(1e-5)
    restarted = SiteAccountant({}, path, "rdp")  # new process: empty node state, same file
    assert restarted.accountant.epsilon(1e-5) == spent
    restarted.accountant.step(noise_multiplier=1.0, sample_rate=0.1, steps=50)
    reference = GaussianAccountant("rdp")
    reference.step(noise_multiplier=1.0, sample_rate=0.1, steps=100)
    assert abs(restarted.accountant.epsilon(1e-5) - reference.epsilon(1e-5)) < 1e-9


def test_unclipped_update_is_rejected_under_institution_dp(tiny_cfg, tmp_path: Path):
    import numpy as np
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from common.protocol.wire import to_record

    tree = tiny_cfg.model_dump(mode="json")
    del tree["federation"]["weighting"]
    tree["privacy"] = {"institution": {"enabled": True, "clip_norm": 0.5}}
    tree["federation"].update(min_sites=2, rounds=1)
    cfg = prepare(build_config(tree), tmp_path)

    def fault(node, msg):
        if node == 100 and msg.metadata.message_type == "train":
            big = {
                k: np.ones(v.numpy().shape, np.float32) for k, v in msg.content["adapter"].items()
            }
            metrics = MetricRecord({"train-loss": 1.0, "num-examples": 5})
            content = RecordDict(
                {
                    "update": to_record(big),
                    "metrics": metrics,
                    "site": ConfigRecord({"name": "site-0"}),
                }
            )
            return Message(content, reply_to=msg)
        return None

    FederatedRun(
        cfg, tmp_path / "run", InProcessGrid(client_app, nodes_for(tmp_path), fault)
    ).execute()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "exceeds `privacy.institution.clip_norm`" in row["sites_failed"]["site-0"]
    assert row["sites"] == ["site-1", "site-2"]


def test_budget_counts_earlier_runs_on_the_same_records(tiny_cfg, tmp_path: Path):
    from client.privacy_site import check_budget

    cfg = private_cfg(tiny_cfg)
    earlier = SiteAccountant({}, tmp_path / "accountant-run1.json", "rdp")
    earlier.accountant.step(noise_multiplier=0.8, sample_rate=0.1, steps=200)
    earlier.save()
    spent = earlier.accountant.epsilon(1e-5)
    now = SiteAccountant({}, tmp_path / "accountant-run2.json", "rdp")
    assert now.earlier_epsilon(1e-5) == spent
    _, reason = check_budget(now, cfg, 80, budget=spent * 0.9)
    assert reason and "earlier runs on these records already spent" in reason
    _, reason = check_budget(now, cfg, 80, budget=spent + 100.0)
    assert reason is None
    # The tighter of the site's and the run's caps applies.
    capped = cfg.model_copy(deep=True)
    capped.privacy.record.budget_epsilon = spent * 0.5
    _, reason = check_budget(now, capped, 80, budget=spent + 100.0)
    assert reason is not None
