"""DP-SGD overhead of local LoRA training: throughput and peak memory, with DP / without.

Same LoRA model (llama, hidden 256, 4 layers, r=8 on q/v), same fixed batches, side by side in one
run: ``plain`` (non-private AdamW), ``hooks`` and ``ghost`` (Opacus DP-SGD, noise 1.0, clip 1.0,
logical batch 16 in physical batches of 8). Peak memory: each variant in its own subprocess, peak
RSS (``ru_maxrss``) of the whole process (Python, torch, model included). Throughput: one process,
steps of all variants interleaved, median step time. The last line printed is one JSON object.

    .venv/bin/python bench/dp_overhead.py [--steps 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

VARIANTS = ["plain", "hooks", "ghost"]
LOGICAL, PHYSICAL, SEQ, VOCAB = 16, 8, 128, 2048


def _build() -> tuple[Any, list[dict[str, Any]]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=688, vocab_size=VOCAB, max_position_embeddings=SEQ,
    )  # fmt: skip
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    )
    gen = torch.Generator().manual_seed(1)
    recs = []
    for _ in range(LOGICAL):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        recs.append({"input_ids": ids, "labels": ids.clone()})
    return model, recs


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {k: torch.stack([r[k] for r in batch]) for k in batch[0]}


def _plain_step(model: Any, opt: Any, recs: list[dict[str, Any]]) -> None:
    from client.dp import default_loss

    for i in range(0, len(recs), PHYSICAL):  # same accumulation as the DP variants
        loss = default_loss(model, _collate(recs[i : i + PHYSICAL])).sum() / len(recs)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _stepper(variant: str, model: Any, recs: list[dict[str, Any]]) -> Callable[[], object]:
    import torch

    from client.dp import DPTrainer
    from common.core.config import RecordDPConfig
    from common.privacy.accounting import GaussianAccountant, RecordPlan

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if variant == "plain":
        return lambda: _plain_step(model, opt, recs)
    cfg = RecordDPConfig(enabled=True, noise_multiplier=1.0, grad_sample_mode=variant)  # type: ignore[arg-type]
    plan = RecordPlan(1000, LOGICAL / 1000, LOGICAL, 1, 1, 1.0, 1.0, 1e-5, 0.0)
    dp = DPTrainer(model, opt, cfg, plan, GaussianAccountant(), physical_batch_size=PHYSICAL)
    return lambda: dp.step_on(recs, _collate)


def peak_memory(variant: str, steps: int) -> dict[str, float]:
    """Child process: peak RSS of building the model and training ``steps`` steps."""
    import torch

    torch.set_num_threads(2)
    model, recs = _build()
    step = _stepper(variant, model, recs)
    for _ in range(steps):
        step()
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB


def throughput(steps: int) -> dict[str, float]:
    """Records/s of every variant, steps interleaved round-robin on copies of one model so that
    load from other processes on a shared machine hits all variants alike."""
    import torch

    torch.set_num_threads(2)
    model, recs = _build()
    steppers = {v: _stepper(v, copy.deepcopy(model), recs) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(steps + 1):
        for v, step in steppers.items():
            start = time.perf_counter()
            step()
            if i:  # the first round is warm-up
                times[v].append(time.perf_counter() - start)
    return {v: LOGICAL / statistics.median(t) for v, t in times.items()}


def _spawn(variant: str, steps: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="Timed logical steps per variant.")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(peak_memory(args.variant, 1)))
        return
    mem = {v: _spawn(v, 1)["peak_rss_mib"] for v in VARIANTS}
    speed = throughput(args.steps)
    for v in VARIANTS:
        print(f"{v:>6}: {speed[v]:7.2f} records/s  peak RSS {mem[v]:7.1f} MiB")
    result: dict[str, Any] = {}
    for v in ("hooks", "ghost"):
        result[f"{v}_throughput_ratio"] = speed[v] / speed["plain"]
        result[f"{v}_memory_ratio"] = mem[v] / mem["plain"]
    best = max(("hooks", "ghost"), key=lambda v: result[f"{v}_throughput_ratio"])
    result = {
        "dp_throughput_ratio": result[f"{best}_throughput_ratio"],
        "dp_memory_ratio": result[f"{best}_memory_ratio"],
        "dp_mode": best,
        **result,
        **{f"{v}_records_per_s": speed[v] for v in VARIANTS},
        **{f"{v}_peak_rss_mib": mem[v] for v in VARIANTS},
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
