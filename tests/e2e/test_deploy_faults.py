"""Faults on Flower's Deployment Engine: real processes on 127.0.0.1, TLS and node authentication.

- kill -9 one SuperNode in the middle of round 2: the run completes with the other sites and the
  summary records the dropout;
- kill -9 the server side (SuperLink and the ServerApp it started) after round 2, start the
  SuperLink again and `flwr run` with ``resume=true``: every round exactly once;
- a patched ClientApp (tests/e2e/patched_app) sends malformed updates: they are rejected and the run
  completes. This one runs the SuperNodes in Flower's default isolation (a fresh `flwr-clientapp`
  per message), the others with `fedtune site-exec`.

Every process, and everything Flower detached, is stopped by PID in teardown.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.identity.certs import CaPaths, init_ca, site_keys
from deploy.loopback import LoopbackFederation, Started, prepare_sites
from tests.conftest import ROOT, SCENARIOS

pytestmark = pytest.mark.slow
SITES = ["site-0", "site-1", "site-2"]
RUN_TIMEOUT_S = 480.0
PATCHED_APP = Path(__file__).parent / "patched_app"


@dataclass
class Federation:
    fed: LoopbackFederation
    ca: CaPaths
    nodes: dict[str, Started]
    work: Path
    overrides: list[str]

    def run_config(self, **extra: Any) -> dict[str, Any]:
        return {
            "scenario": str(SCENARIOS / "tiny.toml"),
            "out": str(self.work / "out"),
            "overrides": ";".join(self.overrides),
            "simulate-sites": False,
            **extra,
        }

    def rows(self) -> list[dict[str, Any]]:
        path = self.work / "out" / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def summary(self) -> dict[str, Any]:
        return json.loads((self.work / "out" / "summary.json").read_text())


@pytest.fixture
def federation(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Federation]:
    """SuperLink (TLS, node auth) + three registered SuperNodes; the run is the test's to start."""
    marker = request.node.get_closest_marker("federation")
    opts: dict[str, Any] = dict(marker.kwargs) if marker else {}
    overrides = prepare_sites(SCENARIOS / "tiny.toml", tmp_path / "data", opts.get("overrides"))
    ca = init_ca(tmp_path / "certs", [], [])
    keys = {n: site_keys(tmp_path / "keys", n) for n in SITES}
    fed = LoopbackFederation(
        tmp_path / "federation", app_dir=opts.get("app_dir", ROOT), warm=opts.get("warm", True)
    )
    try:
        fed.start_superlink(ca.ca_cert, ca.server_cert, ca.server_key)
        fed.register([k.public_key for k in keys.values()])
        nodes = {
            n: fed.start_supernode(
                n, tmp_path / "data" / "sites" / n, keys[n].private_key, ca.ca_cert
            )
            for n in SITES
        }
        yield Federation(fed, ca, nodes, tmp_path, overrides)
    finally:
        fed.close()
        left = fed.leftover()
        assert not left, f"processes outlived the teardown: {left}"


def wait_for(what: str, check: Callable[[], bool], timeout: float, run: Started) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if run.proc.poll() is not None:
            pytest.fail(
                f"the run ended ({run.proc.returncode}) before {what}:\n{run.text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s:\n{run.text()[-3000:]}")
        time.sleep(0.2)


def finish(run: Started) -> None:
    try:
        rc = run.proc.wait(timeout=RUN_TIMEOUT_S)
    except Exception:
        pytest.fail(f"the run is still going after {RUN_TIMEOUT_S:.0f} s:\n{run.text()[-3000:]}")
    assert rc == 0, run.text()[-4000:]


def tasks_started(f: Federation, site: str) -> int:
    log = f.fed.logs / f"site-exec-{site}.log"
    return log.read_text(errors="replace").count("ClientApp process") if log.is_file() else 0


KILL_SETTINGS = ["federation.rounds=4", "federation.min_sites=2", "federation.round_timeout_s=45"]


def kill_site_2_in_round_2(f: Federation, tasks_before_round_2: int) -> Started:
    run = f.fed.spawn("flwr-run", f.fed.flwr_run_cmd(f.run_config()), cwd=ROOT)
    wait_for(
        "round-2 training at site-2",
        lambda: tasks_started(f, "site-2") > tasks_before_round_2,
        300,
        run,
    )
    assert len(f.rows()) == 1
    os.kill(f.nodes["site-2"].proc.pid, signal.SIGKILL)
    f.nodes["site-2"].proc.wait()
    finish(run)
    rows = f.rows()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["sites"] == SITES
    for row in rows[1:]:
        assert row["sites"] == ["site-0", "site-1"], row
    summary = f.summary()
    assert summary["rounds"] == 4
    assert set(summary["dropouts"]) == {"site-2"}, summary["dropouts"]
    assert summary["dropouts"]["site-2"]["rounds"] == [2, 3, 4], summary["dropouts"]
    assert "site-2" in run.text()  # the coordinator's log names the site that dropped
    return run


