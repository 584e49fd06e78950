"""End to end: `fedtune audit` through Flower's real simulation runtime, its report, re-scoring
a finished audit, and `fedtune publish --audit --evaluation` writing both into the card."""

import json

import pytest

from tests.conftest import SCENARIOS
from tests.e2e.conftest import fedtune

pytestmark = pytest.mark.slow


def test_audit_then_publish_with_the_audit_and_an_evaluation(tmp_path):
    run = tmp_path / "run"
    proc = fedtune("audit", str(run), "--config", str(SCENARIOS / "tiny.toml"), "--canaries", "40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "claimed none" in proc.stdout and "consistent" in proc.stdout
    report = json.loads((run / "audit" / "report.json").read_text())
    assert report["claimed"] is None and report["consistent"]  # no DP: nothing to refute
    assert report["one_run"]["loss"]["canaries"] == 40
    assert 0.0 <= report["record_membership"]["loss"]["auc"] <= 1.0
    canaries = (run / "audit" / "canaries.jsonl").read_text().splitlines()
    assert len(canaries) == 40
    md = (run / "audit" / "report.md").read_text()
    assert "no differential privacy" in md and "## Membership inference" in md
    # re-scoring the finished run gives the same report; a changed training is refused
    proc = fedtune("audit", str(run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((run / "audit" / "report.json").read_text())
    assert again["one_run"] == report["one_run"]
    proc = fedtune("audit", str(run), "--canaries", "50")
    assert proc.returncode == 2 and "--config" in proc.stderr
    proc = fedtune("evaluate", str(run), "--data", str(run / "test"), "--out",
                   str(tmp_path / "eval"), "--latency-requests", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = tmp_path / "keys"
    assert fedtune("keys", "generate", "--out", str(keys)).returncode == 0
    key = next(keys.glob("*key.pem"))
    model = tmp_path / "model"
    proc = fedtune("publish", str(run), "--out", str(model), "--signing-key", str(key),
                   "--audit", str(run / "audit" / "report.json"),
                   "--evaluation", str(tmp_path / "eval"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = (model / "MODEL_CARD.md").read_text()
    assert "## Empirical privacy audit" in card and "## Evaluation report" in card
    assert "| p95 latency per request |" in card
