"""Deployment Engine overhead: seconds per round with real SuperLink/SuperNodes over simulation.

Side by side in one run, same scenario: ``fedtune simulate`` (Flower's simulation engine, Ray),
then the Deployment Engine on loopback (one SuperLink and one SuperNode per site on 127.0.0.1,
insecure: TLS is not what is measured; started by deploy/loopback.py, stopped by PID) twice:
``warm`` with `fedtune site-exec` beside each SuperNode (what deploy/ sets up), and ``cold`` with
Flower's default executor, which starts a fresh `flwr-clientapp` per message.

Seconds per round come from each run's metrics.jsonl (`seconds`: sampling to aggregated update and
evaluation, as the server measures it); `site_seconds` is each site's time inside its train
handler (load, local training, pack), so ``1 - max(site_seconds) / seconds`` is the share of a
round spent outside local work: process start, imports, polling and transport. The cost of a
ClientApp process start is measured on its own as well: a fresh Python importing fedtune's
ClientApp (what every cold message pays) against a fork from site-exec's forkserver.
The last line printed is one JSON object with ``deploy_over_sim_ratio`` (warm, mean over rounds).

    .venv/bin/python bench/deploy_overhead.py [--scenario simulations/scenarios/tiny.toml]
        [--set federation.rounds=3] [--skip-cold]
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


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _seconds(out: Path) -> list[float]:
    return [float(r["seconds"]) for r in _rows(out)]


def _outside_share(out: Path) -> float:
    """Mean over rounds of the share of the round not spent in the slowest site's handler."""
    shares = [
        1 - max(r["site_seconds"].values()) / r["seconds"] for r in _rows(out) if r["site_seconds"]
    ]
    return round(statistics.fmean(shares), 3) if shares else float("nan")


def process_start_costs(repeat: int = 3) -> dict[str, float]:
    """Seconds until fedtune's ClientApp is importable: fresh interpreter vs warm fork."""
    code = "import flwr.supernode.runtime.run_clientapp, client.app"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cold = []
    for _ in range(repeat):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
        cold.append(time.monotonic() - t0)
    from client.site_exec import ForkserverExecutor

    executor = ForkserverExecutor()
    warm = []
    for _ in range(repeat):
        t0 = time.monotonic()
        proc = executor._ctx.Process(target=_import_client_app)
        proc.start()
        proc.join()
        warm.append(time.monotonic() - t0)
    executor.close()
    return {
        "cold_s": round(statistics.median(cold), 3),
        "warm_s": round(statistics.median(warm), 3),
        "preload_s": round(executor.preload_s, 2),
    }


def _import_client_app() -> None:
    import client.app  # noqa: F401


def run_simulation(
    scenario: Path, overrides: list[str], out: Path
) -> tuple[list[float], float, float]:
    cmd = [sys.executable, "-m", "cli.main", "simulate", "--config", str(scenario)]
    cmd += ["--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"simulate failed:\n{proc.stderr[-3000:]}")
    return _seconds(out), wall, _outside_share(out)


def run_deployment(
    scenario: Path, overrides: list[str], work: Path, sites: int, warm: bool
) -> tuple[list[float], float, float]:
    run_overrides = prepare_sites(scenario, work / "data", overrides)
    out = work / "out"
    t0 = time.monotonic()
    with LoopbackFederation(work / "federation", secure=False, warm=warm) as fed:
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
    return _seconds(out), time.monotonic() - t0, _outside_share(out)


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
    parser.add_argument("--skip-cold", action="store_true", help="no run with Flower's executor")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from common.core.config import load_config

    scenario = args.scenario.resolve()
    cfg = load_config(scenario, args.overrides)
    sites = cfg.simulation.partition.num_sites
    starts = process_start_costs()
    with tempfile.TemporaryDirectory(prefix="fedtune-deploy-bench-") as tmp:
        work = Path(tmp)
        sim, sim_wall, sim_outside = run_simulation(scenario, args.overrides, work / "sim")
        warm = run_deployment(scenario, args.overrides, work / "warm", sites, warm=True)
        cold = None
        if not args.skip_cold:
            cold = run_deployment(scenario, args.overrides, work / "cold", sites, warm=False)
    s = _stats(sim)
    print(
        f"scenario {cfg.name}: {sites} sites, {cfg.federation.rounds} rounds, cpus {os.cpu_count()}"
    )
    print(f"simulation       s/round {s['per_round_s']}  (run wall {sim_wall:.1f} s)")
    result: dict[str, Any] = {
        "scenario": cfg.name,
        "sites": sites,
        "rounds": cfg.federation.rounds,
        "sim": s,
        "sim_wall_s": round(sim_wall, 1),
        # the same measure in simulation: server-side work (aggregation, evaluation, saving)
        "sim_share_outside_site": sim_outside,
        "clientapp_start_s": starts,
    }
    for name, res in (("warm", warm), ("cold", cold)):
        if res is None:
            continue
        d = _stats(res[0])
        print(f"deploy {name:<9} s/round {d['per_round_s']}  (run wall {res[1]:.1f} s)")
        result[f"deploy_{name}"] = {**d, "wall_s": round(res[1], 1), "share_outside_site": res[2]}
        result[f"deploy_{name}_over_sim_ratio"] = round(d["mean_s"] / s["mean_s"], 2)
    print(
        f"ClientApp process start: fresh {starts['cold_s']} s, warm fork {starts['warm_s']} s "
        f"(preload once {starts['preload_s']} s)"
    )
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    result["deploy_share_outside_training"] = warm[2]
    result["deploy_over_sim_ratio"] = result["deploy_warm_over_sim_ratio"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
