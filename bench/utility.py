"""Utility of privacy: accuracy on the hospitals scenario of (a) centralized training on the pooled
data without DP, (b) federated without DP, (c) federated with record-level DP at epsilon <= 8.

Centralized = one site holding every record, with as many local steps per round as the three
sites take together, so all three see the same number of optimizer steps. Last line, one JSON
object: ``{"central": ..., "federated": ..., "federated_dp": ..., "epsilon": ...,
"fed_dp_over_central": ...}``. Takes three hospitals runs (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from cli.simulate import simulate
from common.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def run(overrides: list[str], out: Path) -> dict:
    cfg = load_config(ROOT / "simulations/scenarios/hospitals.toml", overrides)
    return simulate(cfg, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = load_config(ROOT / "simulations/scenarios/hospitals.toml", args.overrides)
    sites = base.simulation.partition.num_sites
    central = [
        *args.overrides,
        "simulation.partition.num_sites=1",
        "federation.min_sites=1",
        f"train.local_steps={base.train.local_steps * sites}",
    ]
    dp = [
        *args.overrides,
        "privacy.record.enabled=true",
        f"privacy.record.target_epsilon={args.epsilon}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        a = run(central, Path(tmp) / "central")
        b = run(list(args.overrides), Path(tmp) / "federated")
        c = run(dp, Path(tmp) / "federated_dp")
    eps = max(c["privacy"]["record_epsilon"].values())
    acc = {k: v["final"]["accuracy"] for k, v in {"a": a, "b": b, "c": c}.items()}
    result = {
        "central": acc["a"],
        "federated": acc["b"],
        "federated_dp": acc["c"],
        "epsilon": round(eps, 3),
        "base": a["base"]["accuracy"],
        "fed_over_central": round(acc["b"] / acc["a"], 3),
        "fed_dp_over_central": round(acc["c"] / acc["a"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
