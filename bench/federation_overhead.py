"""Federation overhead: the same local training steps (a) in-process with no federation and
(b) as a simulated federation of 3 sites through `fedtune simulate` (Flower's simulation runtime:
a local SuperLink, `flwr run`, Ray), side by side.

(c) is (b) again with the live view on (Prometheus metrics and the status page, scraped every
second): ``metrics_overhead_ratio`` is (c)'s rounds over (b)'s (goal < 1.02).

Prints the wall-time ratio b/a (goal <= 1.3) as one JSON object on its last line:
``{"overhead_ratio": ..., ...}``. ``round_overhead_ratio`` compares only the rounds (excluding
engine start-up and the one-time preflight); ``outside_serverapp_s`` is (b)'s time outside the
ServerApp's run (the SuperLink, `flwr run`, Flower's processes and their imports, writing the
virtual sites, stopping).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from cli.simulate import simulate
from client.site import SiteInfo, run_local_round, site_model
from common.core.adapters import flatten, get_state
from common.core.config import Config, load_config
from common.protocol.aggregate import RoundSum, SiteReport, apply_sum, expected_sites, site_weights
from simulations.run import prepare

ROOT = Path(__file__).resolve().parents[1]


def bench_config(steps: int, rounds: int, hidden: int, layers: int) -> Config:
    return load_config(
        ROOT / "simulations/scenarios/tiny.toml",
        [
            f"train.local_steps={steps}",
            f"federation.rounds={rounds}",
            f"model.tiny.hidden_size={hidden}",
            f"model.tiny.num_layers={layers}",
            f"model.tiny.intermediate_size={hidden * 2}",
            "model.max_length=96",
            "federation.evaluate_every=0",
            "evaluation.max_records=8",
        ],
    )


def in_process(cfg: Config, out: Path) -> float:
    """(a): the same sites, rounds and steps, one process, plain FedAvg, no Flower."""
    start = time.perf_counter()
    cfg = prepare(cfg, out)
    sites = [
        SiteInfo(f"site-{i}", out / "sites" / f"site-{i}", i)
        for i in range(cfg.simulation.partition.num_sites)
    ]
    sm = site_model(cfg)
    state = get_state(sm.model, sm.keys)
    for r in range(cfg.federation.rounds):
        ups = [run_local_round(site, cfg, state, r, sm.fingerprint) for site in sites]
        weights = site_weights(cfg, {i: up.records for i, up in enumerate(ups)})
        summed = RoundSum(np.zeros(sum(v.size for v in state.values())), 0.0, [])
        for i, up in enumerate(ups):
            summed.total += weights[i] * flatten(up.delta).astype(np.float64)
            summed.weight += weights[i]
            summed.reports.append(SiteReport(sites[i].name, up.records, {}))
        state = apply_sum(cfg, state, summed, expected_sites(cfg, len(sites)))
    return time.perf_counter() - start


def federated(cfg: Config, out: Path, monitor: bool = False) -> tuple[float, float, float]:
    """(b): wall time, the rounds' time, and the time outside the ServerApp's run. ``monitor``:
    with the live view on and scraped every second (as a Prometheus at 1 s would)."""
    port = _free_port()
    stop = threading.Event()
    scraper = threading.Thread(target=_scrape, args=(port, stop), daemon=True)
    start = time.perf_counter()
    if monitor:
        scraper.start()
    try:
        summary = simulate(cfg, out, monitor=("127.0.0.1", port) if monitor else None)
    finally:
        stop.set()
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return wall, sum(r["seconds"] for r in rows), wall - float(summary["wall_time_s"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for path in ("/metrics", "/status.json"):
            with contextlib.suppress(OSError):  # not listening yet, or done
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2).read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="local steps per site per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = bench_config(args.steps, args.rounds, args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        plain = in_process(cfg, Path(tmp) / "a")
        fed_wall, fed_rounds, outside = federated(cfg, Path(tmp) / "b")
        watched_wall, watched_rounds, _ = federated(cfg, Path(tmp) / "c", monitor=True)
    result = {
        "overhead_ratio": round(fed_wall / plain, 3),
        "round_overhead_ratio": round(fed_rounds / plain, 3),
        # the live view on (metrics and status page, scraped every second) vs off, side by side
        "metrics_overhead_ratio": round(watched_rounds / fed_rounds, 3),
        "metrics_wall_ratio": round(watched_wall / fed_wall, 3),
        "in_process_s": round(plain, 2),
        "federated_s": round(fed_wall, 2),
        "federated_rounds_s": round(fed_rounds, 2),
        "outside_serverapp_s": round(outside, 2),
        "sites": cfg.simulation.partition.num_sites,
        "rounds": cfg.federation.rounds,
        "local_steps": cfg.train.local_steps,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
