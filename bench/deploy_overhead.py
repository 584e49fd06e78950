"""Deployment Engine overhead: seconds per round with real SuperLink/SuperNodes over simulation.

Same scenario, side by side in one run: ``fedtune simulate`` (Flower's simulation engine, Ray) and
the Deployment Engine on loopback (one SuperLink and one SuperNode per site on 127.0.0.1, insecure:
TLS costs are not what is measured here; started by deploy/loopback.py, everything stopped by PID).
Seconds per round come from each run's metrics.jsonl (`seconds`: sampling to aggregated update and
evaluation, as the server measures it). In deployment every ClientApp message starts a new process
(Python, torch, transformers imported again); in simulation Ray's actors stay warm. The last line
printed is one JSON object with ``deploy_over_sim_ratio`` (mean over all rounds) and
``deploy_share_outside_training_min``: a simulated round bounds local training time from above, so
at least that share of a deployed round goes to process starts, imports and transport.

    .venv/bin/python bench/deploy_overhead.py [--scenario simulations/scenarios/tiny.toml]
        [--set federation.rounds=3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from deploy.loopback import LoopbackFederation, prepare_sites  # noqa: E402

logger = logging.getLogger(__name__)


def _seconds(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [float(r["seconds"]) for r in rows]


def run_simulation(scenario: Path, overrides: list[str], out: Path) -> tuple[list[float], float]:
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--config", str(scenario)]
    cmd += ["--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"simulate failed:\n{proc.stderr[-3000:]}")
    return _seconds(out), wall


def run_deployment(
    scenario: Path, overrides: list[str], work: Path, sites: int
) -> tuple[list[float], float]:
    run_overrides = prepare_sites(scenario, work / "data", overrides)
    out = work / "out"
    t0 = time.monotonic()
    with LoopbackFederation(work / "federation", secure=False) as fed:
        fed.start_superlink(None, None, None)
        for i in range(sites):
            name = f"site-{i}"
            fed.start_supernode(name, work / "data" / "sites" / name)
        run_config = {
            "scenario": str(scenario.resolve()),
            "out": str(out),
            "overrides": ";".join(run_overrides),
            "simulate-sites": False,
        }
        fed.flwr_run(run_config, timeout=1800)
    return _seconds(out), time.monotonic() - t0


def _stats(per_round: list[float]) -> dict[str, Any]:
    later = per_round[1:] or per_round
    return {
        "per_round_s": per_round,
        "mean_s": round(statistics.fmean(per_round), 3),
        "mean_after_first_s": round(statistics.fmean(later), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", type=Path, default=ROOT / "simulations/scenarios/tiny.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from common.config import load_config

    scenario = args.scenario.resolve()
    cfg = load_config(scenario, args.overrides)
    sites = cfg.simulation.partition.num_sites
    with tempfile.TemporaryDirectory(prefix="fedtune-deploy-bench-") as tmp:
        work = Path(tmp)
        sim, sim_wall = run_simulation(scenario, args.overrides, work / "sim")
        dep, dep_wall = run_deployment(scenario, args.overrides, work / "deploy", sites)
    s, d = _stats(sim), _stats(dep)
    print(
        f"scenario {cfg.name}: {sites} sites, {cfg.federation.rounds} rounds, cpus {os.cpu_count()}"
    )
    print(
        f"simulation  s/round {s['per_round_s']}  mean {s['mean_s']}  (run wall {sim_wall:.1f} s)"
    )
    print(
        f"deployment  s/round {d['per_round_s']}  mean {d['mean_s']}  (run wall {dep_wall:.1f} s)"
    )
    result = {
        "scenario": cfg.name,
        "sites": sites,
        "rounds": cfg.federation.rounds,
        "sim": s,
        "deploy": d,
        "sim_wall_s": round(sim_wall, 1),
        "deploy_wall_s": round(dep_wall, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        # A simulated round (warm actors) bounds local training from above, so in deployment at
        # least this share of a round goes to everything else (process starts, imports, I/O).
        "deploy_share_outside_training_min": round(1 - s["mean_s"] / d["mean_s"], 3),
        "deploy_over_sim_ratio_after_first": round(
            d["mean_after_first_s"] / s["mean_after_first_s"], 2
        ),
        "deploy_over_sim_ratio": round(d["mean_s"] / s["mean_s"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
