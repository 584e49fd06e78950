"""The empirical privacy audit against a deliberately broken site: DP-SGD that adds no noise
while its accountant still claims epsilon. The audit must refute the claim and publish must
refuse it; an honest run with the same claim must pass. Real round loop, ClientApp in process
(tests/server/inprocess.py), so the patched noise reaches every site."""

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch

import client.dp as site_dp
from cli.audit import analyze, audit_config, write_report
from client.app import app as client_app
from common.core.config import build_config, load_config
from common.core.errors import ConfigError
from common.privacy.discrete_gaussian import SecureRandom
from server.publishing.publish import AuditError, PublishError, publish
from server.run import FederatedRun
from simulations.canaries import SITE_FILE, read_canaries
from simulations.run import prepare
from tests.conftest import SCENARIOS
from tests.server.inprocess import InProcessGrid

pytestmark = pytest.mark.slow
CLAIM = 0.25  # record-level target epsilon of both runs


def dp_audit_cfg(*sets: str):
    cfg = load_config(SCENARIOS / "tiny.toml", ["data.labels=['red','green','blue']", *sets])
    tree = audit_config(cfg, 200).model_dump(mode="json")
    tree["privacy"] = {"enabled": True, "institution": {"enabled": False},
                       "record": {"max_grad_norm": 1.0, "target_epsilon": CLAIM}}  # fmt: skip
    del tree["federation"]["weighting"]
    return build_config(tree)


def keyed_generators(patch: pytest.MonkeyPatch, tag: str) -> None:
    """Every DP-SGD generator of the run (Poisson sampling, noise) keyed in the order the run makes
    them, so the run and its audit statistic are the same every time: unkeyed, the broken run's
    lower bound ranged 0.2-0.9 over runs and one CI run fell under the claim."""
    count = itertools.count()
    patch.setattr(site_dp, "_secure_rng", lambda seed: SecureRandom(
        hashlib.sha256(f"{tag} {next(count)}".encode()).digest()))  # fmt: skip


def run_audit(root: Path, cfg) -> dict:
    cfg = prepare(cfg, root)
    nodes = {
        100 + i: {"data-dir": str(root / "sites" / f"site-{i}"), "site-name": f"site-{i}",
                  "state-dir": str(root / "state" / f"site-{i}"), "partition-id": i}
        for i in range(3)
    }  # fmt: skip
    FederatedRun(cfg, root, InProcessGrid(client_app, nodes)).execute()
    report = analyze(root)
    write_report(report, root / "audit")
    return report


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Enough DP-SGD steps to memorize random-label canaries once nothing hides them."""
    patch = pytest.MonkeyPatch()
    patch.setattr(site_dp, "secure_gaussian", lambda std, ref, rng: torch.zeros_like(ref))
    keyed_generators(patch, "broken")
    try:
        root = tmp_path_factory.mktemp("broken")
        cfg = dp_audit_cfg("federation.rounds=4", "train.local_steps=150",
                           "simulation.partition.max_train_records=150")  # fmt: skip
        return root, run_audit(root, cfg)
    finally:
        patch.undo()


def test_noise_left_out_is_caught(broken):
    root, report = broken
    assert report["claimed"]["epsilon"] == pytest.approx(CLAIM, abs=0.01)  # the false claim
    assert report["epsilon_lower_bound"] > CLAIM and not report["consistent"]
    assert report["mia_auc"] > 0.6  # the canaries were learned
    trained = report["exposure"]["trained"]["mean"]
    assert trained > report["exposure"]["not_trained"]["mean"]
    assert "VIOLATED" in (root / "audit" / "report.md").read_text()


def test_publish_refuses_a_refuted_claim_even_with_force(broken, keys, tmp_path):
    root, _ = broken
    with pytest.raises(AuditError, match="exceeds the claimed epsilon"):
        publish(root, tmp_path / "m", keys[0], audit=root / "audit", force=True)
    assert not (tmp_path / "m").exists()


def test_an_honest_run_with_the_same_claim_is_consistent(tmp_path, keys, monkeypatch):
    keyed_generators(monkeypatch, "honest")
    report = run_audit(tmp_path / "honest", dp_audit_cfg())
    assert report["consistent"] and report["epsilon_lower_bound"] <= CLAIM
    assert report["claimed"]["epsilon"] <= CLAIM + 0.01
    included = [c for c in read_canaries(tmp_path / "honest") if c.included]
    on_disk = sum(
        len((p / SITE_FILE).read_text().splitlines())
        for p in (tmp_path / "honest" / "sites").iterdir() if (p / SITE_FILE).is_file()
    )  # fmt: skip
    assert on_disk == len(included) > 0  # exactly the included canaries were trained on
    publish(tmp_path / "honest", tmp_path / "m", keys[0], audit=tmp_path / "honest" / "audit",
            force=True)  # fmt: skip
    card = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert "## Empirical privacy audit" in card and f"{report['epsilon_lower_bound']:.3f}" in card
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["audit"]["epsilon_lower_bound"] == report["epsilon_lower_bound"]


def test_an_audit_of_another_run_or_round_is_refused(broken, keys, tmp_path):
    root, report = broken
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**report, "run_id": "someone-else"}))
    with pytest.raises(PublishError, match="not of this run"):
        publish(root, tmp_path / "m", keys[0], audit=other)
    other.write_text(json.dumps({**report, "round": 1}))
    with pytest.raises(PublishError, match="round 1"):
        publish(root, tmp_path / "m", keys[0], audit=other)


def test_settings_that_would_drop_canaries_are_refused(tiny_cfg):
    for field, named in (("data.eval_fraction=0.2", "eval_fraction"),
                         ("data.prepare.dedup.enabled=true", "data.prepare")):  # fmt: skip
        cfg = load_config(SCENARIOS / "tiny.toml", [field])
        with pytest.raises(ConfigError, match=named):
            audit_config(cfg)
    with pytest.raises(ConfigError, match="at least 20"):
        audit_config(tiny_cfg, 5)
