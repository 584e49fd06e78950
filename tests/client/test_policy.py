"""A site's own policy and its ledger: read from what the site controls, enforced whatever the
run config asks, one ledger per dataset composing every run; `fedtune ledger` on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app as cli
from client.policy import SitePolicy, read_policy, refusals
from client.privacy_site import (
    SiteLedger,
    admit,
    budget_refusal,
    ledger_path,
    ledger_report,
    open_ledger,
    round_steps,
)
from client.site import SiteInfo
from common.core.config import build_config
from common.core.errors import ConfigError, PrivacyError
from common.privacy.accounting import GaussianAccountant, default_delta, record_plan

RECORDS = 80


def dp_config(**record):
    tree = {"train": {"batch_size": 8, "local_steps": 20}, "federation": {"rounds": 2}}
    tree["privacy"] = {"record": {"enabled": True, "noise_multiplier": 1.0, **record}}
    return build_config(tree)


def spend(ledger: SiteLedger, run: str, policy: SitePolicy, rounds: int = 1, **record) -> None:
    plan = record_plan(dp_config(**record), RECORDS)
    for _ in range(rounds):
        ledger.charge(run, round_steps(plan), plan, policy)


# -- the policy: where it comes from -----------------------------------------------------------


def test_node_config_keys_with_the_old_budget_alias():
    policy = read_policy(
        {"budget-epsilon": "4.5", "require-secagg": "true", "site-name": "a", "partition-id": 0}
    )
    assert policy.max_epsilon == 4.5 and policy.require_secagg is True
    assert policy.record_dp_required  # a cap means record-level DP is required
    assert read_policy({}).record_dp_required is False  # no cap: not required by default


def test_policy_file_is_strict_relative_state_dir_and_node_config_wins(tmp_path: Path):
    file = tmp_path / "conf" / "policy.toml"
    file.parent.mkdir()
    file.write_text('max-epsilon = 3.0\nmin_noise_multiplier = 0.7\nstate-dir = "ledger"\n')
    policy = read_policy({"max-epsilon": 2.0}, file)
    assert policy.max_epsilon == 2.0 and policy.min_noise_multiplier == 0.7
    assert policy.ledger_dir("a") == tmp_path / "conf" / "ledger"  # beside the file, not cwd
    file.write_text("max-epsilion = 3.0\n")
    with pytest.raises(ConfigError, match="max_epsilion"):
        read_policy({}, file)
    with pytest.raises(ConfigError, match="does not exist"):
        read_policy({}, tmp_path / "missing.toml")


def test_a_cap_without_record_dp_is_contradictory():
    with pytest.raises(ConfigError, match="max_epsilon"):
        read_policy({"max-epsilon": 5, "require-record-dp": False})
    with pytest.raises(ConfigError, match="dataset_id"):
        read_policy({"dataset-id": "../elsewhere"})


def test_virtual_site_reads_its_policy_file_and_keeps_its_ledger_out_of_the_run_folder(
    tiny_cfg, tmp_path: Path, monkeypatch
):
    from simulations.run import write_policies

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    tree = tiny_cfg.model_dump(mode="json")
    tree["simulation"]["site_policy"] = {"max_epsilon": 9.0}
    tree["simulation"]["site_policies"] = {"site-1": {"require_secagg": True}}
    cfg = build_config(tree)
    for out in (tmp_path / "out1", tmp_path / "out2"):
        write_policies(cfg, out, ["site-0", "site-1"])
        sites = [
            SiteInfo.from_node_config({"partition-id": i}, str(out / "sites"), "run")
            for i in range(2)
        ]
        assert sites[0].policy.max_epsilon == 9.0 and not sites[0].policy.require_secagg
        assert sites[1].policy.require_secagg and sites[1].policy.max_epsilon is None
        for site in sites:  # the same folder whatever the run folder: no fresh budget
            assert site.ledger_dir == (
                tmp_path / "state-home" / "fedtune" / "site-state" / cfg.name / site.name
            )
            assert site.legacy_dirs == (out / "site-state" / site.name,)


# -- the policy: the coordinator can only ask for more ------------------------------------------


@pytest.mark.parametrize(
    ("policy", "tree", "named"),
    [
        ({"max_epsilon": 5.0}, {}, "`privacy.record.enabled` = false"),
        ({"max_delta": 1e-6}, {"record": {"delta": 1e-5}}, "`max-delta`"),
        ({}, {"record": {"delta": 1e-3}}, "min(1e-5, 1/(10 records))"),
        ({"min_noise_multiplier": 1.5}, {"record": {"noise_multiplier": 1.0}}, "floor 1.5"),
        ({"require_secagg": True}, {}, "`secagg.enabled`"),
        ({"accept_server_noise": False}, {"institution": {"enabled": True}}, "accept-server-noise"),
    ],
)
def test_each_way_of_asking_for_less_is_refused_by_name(policy, tree, named):
    privacy = {k: {"enabled": True, **v} for k, v in tree.items()}
    if "record" in privacy:
        privacy["record"].setdefault("noise_multiplier", 1.0)
    cfg = build_config({"train": {"batch_size": 8}, "privacy": privacy})
    site = SitePolicy(**policy)
    plan = record_plan(cfg, RECORDS) if cfg.privacy.record.enabled else None
    found = refusals(site, cfg, plan)
    assert len(found) == 1 and named in found[0]


def test_more_protection_than_asked_for_is_accepted():
    site = SitePolicy(max_delta=1e-5, min_noise_multiplier=1.0, require_secagg=True)
    cfg = build_config(
        {
            "train": {"batch_size": 8},
            "secagg": {"enabled": True},
            "privacy": {"record": {"enabled": True, "noise_multiplier": 2.0, "delta": 1e-7}},
        }
    )
    assert refusals(site, cfg, record_plan(cfg, RECORDS)) == []


def test_delta_at_or_above_one_over_records_is_refused_naming_the_field():
    with pytest.raises(PrivacyError, match=r"`privacy.record.delta` \(0.5\)"):
        record_plan(dp_config(delta=0.5), RECORDS)
    # the site declines (the reason reaches the coordinator), whatever its own max-delta says
    plan, reason = admit(SitePolicy(max_delta=0.9), None, dp_config(delta=0.5), RECORDS, "r")
    assert plan is None and reason and "`privacy.record.delta`" in reason
    assert str(RECORDS) not in reason  # the reason names no record count


def test_a_coordinator_raising_the_sample_rate_is_declined_by_the_sites_cap(tmp_path: Path):
    """An adversarial coordinator keeps the noise and asks every site to sample nearly all its
    records per step (`privacy.record.sample_rate`): the site's plan is accounted at that rate,
    so its cap declines the very first round, and nothing is charged."""
    honest = record_plan(dp_config(), RECORDS)  # batch 8 of 80: rate 0.1, 40 steps
    policy = SitePolicy(max_epsilon=honest.epsilon * 1.01)
    greedy = dp_config(sample_rate=0.95)
    with open_ledger(tmp_path, "default") as ledger:
        plan, reason = admit(policy, ledger, greedy, RECORDS, "run")
        assert plan is not None and plan.sample_rate == 0.95 and plan.epsilon > 5 * honest.epsilon
        assert reason and "max-epsilon" in reason
        assert ledger.accountant().history == []
        plan, reason = admit(policy, ledger, dp_config(), RECORDS, "run")
        assert reason is None  # the honest plan fits the same cap


# -- the ledger ---------------------------------------------------------------------------------


def test_runs_compose_in_one_history_tighter_than_summing(tmp_path: Path):
    policy = SitePolicy(max_epsilon=100.0)
    with open_ledger(tmp_path, "default") as ledger:
        spend(ledger, "run-a", policy, rounds=2)
        spend(ledger, "run-b/with/slashes", policy, rounds=1)
    reloaded = SiteLedger.load(tmp_path, "default")  # a restart: the file alone
    plan = record_plan(dp_config(), RECORDS)
    reference = GaussianAccountant("rdp")
    reference.step(noise_multiplier=1.0, sample_rate=plan.sample_rate, steps=3 * 20)
    total = reloaded.accountant().epsilon(plan.delta)
    assert total == pytest.approx(reference.epsilon(plan.delta), rel=1e-12)
    runs = [reloaded.run_accountant(k).epsilon(plan.delta) for k in reloaded.runs]
    assert total < sum(runs)
    assert reloaded.rounds == 3 and sorted(p.name for p in tmp_path.iterdir()) == [
        ".ledger-default.lock",
        "ledger-default.json",
    ]  # one file per dataset, whatever the run ids; no temporary file left


def test_budget_is_over_all_runs_whatever_the_run_id(tmp_path: Path):
    first = SitePolicy()
    with open_ledger(tmp_path, "default") as ledger:
        spend(ledger, "run-1", first)
    spent = ledger.accountant().epsilon(default_delta(RECORDS))  # the site's default delta
    capped = SitePolicy(max_epsilon=spent * 1.01)
    plan = record_plan(dp_config(), RECORDS)
    for run in ("run-1", "run-2", "a/b/../c", ""):
        reason = budget_refusal(ledger, capped, plan, run, run_cap=None)
        assert reason and "over all runs" in reason and "`max-epsilon`" in reason
    # the run's own cap (`privacy.record.budget_epsilon`) counts only this run's spending
    assert budget_refusal(ledger, first, plan, "run-2", run_cap=spent * 1.01) is None
    assert "budget_epsilon" in str(budget_refusal(ledger, first, plan, "run-1", spent * 1.01))


def test_old_accountant_files_are_read_in_once(tmp_path: Path):
    old = GaussianAccountant("rdp")
    old.step(noise_multiplier=1.0, sample_rate=0.1, steps=100)
    (tmp_path / "accountant-abc.json").write_bytes(old.to_bytes())
    (tmp_path / "accountant-x").mkdir()  # run id "x/y" of an older fedtune
    (tmp_path / "accountant-x" / "y.json").write_bytes(old.to_bytes())
    legacy_sim = tmp_path / "out" / "site-state" / "site-0"
    legacy_sim.mkdir(parents=True)
    (legacy_sim / "accountant-sim.json").write_bytes(old.to_bytes())
    twice = GaussianAccountant("rdp")
    twice.history = [(1.0, 0.1, 300)]
    with open_ledger(tmp_path, "default", [legacy_sim]) as ledger:
        assert ledger.accountant().epsilon(1e-5) == pytest.approx(twice.epsilon(1e-5))
        spend(ledger, "new", SitePolicy())
    again = SiteLedger.load(tmp_path, "default", [legacy_sim])
    assert len(again.runs) == 4 and len(again.migrated) == 3  # not read in a second time


def test_a_corrupt_ledger_refuses_rather_than_starting_fresh(tmp_path: Path):
    ledger_path(tmp_path, "default").write_text("{not json")
    with pytest.raises(PrivacyError, match="unreadable"):
        SiteLedger.load(tmp_path, "default")


# -- fedtune ledger show / reset --------------------------------------------------------------


def test_ledger_show_and_reset_through_the_cli(tmp_path: Path):
    state = tmp_path / "state"
    with open_ledger(state, "notes") as ledger:
        spend(ledger, "run-1", SitePolicy(max_epsilon=50.0), rounds=2)
    spent = ledger_report(state)[0].epsilon
    runner = CliRunner()
    shown = runner.invoke(cli, ["ledger", "show", str(state)])
    assert shown.exit_code == 0, shown.output
    assert f"dataset notes: 1 run(s), 2 round(s), epsilon {spent:.3f}" in shown.output
    assert f"{50.0 - spent:.3f} left of 50.000" in shown.output
    assert "run run-1: 2 round(s)" in shown.output

    refused = runner.invoke(cli, ["ledger", "reset", str(state), "--dataset", "notes"])
    assert refused.exit_code == 2 and ledger_report(state)[0].epsilon == spent
    unknown = runner.invoke(cli, ["ledger", "reset", str(state), "--dataset", "other", "--yes"])
    assert unknown.exit_code == 2 and "no ledger for dataset `other`" in unknown.output

    done = runner.invoke(cli, ["ledger", "reset", str(state), "--dataset", "notes", "--yes"])
    assert done.exit_code == 0 and f"epsilon {spent:.3f}" in done.output
    after = ledger_report(state)[0]
    assert after.epsilon == 0 and after.rounds == 0 and len(after.resets) == 1
    assert json.loads((state / "ledger-notes.json").read_text())["runs"] == {}
    assert "reset by the operator" in runner.invoke(cli, ["ledger", "show", str(state)]).output


def test_privacy_report_plan_shows_each_sites_policy_check(tmp_path: Path, monkeypatch):
    from tests.conftest import SCENARIOS

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    result = CliRunner().invoke(
        cli,
        [
            "privacy-report", "--plan", str(SCENARIOS / "tiny.toml"),
            "--set", "privacy.enabled=true",
            "--set", "simulation.site_policies={site-1 = {require_secagg = true}, "
            "site-2 = {max_epsilon = 0.5}}",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    checks = result.output.split("Each site's own policy")[1].splitlines()[1:]
    lines = {line.split(":")[0].strip(): line for line in checks}
    assert "site-0: pass" in lines["site-0"]
    assert "refuse" in lines["site-1"] and "`secagg.enabled`" in lines["site-1"]
    assert "refuse" in lines["site-2"] and "`max-epsilon`" in lines["site-2"]
