"""DP-SGD overhead of local LoRA training: throughput and peak memory, with DP / without.

Same LoRA model (llama, hidden 256, 4 layers, r=8 on q/v), same fixed batches, side by side in one
run: ``plain`` (non-private AdamW), ``hooks`` and ``ghost`` (Opacus DP-SGD, noise 1.0, clip 1.0,
logical batch 16 in physical batches of 8). Each variant runs in its own subprocess so that its
peak RSS (``ru_maxrss``) is its own. The last line printed is one JSON object.

    .venv/bin/python bench/dp_overhead.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
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


def run_variant(variant: str, steps: int) -> dict[str, float]:
    import torch

    from client.dp import DPTrainer
    from common.config import RecordDPConfig
    from common.privacy import GaussianAccountant, RecordPlan

    torch.set_num_threads(2)
    model, recs = _build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if variant == "plain":
        step = lambda: _plain_step(model, opt, recs)  # noqa: E731
    else:
        cfg = RecordDPConfig(enabled=True, noise_multiplier=1.0, grad_sample_mode=variant)  # type: ignore[arg-type]
        plan = RecordPlan(1000, LOGICAL / 1000, LOGICAL, steps, 1, 1.0, 1.0, 1e-5, 0.0)
        dp = DPTrainer(model, opt, cfg, plan, GaussianAccountant(), physical_batch_size=PHYSICAL)
        step = lambda: dp.step_on(recs, _collate)  # noqa: E731
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"records_per_s": steps * LOGICAL / elapsed, "peak_rss_mib": peak_mib}


def _spawn(variant: str, steps: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="Timed logical steps per variant.")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps)))
        return
    res = {v: _spawn(v, args.steps) for v in VARIANTS}
    for v, r in res.items():
        print(f"{v:>6}: {r['records_per_s']:7.1f} records/s  peak RSS {r['peak_rss_mib']:7.1f} MiB")
    base = res["plain"]
    summary: dict[str, float] = {}
    for v in ("hooks", "ghost"):
        summary[f"{v}_throughput_ratio"] = res[v]["records_per_s"] / base["records_per_s"]
        summary[f"{v}_memory_ratio"] = res[v]["peak_rss_mib"] / base["peak_rss_mib"]
    best = max(("hooks", "ghost"), key=lambda v: summary[f"{v}_throughput_ratio"])
    result = {
        "dp_throughput_ratio": summary[f"{best}_throughput_ratio"],
        "dp_memory_ratio": summary[f"{best}_memory_ratio"],
        "dp_mode": best,
        **summary,
        **{f"{v}_records_per_s": r["records_per_s"] for v, r in res.items()},
        **{f"{v}_peak_rss_mib": r["peak_rss_mib"] for v, r in res.items()},
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
