"""A run's live state: `OUT/status.json`, Prometheus metrics and a status page.

:class:`RunStatus` is what the coordinator knows while it runs: the phase (evaluating the base
model, waiting for sites, preflight, training with k of n replied, aggregating, evaluating, done
or failed), the round, each site's state and the last round's row. It writes `status.json` in
the run folder (atomically, at most about once a second, always on a phase change), which
`fedtune status` and `fedtune simulate` read; with a monitor (:class:`Monitor`, off by default)
it also updates Prometheus gauges served, with a status page, on 127.0.0.1 unless told
otherwise.

Only what the run folder already shows is exported: no per-site counts or losses that a site
keeps in under DP (the rows are the metrics.jsonl rows, which already leave those out).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

STATUS_FILE = "status.json"
PHASES = (
    "starting", "whitening the head's input", "evaluating the base model", "waiting for sites",
    "preflight", "training", "aggregating", "evaluating", "evaluating at the sites", "done",
    "failed",
)  # fmt: skip
SITE_STATES = ("online", "offline", "sampled", "replied", "failed", "declined")
WRITE_EVERY_S = 1.0


class RunStatus:
    """The live state of one run (see the module docstring)."""

    def __init__(self, out: Path, name: str, rounds: int, monitor: Monitor | None = None) -> None:
        self.out, self.monitor = out, monitor
        self.state: dict[str, Any] = {
            "run": name, "phase": "starting", "round": 0, "rounds": rounds, "replied": 0,
            "asked": 0, "sites": {}, "started": time.time(), "phase_since": time.time(),
            "updated": time.time(), "last": {}, "error": None, "pid": os.getpid(),
        }  # fmt: skip
        self._lock = threading.Lock()
        self._written = 0.0
        if monitor is not None:
            monitor.attach(self)
        self._write(force=True)

    def phase(self, phase: str, round_idx: int | None = None, asked: int = 0) -> None:
        """Enter ``phase`` (of :data:`PHASES`), for round ``round_idx`` if given."""
        with self._lock:
            self.state.update(phase=phase, phase_since=time.time(), replied=0, asked=asked)
            if round_idx is not None:
                self.state["round"] = round_idx
        logger.debug("status: %s (round %s)", phase, self.state["round"])
        self._write(force=True)

    def replied(self, replied: int, asked: int) -> None:
        """Progress within an exchange: ``replied`` of ``asked`` sites have answered."""
        with self._lock:
            changed = (replied, asked) != (self.state["replied"], self.state["asked"])
            self.state.update(replied=replied, asked=asked)
        if changed:
            self._write()

    def sites(self, states: dict[str, str]) -> None:
        """Each site's state (of :data:`SITE_STATES`)."""
        with self._lock:
            self.state["sites"] = dict(sorted(states.items()))
        self._write()

    def round_done(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.state["last"] = row
        self._write(force=True)

    def finish(self, error: str | None = None) -> None:
        with self._lock:
            self.state.update(phase="failed" if error else "done", error=error,
                              phase_since=time.time())  # fmt: skip
        self._write(force=True)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self.state))

    def _write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._written < WRITE_EVERY_S:
            return
        with self._lock:
            self.state["updated"] = now
            blob = json.dumps(self.state, indent=1, sort_keys=True)
        self._written = now
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{STATUS_FILE}.tmp"
        tmp.write_text(blob, encoding="utf-8")
        os.replace(tmp, self.out / STATUS_FILE)
        if self.monitor is not None:
            self.monitor.update(self.snapshot())


def read_status(out: Path) -> dict[str, Any] | None:
    """A run folder's status.json (None if the run wrote none)."""
    path = out / STATUS_FILE
    if not path.is_file():
        return None
    return dict(json.loads(path.read_text(encoding="utf-8")))


