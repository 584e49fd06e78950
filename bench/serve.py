"""Benchmark `fedtune serve` against `model.generate` called in-process, in one run.

The packaged SmolLM2-135M-Instruct (or `--source tiny:llama`) is saved as a signed folder, served
by a separate `python -m server.serving.serve` process on 127.0.0.1, and asked short chat questions
with the real `openai` client (greedy, fixed max_tokens) by 1 client, then by 8 concurrent clients
(the server batches them). The same prompts go through `model.generate` in this process,
interleaved request by request with the single client (never both at once). With `--gguf` the
folder is also exported to GGUF (Q8_0) and its logits compared with the folder's.

Last line: {"serve_overhead_ratio": served p50 / in-process p50 (1 client), "p50_ms", "p95_ms",
"throughput_ratio_c8": requests/s with 8 clients over requests/s with 1, same run,
"gguf_logit_max_abs_diff" (with --gguf)}.

    .venv/bin/python bench/serve.py [--requests 16] [--max-tokens 32] [--source packaged:smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402
import torch  # noqa: E402

from common.core.config import ModelConfig  # noqa: E402
from common.core.models import load_base  # noqa: E402
from common.identity.signing import generate_keys, sign_folder  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Give me a synonym for happy.",
    "What is 12 times 7?",
    "Write one sentence about the sea.",
    "What does a doctor do?",
    "Name a fruit that is yellow.",
    "How many days are in a week?",
]


def prepare_folder(source: str, root: Path) -> tuple[Path, Path]:
    """Save the base model as a signed HF folder (what `publish` produces, minus the adapter)."""
    loaded = load_base(ModelConfig.model_validate({"source": source}))
    folder = root / "model"
    loaded.model.config.use_cache = True
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    priv, pub = generate_keys(root / "keys")
    sign_folder(folder, priv, {"run_id": "bench", "round": 0})
    return folder, pub


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class InProcess:
    """The same folder loaded in this process; ``model.generate`` called directly."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()

    def ask(self, prompt: str, max_tokens: int) -> tuple[float, int]:
        messages = [{"role": "user", "content": prompt}]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tok(text, add_special_tokens=False, return_tensors="pt")
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)  # fmt: skip
        return time.perf_counter() - start, int(out.shape[1] - ids["input_ids"].shape[1])


def start_server(folder: Path, pub: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "server.serving.serve", str(folder), "--public-key", str(pub),
           "--port", str(port), "--model-id", "bench", "--threads", str(threads)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("server exited during start-up") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def ask(client: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens, temperature=0,
    )  # fmt: skip
    usage = reply.usage
    return time.perf_counter() - start, usage.completion_tokens if usage else 0


def interleaved(
    local: InProcess, client: openai.OpenAI, prompts: list[str], max_tokens: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Concurrency 1: each prompt in-process, then over HTTP, so load from other processes on the
    machine hits both sides alike (the server is idle while this process generates)."""
    local.ask(prompts[0], max_tokens)  # warm-up, both sides
    ask(client, prompts[0], max_tokens)
    runs: dict[str, list[tuple[float, int]]] = {"local": [], "served": []}
    for prompt in prompts:
        runs["local"].append(local.ask(prompt, max_tokens))
        runs["served"].append(ask(client, prompt, max_tokens))
    in_proc, served = (
        summarize([r[0] for r in rs], sum(r[1] for r in rs), sum(r[0] for r in rs))
        for rs in (runs["local"], runs["served"])
    )
    served["requests_per_s"] = round(len(prompts) / sum(r[0] for r in runs["served"]), 3)
    # Paired ratios cancel slow drifts in machine load better than a ratio of medians.
    pairs = [b[0] / a[0] for a, b in zip(runs["local"], runs["served"], strict=True)]
    served["paired_ratio_median"] = round(statistics.median(pairs), 3)
    return in_proc, served


def concurrent(
    client: openai.OpenAI, prompts: list[str], max_tokens: int, clients: int
) -> dict[str, Any]:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: ask(client, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    return summarize([r[0] for r in results], sum(r[1] for r in results), wall)


def mean_batch(url: str) -> float:
    """Requests per generate call so far, from the server's own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "fedtune_batch_size")
    values = {s.name: s.value for s in family.samples}
    return round(values["fedtune_batch_size_sum"] / max(1.0, values["fedtune_batch_size_count"]), 2)


def gguf_logit_diff(folder: Path, pub: Path, root: Path) -> float:
    """Max |logit| difference between the folder and its Q8_0 GGUF export (read back by
    transformers' GGUF loader), over one prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.publishing.export import export_gguf

    done = export_gguf(folder, root / "gguf", pub, "q8_0")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    got = AutoModelForCausalLM.from_pretrained(done.gguf.parent, gguf_file=done.gguf.name).eval()
    with torch.inference_mode():
        return float((ref(ids).logits - got(ids).logits).abs().max())


def summarize(latencies: list[float], tokens: int, wall: float) -> dict[str, Any]:
    return {
        "wall_s": wall,
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
        "tokens_per_s": round(tokens / wall, 1),
        "requests": len(latencies),
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--source", default="packaged:smollm2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--gguf", action="store_true", help="also measure the GGUF export")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        folder, pub = prepare_folder(args.source, Path(tmp))
        local = InProcess(folder)
        proc, url = start_server(folder, pub, args.threads)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        try:
            in_proc, served = interleaved(local, client, prompts, args.max_tokens)
            # Three times the requests, so start-up (the first arrives alone) weighs little.
            many = concurrent(client, prompts * 3, args.max_tokens, args.clients)
            many["mean_batch"] = mean_batch(url)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        diff = gguf_logit_diff(folder, pub, Path(tmp)) if args.gguf else None
    many["requests_per_s"] = round(3 * len(prompts) / many.pop("wall_s"), 3)
    report(args, {"in-process generate": in_proc, "serve, 1 client": served,
                  f"serve, {args.clients} clients": many}, diff)  # fmt: skip


def report(args: argparse.Namespace, rows: dict[str, dict[str, Any]], diff: float | None) -> None:
    print(f"threads={args.threads} cpus={os.cpu_count()} source={args.source} "
          f"max_tokens={args.max_tokens} requests={args.requests}")  # fmt: skip
    print(f"{'mode':<22}{'p50 ms':>10}{'p95 ms':>10}{'tok/s':>10}{'tokens':>8}{'req/s':>8}")
    for name, row in rows.items():
        print(f"{name:<22}{row['p50_ms']:>10}{row['p95_ms']:>10}{row['tokens_per_s']:>10}"
              f"{row['tokens']:>8}{row.get('requests_per_s', ''):>8}")  # fmt: skip
    local, served = rows["in-process generate"], rows["serve, 1 client"]
    many = rows[f"serve, {args.clients} clients"]
    ratio = served["p50_ms"] / local["p50_ms"]
    print(f"median of per-prompt ratios served/in-process: {served['paired_ratio_median']}")
    print(f"requests per generate call (all of the run): {many['mean_batch']}")
    result = {"serve_overhead_ratio": round(ratio, 3), "p50_ms": served["p50_ms"],
              "p95_ms": served["p95_ms"],
              f"throughput_ratio_c{args.clients}": round(
                  many["requests_per_s"] / served["requests_per_s"], 2)}  # fmt: skip
    if diff is not None:
        result["gguf_logit_max_abs_diff"] = round(diff, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
