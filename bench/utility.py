"""Utility of federation and of privacy, side by side on one scenario: held-out accuracy of

- ``central``: one site holding every record, no DP. ``--central pooled`` (default): each round
  the scenario's local steps, each over the records that all the sampled sites take in that step
  together (``batch_size`` x sites): the federated run with its sites' records in one place. With
  the DP recipe (one step per site and round) this is one step of the pooled batch.
  ``--central summed``: the sites' steps one after another (``local_steps`` x sites steps of
  ``batch_size``): more steps, but with a recipe made for one step (SGD at rate 1.0 under
  FedAdam) the later steps start from a point the first step overshot;
- ``federated``: the scenario as it is, no DP;
- ``federated_dp``: record-level DP-SGD at every site at ``--epsilon`` (default 8), with the
  scenario's own `[privacy.record]` settings (its DP recipe);
- ``federated_dp_both``: ``privacy.enabled = true``: record level as above and institution level
  (DP-FedAvg, the fixed public denominator) with the scenario's `[privacy.institution]`.

Last line, one JSON object: the four accuracies, ``epsilon`` (record level, the largest site's),
``institution_epsilon``, ``base`` and ``majority`` (the base model's accuracy, and always
answering the most frequent test label: a model at ``majority`` has learnt only the prior),
``fed_over_central``, ``fed_dp_over_central``, ``rounds_to_95`` (per federated arm, the first
round whose accuracy reaches 0.95 of central; null if none does) and ``wall_s`` per arm.
``--scenario`` defaults to hospitals.toml; ``--set`` applies to every arm.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cli.simulate import simulate
from common.core.config import Config, load_config
from common.core.records import read_folder

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("central", "federated", "federated_dp", "federated_dp_both")


def arm_overrides(
    base: Config, overrides: list[str], epsilon: float, central: str = "pooled"
) -> dict[str, list[str]]:
    """Each arm's `--set` list on top of the scenario."""
    fed, train = base.federation, base.train
    sites = fed.sites_per_round or base.simulation.partition.num_sites
    dp = ["privacy.record.enabled=true", f"privacy.record.target_epsilon={epsilon}"]
    if central == "pooled":  # micro-batches stay the size one site's are
        steps = [
            f"train.batch_size={train.batch_size * sites}",
            f"train.grad_accum={train.grad_accum * sites}",
        ]
    else:
        steps = [f"train.local_steps={train.local_steps * sites}"]
    return {
        "central": [
            *overrides,
            "simulation.partition.num_sites=1",
            "federation.min_sites=1",
            "federation.sites_per_round=0",
            *steps,
        ],
        "federated": list(overrides),
        "federated_dp": [*overrides, *dp],
        "federated_dp_both": [*overrides, "privacy.enabled=true", *dp],
    }


def run_arm(scenario: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    summary = simulate(load_config(scenario, overrides), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["round"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    wall = round(time.perf_counter() - start, 1)
    return {"summary": summary, "curve": curve, "wall_s": wall, "majority": majority(out / "test")}


def majority(test_dir: Path) -> float | None:
    """The accuracy of always answering the test set's most frequent label (None: no labels)."""
    labels = [r.label for r in read_folder(test_dir) if r.label is not None]
    return max(Counter(labels).values()) / len(labels) if labels else None


def first_round_at(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((r for r, acc in curve if acc >= target), None)


def result(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    acc = {name: arm["summary"]["final"]["accuracy"] for name, arm in arms.items()}
    privacy = arms["federated_dp"]["summary"]["privacy"]
    both = arms["federated_dp_both"]["summary"]["privacy"]
    central = acc["central"]
    return {
        **acc,
        "base": arms["central"]["summary"]["base"]["accuracy"],
        "majority": arms["central"]["majority"],
        "epsilon": round(max(privacy["record_epsilon"].values()), 3),
        "institution_epsilon": both.get("institution_epsilon"),
        "fed_over_central": round(acc["federated"] / central, 3),
        "fed_dp_over_central": round(acc["federated_dp"] / central, 3),
        "fed_dp_both_over_central": round(acc["federated_dp_both"] / central, 3),
        "rounds_to_95": {
            name: first_round_at(arms[name]["curve"], 0.95 * central) for name in ARMS[1:]
        },
        "wall_s": {name: arm["wall_s"] for name, arm in arms.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", default="hospitals", help="name or TOML path")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset")
    parser.add_argument(
        "--central", choices=("pooled", "summed"), default="pooled",
        help="the central arm's steps: pooled batches (default) or the sites' steps in a row",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scenario = Path(args.scenario)
    if not scenario.is_file():
        scenario = ROOT / "simulations" / "scenarios" / f"{args.scenario}.toml"
    base = load_config(scenario, args.overrides)
    plans = arm_overrides(base, args.overrides, args.epsilon, args.central)
    chosen = [a for a in ARMS if a in args.arms.split(",")]
    arms: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            arms[name] = run_arm(scenario, plans[name], Path(tmp) / name)
            final = arms[name]["summary"]["final"]["accuracy"]
            curve = " ".join(f"{r}:{acc:.3f}" for r, acc in arms[name]["curve"])
            print(f"{name}: accuracy {final:.4f} in {arms[name]['wall_s']} s", flush=True)
            print(f"{name} accuracy by round: {curve}", flush=True)
    if set(chosen) == set(ARMS):
        print(json.dumps({"scenario": base.name, **result(arms)}))
    else:
        print(json.dumps({name: arm["summary"]["final"]["accuracy"] for name, arm in arms.items()}))


if __name__ == "__main__":
    main()
