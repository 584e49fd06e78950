"""End to end: `--set privacy.enabled=true` with secure aggregation on tiny.toml through the real
simulation engine (record-level DP-SGD at the sites, institution-level distributed discrete
Gaussian in the secure sum), then `fedtune privacy-report` on the run folder."""

import json

import pytest

from tests.conftest import SCENARIOS
from tests.e2e.conftest import fedtune

pytestmark = pytest.mark.slow


def test_private_run_and_its_report(tmp_path):
    out, state = tmp_path / "private", tmp_path / "state"
    own_state = [  # each virtual site's ledger in this test's folder, not in ~/.cache
        f"simulation.site_policies.site-{i}.state_dir={state / f'site-{i}'}" for i in range(3)
    ]
    proc = fedtune(
        "simulate", "--config", str(SCENARIOS / "tiny.toml"), "--out", str(out),
        "--set", "privacy.enabled=true", "--set", "secagg.enabled=true",
        *(a for o in own_state for a in ("--set", o)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The real ClientApp processes read the policy files the ServerApp wrote and charged the
    # ledgers named there: two rounds each, nothing under the run folder.
    for i in range(3):
        shown = fedtune("ledger", "show", str(state / f"site-{i}"))
        assert shown.returncode == 0 and "1 run(s), 2 round(s)" in shown.stdout, shown.stdout
    assert not (out / "site-state").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r["record_epsilon"]) == {"site-0", "site-1", "site-2"} for r in rows)
    assert rows[0]["institution_epsilon"] < rows[1]["institution_epsilon"]
    summary = json.loads((out / "summary.json").read_text())
    worst = max(summary["privacy"]["record_epsilon"].values())
    assert 0 < worst <= 8.0 + 1e-6
    report = fedtune("privacy-report", str(out))
    assert report.returncode == 0, report.stderr
    assert f"Each record: ({worst:.2f}" in report.stdout
    assert "Each institution's entire dataset: (" in report.stdout
    # the mechanism that ran is named, with the guarantee against the coordinator beside
    privacy = summary["privacy"]
    assert "distributed discrete Gaussian" in report.stdout
    assert "Against the coordinator itself" in report.stdout
    assert privacy["institution_epsilon_vs_coordinator"] > privacy["institution_epsilon"] > 0
    assert privacy["ddg_plan"]["bits_needed"] <= privacy["ddg_plan"]["modulus_bits"] == 32
