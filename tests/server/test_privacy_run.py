"""Both privacy levels through the real round loop (ClientApp in-process), each site's own
policy and ledger, and what leaves a site under DP."""

import json
import shutil
from pathlib import Path

import pytest
from flwr.app import Error, Message

from client.app import app as client_app
from client.privacy_site import SiteLedger, ledger_report
from common.core.config import build_config, load_config
from common.core.errors import RoundError
from common.protocol import keys
from server.run import FederatedRun
from simulations.run import prepare
from tests.conftest import SCENARIOS
from tests.server.inprocess import InProcessGrid
from tests.server.test_secagg_round import give_identities

FAST = {"train.local_steps": 3}  # a round's few DP-SGD steps are enough to spend budget


def private_cfg(tiny_cfg, **overrides):
    """tiny.toml with both levels on; overrides by dotted path (`privacy.record.delta`)."""
    tree = tiny_cfg.model_dump(mode="json")
    tree["privacy"] = {"enabled": True, "record": {"max_grad_norm": 1.0}}
    tree["train"]["batch_size"] = 8
    del tree["federation"]["weighting"]  # left to follow the privacy setting
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[name] = value
    return build_config(tree)


def nodes_for(tmp_path: Path, budgets=None, policy=None):
    """Deployment-style node configs; ``policy``: site index -> extra node-config keys."""
    budgets, policy = budgets or {}, policy or {}
    return {
        100 + i: {
            "data-dir": str(tmp_path / "sites" / f"site-{i}"),
            "site-name": f"site-{i}",
            "state-dir": str(tmp_path / "state" / f"site-{i}"),
            **({"budget-epsilon": budgets[i]} if i in budgets else {}),
            **policy.get(i, {}),
        }
        for i in range(3)
    }


