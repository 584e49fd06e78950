"""The live view of a run (server/status.py): status.json, Prometheus metrics, the status page's
data, `fedtune status`, and the Grafana dashboard's queries against what is exported."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from cli.main import app as cli
from client.app import app as client_app
from common.core.errors import RoundError
from server.run import FederatedRun
from server.serving.metrics import Metrics
from server.status import Monitor
from tests.server.inprocess import InProcessGrid
from tests.server.test_run import setup_run

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana" / "dashboards" / "fedtune.json"


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}, parsed by prometheus_client."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics_and_status_follow_the_run_and_fedtune_status_reads_it(tiny_cfg, tmp_path):
    cfg, nodes = setup_run(tiny_cfg, tmp_path)
    monitor = Monitor("127.0.0.1", 0)
    base = f"http://127.0.0.1:{monitor.port}"
    seen: list[dict] = []

    def during(row: dict) -> None:  # after each round's row, while the run goes on
        code, kind, text = get(base + "/metrics")
        assert code == 200 and kind.startswith("text/plain")
        values = samples(text)
        page = json.loads(get(base + "/status.json")[2])
        seen.append({"round": values[("fedtune_round", ())], "page": page, "values": values})

    try:
        run = FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes),
                           on_round=during, monitor=monitor)  # fmt: skip
        run.execute()
        final = samples(get(base + "/metrics")[2])
        _, kind, html = get(base + "/")
    finally:
        monitor.close()
    assert [s["round"] for s in seen] == [1.0, 2.0]
    first = seen[0]["values"]
    assert first[("fedtune_sites", (("state", "replied"),))] == 3  # all three answered round 1
    assert first[("fedtune_rounds_planned", ())] == 2
    assert first[("fedtune_sites_asked", ())] == 0  # the round's exchanges are over
    assert [[r["round"] for r in s["page"]["rounds"]] for s in seen] == [[1], [1, 2]]
    assert seen[0]["page"]["status"]["sites"] == {f"site-{i}": "replied" for i in range(3)}
    assert final[("fedtune_phase", (("phase", "done"),))] == 1
    assert final[("fedtune_phase", (("phase", "training"),))] == 0
    assert final[("fedtune_round_metric", (("name", "eval_loss"),))] > 0
    assert kind.startswith("text/html") and "fedtune" in html and "status.json" in html
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["phase"] == "done" and status["round"] == 2 and status["error"] is None
    shown = CliRunner().invoke(cli, ["status", str(tmp_path / "run")])
    assert shown.exit_code == 0, shown.output
    assert "round 2/2" in shown.output and "[" + "#" * 20 + "]" in shown.output
    assert "done" in shown.output and "round 1, eval_loss" in shown.output


def test_a_failed_run_says_so_in_its_status(tiny_cfg, tmp_path):
    cfg, nodes = setup_run(tiny_cfg, tmp_path, {"min_sites": 3})
    nodes.pop(102)  # two sites connect, three are needed
    import server.run as run_module

    run_module_wait = run_module.NODE_WAIT_S
    run_module.NODE_WAIT_S = 0.5
    try:
        with pytest.raises(RoundError):
            FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes)).execute()
    finally:
        run_module.NODE_WAIT_S = run_module_wait
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["phase"] == "failed" and "only 2 site(s) connected" in status["error"]
    shown = CliRunner().invoke(cli, ["status", str(tmp_path / "run")])
    assert shown.exit_code == 0 and "failed: RoundError" in shown.output
    missing = CliRunner().invoke(cli, ["status", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "status.json" in missing.output


def exported_names() -> set[str]:
    """Every sample name the coordinator's and `fedtune serve`'s registries can export."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum",
                "_created"], "gauge": [""], "info": ["_info"]}  # fmt: skip
    monitor = Monitor("127.0.0.1", 0)
    try:
        from client.site_metrics import SiteMetrics

        site = SiteMetrics(Path("/nonexistent"))
        registries = [monitor.registry, Metrics(lambda: 0, lambda: 0).registry, site.registry]
        names = set()
        for registry in registries:
            for fam in registry.collect():
                names |= {fam.name + s for s in suffixes.get(fam.type, [""])}
        return names
    finally:
        monitor.close()


