"""The empirical privacy audit with and without record-level DP, side by side on one scenario.

Both arms train the same scenario with the same canaries (`fedtune audit`, cli/audit.py):

- ``nodp``: no differential privacy. The default setting is one where the model memorizes:
  tiny.toml with 150 training records among 3 sites, 4 rounds of 150 local steps, and 200
  canaries of random words with random labels (about half trained on). It shows the attacks
  work: AUC clearly above 0.5 here.
- ``dp``: the same with record-level DP-SGD at every site at ``--epsilon`` (default 8).

Last line, one JSON object: ``mia_auc_nodp`` and ``mia_auc_dp`` (the strongest attack's AUC,
over the loss and likelihood-ratio attacks, on canaries and on real records),
``tpr_at_1fpr_dp`` (its TPR at 1% FPR), ``eps_lower_bound_nodp`` and ``eps_lower_bound_dp``
(the one-run audit's 95% lower bound), ``eps_claimed`` (the DP arm's record-level epsilon) and
``wall_s`` per arm. Goals: mia_auc_dp <= 0.55 and eps_lower_bound_dp <= eps_claimed.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from cli.audit import analyze, audit_config, write_report
from cli.simulate import simulate
from common.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MEMORIZES = [
    "federation.rounds=4",
    "train.local_steps=150",
    "simulation.partition.max_train_records=150",
]


def run_arm(scenario: Path, overrides: list[str], canaries: int, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    cfg = audit_config(load_config(scenario, overrides), canaries)
    simulate(cfg, out)
    report = analyze(out)
    write_report(report, out / "audit")
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return report


def strongest(report: dict[str, Any]) -> dict[str, float]:
    attacks = [*report["canary_membership"].values(), *report["record_membership"].values()]
    best = max(attacks, key=lambda a: a["auc"])
    return {"auc": best["auc"], "tpr_at_1pct_fpr": best["tpr_at_1pct_fpr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=ROOT / "simulations/scenarios/tiny.toml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=None,
        help="Field override for both arms (default: the memorizing setting).",
    )  # fmt: skip
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="Keep the arms' run folders here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = MEMORIZES if args.overrides is None else args.overrides
    dp = ["privacy.record.enabled=true", f"privacy.record.target_epsilon={args.epsilon}"]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        reports = {
            "nodp": run_arm(args.scenario, overrides, args.canaries, root / "nodp"),
            "dp": run_arm(args.scenario, [*overrides, *dp], args.canaries, root / "dp"),
        }
    for arm, r in reports.items():
        print(f"{arm}: " + json.dumps({k: r[k] for k in ("epsilon_lower_bound", "claimed",
              "mia_auc", "canary_membership", "record_membership", "exposure")}))  # fmt: skip
    nodp, dpr = strongest(reports["nodp"]), strongest(reports["dp"])
    claim = reports["dp"]["claimed"]
    print(json.dumps({
        "scenario": args.scenario.stem, "overrides": overrides, "canaries": args.canaries,
        "mia_auc_nodp": round(nodp["auc"], 4), "mia_auc_dp": round(dpr["auc"], 4),
        "tpr_at_1fpr_nodp": round(nodp["tpr_at_1pct_fpr"], 4),
        "tpr_at_1fpr_dp": round(dpr["tpr_at_1pct_fpr"], 4),
        "eps_lower_bound_nodp": round(reports["nodp"]["epsilon_lower_bound"], 4),
        "eps_lower_bound_dp": round(reports["dp"]["epsilon_lower_bound"], 4),
        "eps_claimed": round(claim["epsilon"], 4) if claim else None,
        "wall_s": {arm: r["wall_s"] for arm, r in reports.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