@pytest.mark.federation(overrides=KILL_SETTINGS)
def test_supernode_killed_mid_round_run_completes_and_records_the_dropout(f: Federation) -> None:
    # site-2's tasks: preflight check, round 1, round 2 (killed while it trains).
    kill_site_2_in_round_2(f, tasks_before_round_2=2)
    rows = f.rows()
    assert "site-2" in rows[1]["sites_failed"]
    for row in rows[2:]:
        assert "site-2" in row["sites_failed"] or "site-2" in row["sites_offline"], row


@pytest.mark.federation(overrides=[*KILL_SETTINGS, "secagg.enabled=true"])
def test_supernode_killed_under_secure_aggregation_takes_the_dropout_path(f: Federation) -> None:
    # site-2's tasks: check; keys, train, survivor-list signature and unmask of round 1 (SecAgg:
    # four site calls a round, docs/secure-aggregation.md); keys and train of round 2 (killed).
    kill_site_2_in_round_2(f, tasks_before_round_2=6)
    rows = f.rows()
    # It sent its keys for round 2, then vanished: the others' shares remove its masks.
    assert rows[1]["secagg_dropped"] == {"site-2": "train"}, rows[1]
    # Whichever comes first: our round timeout, or the SuperLink answering for the dead node
    # after two missed heartbeats.
    assert list(rows[1]["sites_failed"]) == ["site-2"], rows[1]
    reason = rows[1]["sites_failed"]["site-2"]
    assert reason in {
        "secagg train: no reply within `federation.round_timeout_s`",
        "secagg train: Error: Node Unavailable — The destination node failed to report a "
        "heartbeat within 2 × its expected interval.",
    }, reason
    for row in rows[2:]:
        assert "site-2" in row["secagg_dropped"] or "site-2" in row["sites_offline"], row


@pytest.mark.federation(overrides=["federation.rounds=4"])
def test_server_side_killed_then_resumed_runs_every_round_once(f: Federation) -> None:
    run = f.fed.spawn("flwr-run", f.fed.flwr_run_cmd(f.run_config()), cwd=ROOT)
    ckpt = f.work / "out" / "checkpoint.json"

    def round_2_done() -> bool:
        try:
            return int(json.loads(ckpt.read_text())["round"]) >= 2
        except (OSError, ValueError, KeyError):
            return False

    wait_for("checkpoint of round 2", round_2_done, 300, run)
    assert f.fed.superlink is not None
    killed = f.fed.kill_tree(f.fed.superlink)  # SuperLink, its SuperExec and the ServerApp
    assert len(killed) >= 2, killed
    try:
        run.proc.wait(timeout=30)  # `flwr run --stream` lost its SuperLink
    except Exception:
        run.proc.kill()  # (or it keeps retrying: the engineer's Ctrl-C)
        run.proc.wait()
    done = int(json.loads(ckpt.read_text())["round"])
    assert 2 <= done < 4 and not (f.work / "out" / "summary.json").exists()
    rounds_dir = f.work / "out" / "rounds"
    adapter = "adapter_model.safetensors"
    before = {r: (rounds_dir / str(r) / adapter).stat().st_mtime_ns for r in range(1, done + 1)}
    rows_before = f.rows()[:done]

    f.fed.start_superlink(f.ca.ca_cert, f.ca.server_cert, f.ca.server_key, restart=True)
    resumed = f.fed.spawn(
        "flwr-run-resume", f.fed.flwr_run_cmd(f.run_config(resume=True)), cwd=ROOT
    )
    finish(resumed)
    rows = f.rows()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]  # none lost, none applied twice
    assert all(r["sites"] == SITES for r in rows), rows
    summary = f.summary()
    assert summary["rounds"] == 4 and summary["dropouts"] == {}
    assert rows[:done] == rows_before  # the completed rounds' records are kept as they were
    # ... and their adapters were not trained or written again
    after = {r: (rounds_dir / str(r) / adapter).stat().st_mtime_ns for r in range(1, done + 1)}
    assert after == before
    assert sorted(p.name for p in rounds_dir.iterdir()) == ["1", "2", "3", "4"]


@pytest.mark.federation(
    overrides=["federation.rounds=3", "federation.min_sites=2"], app_dir=PATCHED_APP, warm=False
)
def test_malformed_updates_from_a_patched_client_are_rejected(f: Federation) -> None:
    run = f.fed.spawn("flwr-run", f.fed.flwr_run_cmd(f.run_config()), cwd=PATCHED_APP)
    finish(run)
    rows = f.rows()
    assert [r["round"] for r in rows] == [1, 2, 3]
    expected = {1: "nan or inf", 2: "got float32 (3, 3)", 3: "wrong keys"}
    for row in rows:
        assert row["sites"] == ["site-0", "site-2"], row
        reason = row["sites_failed"]["site-1"]
        assert reason.startswith("malformed update rejected"), reason
        assert expected[row["round"]] in reason.lower(), reason
    assert f.summary()["dropouts"]["site-1"]["rounds"] == [1, 2, 3]
    assert "malformed update rejected" in run.text()


@pytest.fixture
def f(federation: Federation) -> Federation:
    return federation