def test_every_dashboard_query_names_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    names = exported_names()
    for expr in exprs:
        used = set(re.findall(r"\bfedtune_[a-z_]+", expr))
        assert used and used <= names, (expr, used - names)
    # every coordinator gauge is on the dashboard
    serving = ("fedtune_request", "fedtune_prompt", "fedtune_generated", "fedtune_batch",
               "fedtune_queue", "fedtune_model", "fedtune_site_")  # fmt: skip
    monitor_names = {n for n in names if not n.startswith(serving)}
    assert monitor_names <= {n for e in exprs for n in re.findall(r"\bfedtune_[a-z_]+", e)}
    prometheus = (ROOT / "deploy" / "monitoring" / "prometheus.yml").read_text()
    assert "127.0.0.1:9464" in prometheus and "127.0.0.1:9465" in prometheus
    assert {n for n in names if n.startswith("fedtune_site_")} - {"fedtune_site_tasks_created"} <= {
        n for e in exprs for n in re.findall(r"\bfedtune_[a-z_]+", e)
    }


PROMETHEUS = "/usr/bin/prometheus"


def test_a_real_prometheus_scrapes_the_coordinator_and_answers_for_the_round(tmp_path):
    """Debian's Prometheus, on 127.0.0.1, scrapes the live view; a query gives the round."""
    import socket
    import subprocess
    import time
    import urllib.parse

    from server.status import RunStatus

    assert Path(PROMETHEUS).is_file(), "`make test` installs Debian's prometheus"
    monitor = Monitor("127.0.0.1", 0)
    status = RunStatus(tmp_path / "run", "scraped", 5, monitor)
    status.phase("training", 3, asked=4)
    status.replied(2, 4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: fedtune\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{monitor.port}']}}]\n"
    )
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        query = urllib.parse.quote('fedtune_round{job="fedtune"}')
        answer = None
        for _ in range(60):
            try:
                body = json.loads(get(f"http://127.0.0.1:{port}/api/v1/query?query={query}")[2])
                if body["data"]["result"]:
                    answer = body["data"]["result"][0]["value"][1]
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert answer == "3"
        replied = urllib.parse.quote("fedtune_sites_replied")
        body = json.loads(get(f"http://127.0.0.1:{port}/api/v1/query?query={replied}")[2])
        assert body["data"]["result"][0]["value"][1] == "2"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        monitor.close()


def test_a_sites_own_metrics_show_its_tasks_and_its_ledger(tmp_path):
    """`fedtune site-exec --metrics-port`: tasks by outcome and what the site's own ledger has
    spent, read from the ledger at each scrape; no counts or losses of its records."""
    from client.policy import SitePolicy
    from client.privacy_site import open_ledger
    from client.site_metrics import SiteMetrics
    from common.privacy.accounting import RecordPlan

    state = tmp_path / "state"
    metrics = SiteMetrics(state)
    server = metrics.serve("127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        before = samples(get(url)[2])
        assert before[("fedtune_site_tasks_total", (("outcome", "ok"),))] == 0
        assert not [k for k in before if k[0] == "fedtune_site_epsilon"]  # no ledger yet
        metrics.started(11)
        metrics.started(12)
        metrics.ended(11, 0)
        metrics.ended(12, 1)
        plan = RecordPlan(100, 0.1, 10, 5, 2, 1.0, 1.0, 1e-5, 3.0)
        with open_ledger(state, "default") as ledger:
            ledger.charge("run-1", [(1.0, 0.1, 5)], plan, SitePolicy(max_epsilon=9.0))
        after = samples(get(url)[2])
    finally:
        server.shutdown()
    assert after[("fedtune_site_tasks_total", (("outcome", "ok"),))] == 1
    assert after[("fedtune_site_tasks_total", (("outcome", "failed"),))] == 1
    assert after[("fedtune_site_tasks_running", ())] == 0
    assert after[("fedtune_site_rounds_charged", (("dataset", "default"),))] == 1
    assert after[("fedtune_site_epsilon_cap", (("dataset", "default"),))] == 9.0
    assert 0 < after[("fedtune_site_epsilon", (("dataset", "default"),))] < 9.0
    assert not any("loss" in name or "records" in name for name, _ in after)
