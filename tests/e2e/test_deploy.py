"""End to end on Flower's Deployment Engine: real processes on 127.0.0.1, TLS, node authentication.

One SuperLink (TLS, `--enable-supernode-auth`), four keys on its allow-list, three SuperNodes
(site-0..2) that run tiny.toml to completion through `flwr run . <federation> --stream`; meanwhile a
SuperNode whose key is not on the allow-list and one without the CA certificate try to join and
are refused. Every process (and what Flower detaches) is stopped by PID in the fixture's teardown.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.identity.certs import CaPaths, SiteKeyPaths, init_ca, site_keys
from deploy.loopback import LoopbackFederation, Started, prepare_sites
from tests.conftest import ROOT, SCENARIOS

pytestmark = pytest.mark.slow
SITES = ["site-0", "site-1", "site-2"]
RUN_TIMEOUT_S = 420.0
REFUSAL_TIMEOUT_S = 90.0


@dataclass
class Deployment:
    fed: LoopbackFederation
    ca: CaPaths
    keys: dict[str, SiteKeyPaths]
    out: Path
    run: Started
    stranger: Started
    no_ca: Started


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("deploy")
    overrides = prepare_sites(SCENARIOS / "tiny.toml", work / "data")
    ca = init_ca(work / "certs", [], [])
    keys = {n: site_keys(work / "keys", n) for n in [*SITES, "no-ca", "stranger"]}
    fed = LoopbackFederation(work / "federation", secure=True, app_dir=ROOT)
    try:
        fed.start_superlink(ca.ca_cert, ca.server_cert, ca.server_key)
        # Allow-list: every key but the stranger's (no-ca is listed: only TLS stops it).
        fed.register([keys[n].public_key for n in [*SITES, "no-ca"]])
        for n in SITES:
            fed.start_supernode(n, work / "data" / "sites" / n, keys[n].private_key, ca.ca_cert)
        bounded = ["--max-retries", "1", "--max-wait-time", "30"]
        stranger = fed.start_supernode(
            "stranger", work / "data" / "sites" / "site-0", keys["stranger"].private_key,
            ca.ca_cert, bounded, warm=False,
        )  # fmt: skip
        no_ca = fed.start_supernode(
            "no-ca",
            work / "data" / "sites" / "site-1",
            keys["no-ca"].private_key,
            None,
            bounded,
            warm=False,
        )
        out = work / "out"
        run_config = {
            "scenario": str(SCENARIOS / "tiny.toml"),
            "out": str(out),
            "overrides": ";".join(overrides),
            "simulate-sites": False,
        }
        run = fed.spawn("flwr-run", fed.flwr_run_cmd(run_config), cwd=ROOT)
        yield Deployment(fed, ca, keys, out, run, stranger, no_ca)
    finally:
        fed.close()
        left = fed.leftover()
        assert not left, f"processes outlived the teardown: {left}"


def _exit(started: Started, timeout: float) -> int:
    try:
        return started.proc.wait(timeout=timeout)
    except Exception:
        pytest.fail(
            f"{started.name} still running after {timeout:.0f} s:\n{started.text()[-2000:]}"
        )


def test_supernode_not_on_allow_list_is_refused(deployment: Deployment) -> None:
    rc = _exit(deployment.stranger, REFUSAL_TIMEOUT_S)
    log = deployment.stranger.text()
    assert rc != 0, log[-2000:]
    assert "Failed to activate SuperNode" in log, log[-2000:]


def test_client_without_ca_certificate_cannot_connect(deployment: Deployment) -> None:
    rc = _exit(deployment.no_ca, REFUSAL_TIMEOUT_S)
    log = deployment.no_ca.text()
    assert rc != 0, log[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-2000:]
    # The `flwr` CLI without the CA certificate (system trust store only) is refused too.
    cfg = deployment.fed.flwr_home / "config.toml"
    text = cfg.read_text(encoding="utf-8")
    address = f"127.0.0.1:{deployment.fed.port}"
    cfg.write_text(text + f'\n[superlink.no-ca]\naddress = "{address}"\n', encoding="utf-8")
    cli = deployment.fed.spawn("flwr-ls-no-ca", ["flwr", "supernode", "ls", "no-ca"])
    assert _exit(cli, 60) != 0, cli.text()[-2000:]
    assert "unavailable" in cli.text(), cli.text()[-2000:]
    # (With the CA certificate the same command works: see `nodes()` in the run test.)


def test_tiny_runs_to_completion_with_tls_and_node_auth(deployment: Deployment) -> None:
    started = time.monotonic()
    rc = _exit(deployment.run, RUN_TIMEOUT_S)
    run_log = deployment.run.text()
    assert rc == 0, run_log[-4000:]
    out = deployment.out
    assert (out / "summary.json").is_file(), run_log[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(sorted(r["sites"]) == SITES and r["sites_failed"] == {} for r in rows)
    assert not (out / "sites").exists()  # the coordinator wrote no virtual sites of its own
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and sorted(summary["sites"]) == SITES
    # Only allow-listed keys are known to the SuperLink; the three sites were the ones online.
    nodes = deployment.fed.nodes()
    online = [n for n in nodes if str(n.get("status", "")).lower() == "online"]
    assert len(nodes) == 4 and len(online) == 3, nodes
    print(f"flwr run finished {time.monotonic() - started:.0f} s after the refusal checks")