def read_rows(out: Path) -> list[dict[str, Any]]:
    """The rounds so far (metrics.jsonl; a line being written is skipped)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# -- Prometheus and the status page ------------------------------------------------------------


class Monitor:
    """Prometheus metrics and the status page of one run, served on ``host:port``.

    ``/metrics`` (Prometheus text), ``/status.json`` (the status and the rounds so far), ``/``
    (the page, which polls ``/status.json``). Port 0 takes a free port (:attr:`port` says)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = r = CollectorRegistry()
        self.round = Gauge("fedtune_round", "The round in progress (or last done).", registry=r)
        self.rounds = Gauge("fedtune_rounds_planned", "Rounds the run plans.", registry=r)
        self.phase = Gauge("fedtune_phase", "1 for the run's current phase.", ["phase"], registry=r)
        self.sites = Gauge("fedtune_sites", "Sites by state.", ["state"], registry=r)
        self.replied = Gauge("fedtune_sites_replied", "Sites that replied in the exchange in "
                             "progress.", registry=r)  # fmt: skip
        self.asked = Gauge("fedtune_sites_asked", "Sites asked in the exchange in progress.",
                           registry=r)  # fmt: skip
        self.metric = Gauge("fedtune_round_metric", "The last round's train and eval metrics.",
                            ["name"], registry=r)  # fmt: skip
        self.epsilon = Gauge("fedtune_epsilon", "Epsilon spent so far, per level (and per site "
                             "for record level).", ["level", "site"], registry=r)  # fmt: skip
        self.bytes = Gauge("fedtune_round_bytes", "Bytes exchanged in the last round.",
                           ["direction"], registry=r)  # fmt: skip
        self.seconds = Gauge("fedtune_round_seconds", "Wall time of the last round.", registry=r)
        self.elapsed = Gauge("fedtune_run_seconds", "Wall time since the run started.",
                             registry=r)  # fmt: skip
        self._status: RunStatus | None = None
        self._out: Path | None = None
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.host, self.port = host, int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        logger.info("live view: http://%s:%d/ (metrics at /metrics)", host, self.port)

    @property
    def names(self) -> set[str]:
        """Every metric name exported (Prometheus sample names)."""
        return {s.name for fam in self.registry.collect() for s in fam.samples}

    def attach(self, status: RunStatus) -> None:
        self._status, self._out = status, status.out

    def update(self, state: dict[str, Any]) -> None:
        self.round.set(state["round"])
        self.rounds.set(state["rounds"])
        for phase in PHASES:
            self.phase.labels(phase).set(1 if state["phase"] == phase else 0)
        counts = {s: 0 for s in SITE_STATES}
        for site_state in state["sites"].values():
            counts[site_state] = counts.get(site_state, 0) + 1
        for name, count in counts.items():
            self.sites.labels(name).set(count)
        self.replied.set(state["replied"])
        self.asked.set(state["asked"])
        self.elapsed.set(time.time() - state["started"])
        last = state["last"]
        for key, value in last.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "round":
                self.metric.labels(key).set(value)
        if isinstance(last.get("institution_epsilon"), int | float):
            self.epsilon.labels("institution", "").set(last["institution_epsilon"])
        for site, eps in (last.get("record_epsilon") or {}).items():
            self.epsilon.labels("record", site).set(eps)
        for direction in ("up", "down"):
            if isinstance(last.get(f"bytes_{direction}"), int | float):
                self.bytes.labels(direction).set(last[f"bytes_{direction}"])
        if isinstance(last.get("seconds"), int | float):
            self.seconds.set(last["seconds"])

    def page_state(self) -> dict[str, Any]:
        status = self._status.snapshot() if self._status else {}
        return {"status": status, "rounds": read_rows(self._out) if self._out else []}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(monitor: Monitor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                if monitor._status is not None:
                    monitor.update(monitor._status.snapshot())
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(monitor.registry))
            elif path == "/status.json":
                body = json.dumps(monitor.page_state()).encode()
                self._send(200, "application/json", body)
            elif path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", PAGE.encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try / or /metrics\n")

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("live view: " + format, *args)

    return Handler


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedtune run</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.3em} table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right} th{background:#f4f4f4}
.bar{width:24em;height:.8em;background:#eee;border-radius:.4em;overflow:hidden}
.bar div{height:100%;background:#3a7;width:0}
svg{border:1px solid #ddd;background:#fcfcfc}
</style></head><body>
<h1>fedtune: <span id="run">…</span></h1>
<p>Phase: <b id="phase">…</b> · round <b id="round">0</b> of <b id="rounds">?</b>
 · <span id="replied"></span> · elapsed <span id="elapsed"></span> s
 · page updates: <span id="updates">0</span></p>
<div class="bar"><div id="progress"></div></div>
<h2>Rounds</h2>
<svg id="plot" width="480" height="160" role="img" aria-label="eval loss and accuracy"></svg>
<table id="rows"><thead><tr><th>round</th><th>sites</th><th>eval loss</th>
<th>eval accuracy</th><th>institution ε</th><th>seconds</th></tr></thead><tbody></tbody></table>
<h2>Sites</h2><table id="sites"><thead><tr><th>site</th><th>state</th><th>record ε</th></tr>
</thead><tbody></tbody></table>
<script>
let updates = 0;
const fmt = v => (typeof v === "number") ? (Math.abs(v) < 100 ? v.toFixed(4) : v.toFixed(0)) : "";
function cell(row, text) {
  const td = document.createElement("td"); td.textContent = text; row.appendChild(td);
}
function plot(rows) {
  const svg = document.getElementById("plot"); svg.innerHTML = "";
  const series = [["eval_loss", "#c33"], ["eval_accuracy", "#36c"]];
  for (const [key, colour] of series) {
    const pts = rows.filter(r => typeof r[key] === "number").map(r => [r.round, r[key]]);
    if (!pts.length) continue;
    const ys = pts.map(p => p[1]), lo = Math.min(...ys), hi = Math.max(...ys) || 1;
    const n = Math.max(1, rows.length);
    const path = pts.map(([x, y]) => `${20 + 440 * (x - 1) / Math.max(1, n - 1)},` +
      `${150 - 130 * (hi === lo ? 0.5 : (y - lo) / (hi - lo))}`).join(" ");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", path); line.setAttribute("fill", "none");
    line.setAttribute("stroke", colour); line.setAttribute("stroke-width", "2");
    line.setAttribute("class", "series-" + key); svg.appendChild(line);
  }
}
async function refresh() {
  try {
    const data = await (await fetch("status.json", {cache: "no-store"})).json();
    const s = data.status || {}, rows = data.rounds || [];
    document.getElementById("run").textContent = s.run || "";
    document.getElementById("phase").textContent = s.phase || "";
    document.getElementById("round").textContent = s.round || 0;
    document.getElementById("rounds").textContent = s.rounds || "?";
    document.getElementById("replied").textContent =
      s.asked ? `${s.replied} of ${s.asked} sites replied` : "";
    document.getElementById("elapsed").textContent =
      Math.round((s.updated || 0) - (s.started || 0));
    document.getElementById("progress").style.width = (100 * rows.length / (s.rounds || 1)) + "%";
    const body = document.querySelector("#rows tbody"); body.innerHTML = "";
    for (const r of rows) {
      const tr = document.createElement("tr"); tr.setAttribute("data-round", r.round);
      cell(tr, r.round); cell(tr, (r.sites || []).length); cell(tr, fmt(r.eval_loss));
      cell(tr, fmt(r.eval_accuracy)); cell(tr, fmt(r.institution_epsilon));
      cell(tr, fmt(r.seconds));
      body.appendChild(tr);
    }
    const last = rows.length ? rows[rows.length - 1] : {};
    const sites = document.querySelector("#sites tbody"); sites.innerHTML = "";
    for (const [name, state] of Object.entries(s.sites || {})) {
      const tr = document.createElement("tr"); cell(tr, name); cell(tr, state);
      cell(tr, fmt((last.record_epsilon || {})[name])); sites.appendChild(tr);
    }
    plot(rows);
    updates += 1; document.getElementById("updates").textContent = updates;
  } catch (err) { document.getElementById("phase").textContent = "unreachable (" + err + ")"; }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""
