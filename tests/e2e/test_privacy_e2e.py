"""End to end: `--set privacy.enabled=true` on tiny.toml through the real simulation engine, then
`fedtune privacy-report` on the run folder."""

import json

import pytest

from tests.conftest import SCENARIOS
from tests.e2e.conftest import fedtune

pytestmark = pytest.mark.slow


def test_private_run_and_its_report(tmp_path):
    out = tmp_path / "private"
    proc = fedtune(
        "simulate", "--config", str(SCENARIOS / "tiny.toml"), "--out", str(out),
        "--set", "privacy.enabled=true",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
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