def rows_of(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def spent(state: Path) -> tuple[float, int]:
    """A site's ledger: epsilon over all runs (at its delta) and rounds charged."""
    report = ledger_report(state)[0]
    return report.epsilon, report.rounds


def test_both_levels_are_accounted_per_round(tiny_cfg, tmp_path: Path):
    cfg = prepare(private_cfg(tiny_cfg, **FAST), tmp_path)
    assert cfg.site_weighting == "uniform"  # institution DP needs equal weights
    summary = FederatedRun(
        cfg, tmp_path / "run", InProcessGrid(client_app, nodes_for(tmp_path))
    ).execute()
    rows = rows_of(tmp_path / "run")
    for site in ("site-0", "site-1", "site-2"):
        eps = [row["record_epsilon"][site] for row in rows]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
    inst = [row["institution_epsilon"] for row in rows]
    assert 0 < inst[0] < inst[1]
    privacy = summary["privacy"]
    assert privacy["institution_epsilon"] == inst[-1]
    assert "Each record" in privacy["statement"] and "Each institution" in privacy["statement"]
    for i in range(3):  # one ledger per site, keyed by its dataset, never by the run
        state = tmp_path / "state" / f"site-{i}"
        assert [p.name for p in state.glob("*.json")] == ["ledger-default.json"]
        assert spent(state)[1] == 2


def test_site_over_budget_declines_and_the_run_ends(tiny_cfg, tmp_path: Path):
    cfg = prepare(private_cfg(tiny_cfg, **FAST, **{"federation.min_sites": 2}), tmp_path)
    grid = InProcessGrid(client_app, nodes_for(tmp_path, budgets={1: 0.01}))
    summary = FederatedRun(cfg, tmp_path / "run", grid).execute()
    rows = rows_of(tmp_path / "run")
    assert all("site-1" in row["sites_declined"] for row in rows)
    assert "declining to train" in rows[0]["sites_declined"]["site-1"]
    assert all(row["sites"] == ["site-0", "site-2"] for row in rows)
    assert summary["rounds"] == 2 and "site-1" not in summary["privacy"]["record_epsilon"]
    assert not (tmp_path / "state" / "site-1" / "ledger-default.json").exists()  # nothing spent


# -- none of these routes makes a site spend past its own cap or train below its policy -------


@pytest.fixture(scope="module")
def spent_once(tmp_path_factory):
    """Three sites after a run whose second round failed (site-0's reply lost, min_sites 3):
    site-1 has spent two rounds; the run folder has a checkpoint after round 1."""
    root = tmp_path_factory.mktemp("spent")
    tiny = load_config(SCENARIOS / "tiny.toml", ["data.labels=['red','green','blue']"])
    cfg = prepare(private_cfg(tiny, **FAST), root)

    def lose_round_2(node, msg):
        if node == 100 and msg.metadata.message_type == keys.TRAIN and msg.metadata.group_id == "2":
            return Message(Error(code=0, reason="lost on the way"), reply_to=msg)
        return None

    grid = InProcessGrid(client_app, nodes_for(root), lose_round_2)
    with pytest.raises(RoundError, match="round 2"):
        FederatedRun(cfg, root / "run", grid, run_id="run-1").execute()
    eps, rounds = spent(root / "state" / "site-1")
    assert eps > 0 and rounds == 2
    return root, cfg, eps


def _copy(src: Path, dst: Path) -> Path:
    for sub in ("sites", "state", "run", "test"):
        shutil.copytree(src / sub, dst / sub)
    return dst


ROUTES = {
    # name: (config overrides, run id, site-1's extra policy, expected words in its reason)
    "a new run id": ({}, None, {}, "over all runs"),
    "a slash in the run id": ({}, "../run-1/x", {}, "over all runs"),
    "the same run id in a new run folder": ({}, "run-1", {}, "over all runs"),
    "an edited data folder": ({}, None, {}, "over all runs"),
    "DP off": ({"privacy.enabled": False}, None, {}, "`privacy.record.enabled` = false"),
    "a large delta": ({"privacy.record.delta": 0.5}, None, {}, "`privacy.record.delta` (0.5)"),
    "secagg off when required": ({}, None, {"require-secagg": True}, "`secagg.enabled` = false"),
    "noise below the floor": ({}, None, {"min-noise-multiplier": 50.0}, "floor 50"),
}


def declines(caplog, site: str) -> list[str]:
    """The coordinator's log of ``site``'s declines (at preflight or in a round, either path)."""
    found = []
    for said in (f"site {site} declined this run: ", f"site {site} declined this round: "):
        found += [r.getMessage().split(said)[1] for r in caplog.records if said in r.getMessage()]
    return found


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_no_route_spends_past_the_sites_cap_or_trains_below_its_policy(
    spent_once, tmp_path: Path, route, caplog
):
    root, cfg, eps = spent_once
    overrides, run_id, extra, words = ROUTES[route]
    work = _copy(root, tmp_path)
    if route == "an edited data folder":
        with (work / "sites" / "site-1" / "records.jsonl").open("a") as f:
            f.write(json.dumps({"text": "one more record", "label": "red"}) + "\n")
    one_round = {"federation.rounds": 1, "federation.min_sites": 2}
    run_cfg = private_cfg(cfg, **FAST, **one_round, **overrides)
    cap = {"max-epsilon": eps * 1.01, **extra}  # the operator's cap: just above what it spent
    grid = InProcessGrid(client_app, nodes_for(work, policy={1: cap}))
    run = FederatedRun(run_cfg, work / "run2", grid, **({"run_id": run_id} if run_id else {}))
    if route == "a large delta":  # no site accepts it: every site declines, the run stops
        with pytest.raises(RoundError, match="site-1: declining to train"):
            run.execute()
    else:
        run.execute()
        row = rows_of(work / "run2")[0]
        assert "site-1" not in row["sites"]
        if run_cfg.privacy.record.enabled:
            assert words in row["sites_declined"]["site-1"]
    assert len(declines(caplog, "site-1")) == 1 and words in declines(caplog, "site-1")[0]
    assert spent(work / "state" / "site-1") == (pytest.approx(eps), 2)  # not one step more


def test_resume_composes_into_the_same_ledger(spent_once, tmp_path: Path):
    root, cfg, eps = spent_once
    work = _copy(root, tmp_path)
    cap = {"max-epsilon": eps * 1.01}
    grid = InProcessGrid(client_app, nodes_for(work, policy={1: cap}))
    with pytest.raises(RoundError, match="site-1: declining to train") as err:
        FederatedRun(cfg, work / "run", grid, resume=True).execute()
    assert "over all runs" in str(err.value)
    # site-1 declines at preflight, so too few sites are left and nobody trains the resumed
    # round 2: site-0 (whose round-2 reply was lost) still has only round 1 on its ledger
    for site, rounds in (("site-1", 2), ("site-0", 1)):
        ledger = SiteLedger.load(work / "state" / site, "default")
        assert list(ledger.runs) == ["run-1"] and ledger.runs["run-1"].rounds == rounds
    assert spent(work / "state" / "site-1") == (pytest.approx(eps), 2)


def test_a_fresh_run_folder_is_not_a_fresh_budget(tiny_cfg, tmp_path: Path, monkeypatch):
    """Simulation route: the virtual sites' ledgers live in the user's state folder, not --out."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    scenario = private_cfg(tiny_cfg, **FAST, **{"federation.rounds": 1})
    nodes = {100 + i: {"partition-id": i} for i in range(3)}  # what Flower's simulation sets
    first = prepare(scenario, tmp_path / "out1")
    FederatedRun(
        first, tmp_path / "out1", InProcessGrid(client_app, nodes), str(tmp_path / "out1/sites")
    ).execute()
    state = tmp_path / "state-home" / "fedtune" / "site-state" / scenario.name / "site-1"
    eps, rounds = spent(state)
    assert rounds == 1
    tree = scenario.model_dump(mode="json")
    tree["simulation"]["site_policies"] = {"site-1": {"max_epsilon": eps * 1.01}}
    tree["federation"]["min_sites"] = 2
    second = prepare(build_config(tree), tmp_path / "out2")
    FederatedRun(
        second, tmp_path / "out2", InProcessGrid(client_app, nodes), str(tmp_path / "out2/sites")
    ).execute()
    assert "over all runs" in rows_of(tmp_path / "out2")[0]["sites_declined"]["site-1"]
    assert spent(state) == (pytest.approx(eps), 1)
    assert not (tmp_path / "out2" / "site-state").exists()


def test_a_refusal_is_announced_at_preflight(tiny_cfg, tmp_path: Path):
    cfg = prepare(private_cfg(tiny_cfg, **FAST, **{"federation.min_sites": 2}), tmp_path)
    grid = RecordingGrid(client_app, nodes_for(tmp_path, policy={1: {"require-secagg": True}}))
    FederatedRun(cfg, tmp_path / "run", grid).execute()
    check = [r for m, r in grid.exchanges if m.metadata.message_type == keys.CHECK]
    reasons = [str(r.content.config_records[keys.DECLINED][keys.REASON]) for r in check
               if keys.DECLINED in r.content]  # fmt: skip
    assert len(reasons) == 1 and "`secagg.enabled` = false" in reasons[0]
    assert "`secagg.enabled` = false" in rows_of(tmp_path / "run")[0]["sites_declined"]["site-1"]


# -- nothing in clear: under each DP level alone, only what the accounting covers leaves --------


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every (message, reply) pair."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exchanges: list[tuple[Message, Message]] = []

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        self.exchanges += [(m, self.replies[i]) for m, i in zip(messages, ids, strict=True)]
        return ids


def reply_keys(reply: Message) -> set[str]:
    """Every record name and every key inside a config or metric record of a reply."""
    content = reply.content
    found = set(content.keys())
    for name, record in [*content.config_records.items(), *content.metric_records.items()]:
        found |= {f"{name}/{k}" for k in record}
    return found


SECAGG_PROTOCOL = "secagg-"  # the protocol's own records (keys, masked vector, shares, signatures)
LEVELS = {
    # name: (privacy tree, secagg on, keys allowed in replies besides the protocol's records)
    "record": (
        {"record": {"enabled": True, "target_epsilon": 8.0}},
        False,
        {"site", "site/name", "site/fingerprint", "metrics", "update",
         "metrics/record-epsilon", "metrics/record-delta"},
    ),
    "institution, server noise": (
        {"institution": {"enabled": True}},
        False,
        {"site", "site/name", "site/fingerprint", "metrics", "update"},
    ),
    "institution, secure aggregation": (
        {"institution": {"enabled": True}},
        True,
        {"site", "site/name", "site/fingerprint", "metrics"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_replies_hold_nothing_outside_the_accounting(tiny_cfg, tmp_path: Path, level):
    privacy, secagg, allowed = LEVELS[level]
    tree = tiny_cfg.model_dump(mode="json")
    del tree["federation"]["weighting"]
    tree["federation"]["rounds"] = 1
    tree["train"].update(local_steps=3, batch_size=8)
    tree.update(privacy=privacy, secagg={"enabled": secagg})
    cfg = prepare(build_config(tree), tmp_path)
    grid = RecordingGrid(client_app, nodes_for(tmp_path))
    if secagg:
        give_identities(grid, nodes_for(tmp_path))
    summary = FederatedRun(cfg, tmp_path / "run", grid).execute()
    if secagg:  # the distributed discrete Gaussian ran, and the statement names it
        assert "distributed discrete Gaussian" in summary["privacy"]["statement"]
        assert summary["privacy"]["ddg_plan"]["min_sites"] == cfg.federation.min_sites
    trained = [r for m, r in grid.exchanges if m.metadata.message_type == keys.TRAIN]
    assert len(trained) == 3 and all((keys.MASKED if secagg else keys.UPDATE) in r.content
                                     for r in trained)  # fmt: skip
    for _, reply in grid.exchanges:
        assert not reply.has_error(), reply.error.reason
        found = {k for k in reply_keys(reply) if not k.split("/")[0].startswith(SECAGG_PROTOCOL)}
        assert found <= allowed, found - allowed
