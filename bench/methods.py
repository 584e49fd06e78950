"""The fine-tuning methods side by side on one scenario (issue 18), one run each:

- ``lora``, ``dora``: adapters on the top layer's attention (the scenario's `[lora]`);
- ``partial``: the top 2 layers, pooler and classifier head trained in full;
- ``full``: every weight;
- ``lora_fedadam``: LoRA with FedAdam at the coordinator (the scenario's own recipe).

Scenario: bank-complaints (real CFPB complaint narratives, five non-IID banks, all-MiniLM-L6-v2
with a classification head): a real task where a 22M-parameter encoder makes `full` fine-tuning
affordable on 2 cores, so every method runs on the same records. Its quick size is the default
(`--set` adds to it; 1,500 records, 12 rounds). Every arm but `lora_fedadam` uses the same
local recipe (AdamW, 8 steps of 32 records per round, constant rate, plain FedAvg: server step
1) with a rate per method (adapters 2e-2, `partial` 2e-4, `full` 1e-4, in the guides' ranges for
adapters and full fine-tuning); `lora_fedadam` is the scenario's own recipe (16 rounds).

Per method: held-out accuracy, bytes up per round (all sites), seconds per round (mean), and peak
memory per site (a fresh process training one site's round: its peak RSS, and what training
added over the loaded model). ``peak_mem_ratio_checkpointing``: the training memory of one LoRA
round with gradient checkpointing over without, same batch (LoRA in every layer, 64 records of
128 tokens, so the activations are visible next to the model). Last line: one JSON object
keyed by method.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICK = [
    "simulation.partition.max_train_records=1500",
    "simulation.partition.max_test_records=100",
    "federation.rounds=12",
]
LOCAL = [
    "train.optimizer='adamw'",
    "train.local_steps=8",
    "train.batch_size=32",
    "train.schedule='constant'",
    "federation.server_optimizer='fedavg'",
    "federation.server_lr=1.0",  # plain FedAvg: the scenario's own server step is FedAdam's
    "federation.server_schedule='constant'",
]
METHODS: dict[str, list[str]] = {
    "lora": [*LOCAL, "train.lr=2e-2"],
    "dora": [*LOCAL, "lora.method='dora'", "train.lr=2e-2"],
    "partial": [*LOCAL, "lora.method='partial'", "lora.layers=[-2, -1]", "train.lr=2e-4"],
    "full": [*LOCAL, "lora.method='full'", "lora.layers=[]", "train.lr=1e-4"],
    # the scenario's recipe (`recipe = "dp"`): one SGD step of 256 per round (its 512 is for
    # banks of 2,000 complaints; these hold 300), FedAdam with a decaying step, 16 rounds
    "lora_fedadam": ["federation.rounds=16", "train.batch_size=256"],
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) since it started or since
    :func:`_reset_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    """Start the peak over from the current RSS (Linux: 5 > /proc/self/clear_refs), so loading the
    model, whose own peak can be higher, does not count as training's."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_memory(config: Path, site_dir: Path, extra: list[str]) -> dict[str, float]:
    """In this (fresh) process: load the model, train one site's round, report memory."""
    import torch

    from client.train import train_round
    from common.core.adapters import attach_lora
    from common.core.config import load_config
    from common.core.models import load_base
    from common.core.records import read_folder
    from common.core.tasks import encode

    cfg = load_config(config, extra)
    torch.set_num_threads(1)
    loaded = load_base(cfg.model, cfg.data.labels)
    if cfg.model.head_input == "whitened":  # the run's map, as its sites had it
        from common.core.headinput import load_whitening, set_whitening

        set_whitening(loaded.model, load_whitening(site_dir.parent.parent))
    model = attach_lora(loaded.model, cfg.lora, cfg.model)
    enc = encode(read_folder(site_dir), loaded.tokenizer, cfg)
    pad = int(loaded.tokenizer.pad_token_id or 0)
    loading_peak = _peak_rss_mb()
    before = _rss_mb()
    _reset_peak()
    train_round(model, enc, cfg.train, pad_id=pad, round_idx=0, total_rounds=1, seed=0)
    training_peak = _peak_rss_mb()
    return {
        "peak_rss_mb": round(max(loading_peak, training_peak), 1),
        "train_mem_mb": round(training_peak - before, 1),
    }


def memory_of(config: Path, site_dir: Path, extra: list[str]) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory", str(config), str(site_dir), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_method(scenario: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    from cli.simulate import simulate
    from common.core.config import load_config

    start = time.perf_counter()
    summary = simulate(load_config(scenario, overrides), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    memory = memory_of(out / "config.toml", out / "sites" / "site-0", [])
    return {
        "accuracy": summary["final"]["accuracy"],
        "bytes_up_per_round": int(sum(summary["bytes_up"]) / len(summary["bytes_up"])),
        "seconds_per_round": round(sum(r["seconds"] for r in rows) / len(rows), 2),
        **memory,
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory":
        config, site_dir, *extra = sys.argv[2:]
        print(json.dumps(measure_memory(Path(config), Path(site_dir), extra)))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", default="bank-complaints", help="name or TOML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scenario = Path(args.scenario)
    if not scenario.is_file():
        scenario = ROOT / "simulations" / "scenarios" / f"{args.scenario}.toml"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in METHODS if m in args.methods.split(",")]:
            overrides = [*QUICK, *METHODS[name], *args.overrides]
            results[name] = run_method(scenario, overrides, Path(tmp) / name)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
        first = Path(tmp) / next(iter(results))
        # LoRA in every layer: activations of every layer are kept (or recomputed)
        same = ["lora.method='lora'", "lora.layers=[]", "train.batch_size=64",
                "model.max_length=128", "train.local_steps=2"]  # fmt: skip
        plain = memory_of(first / "config.toml", first / "sites" / "site-0", same)
        ckpt = memory_of(first / "config.toml", first / "sites" / "site-0",
                         [*same, "train.gradient_checkpointing=true"])  # fmt: skip
    results["peak_mem_ratio_checkpointing"] = round(ckpt["train_mem_mb"] / plain["train_mem_mb"], 3)
    results["checkpointing_train_mem_mb"] = {
        "off": plain["train_mem_mb"],
        "on": ckpt["train_mem_mb"],
    }
    print(json.dumps({"scenario": scenario.stem, **results}))


if __name__ == "__main__":
    main()
