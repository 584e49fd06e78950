"""Data preparation speed: check and prepare (all rules) on a synthetic 100,000-record corpus.

Prints records per second for `data check` and `data prepare --clean --dedup --redact`, the
near-duplicate step alone at 10k / 30k / 100k records (time per record must not grow like n),
and the peak resident memory. Last line: one JSON object.

    .venv/bin/python bench/data_prepare.py [--records 100000]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from common.core.config import Config, DedupConfig
from common.core.tiny import byte_tokenizer
from common.dataprep import check_folder, prepare_folder
from common.dataprep.dedup import find_duplicates
from common.dataprep.rows import Doc

WORDS = [
    "patient", "reported", "mild", "severe", "headache", "nausea", "after", "dose", "daily",
    "twice", "tablet", "pain", "relief", "sleep", "anxiety", "better", "worse", "week",
    "month", "doctor", "prescribed", "stopped", "side", "effects", "weight", "gain", "blood",
    "pressure", "improved", "no", "change", "taking", "this", "medication", "for", "years",
    "works", "well",
]  # fmt: skip
PII = [
    " call +31 6 {a} {b}", " mail p{a}@clinic.example.org", " seen {d:02d}/03/2021",
    " card 4111 1111 1111 1111", " MRN: A{a}{b}", " ip 10.0.{d}.7",
]  # fmt: skip


def corpus(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Reviews of 25-60 words; about 5% exact and 5% near copies, some HTML and personal data."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []
    for i in range(n):
        roll = rng.random()
        if rows and roll < 0.05:
            rows.append(dict(rows[int(rng.integers(len(rows)))]))
            continue
        if rows and roll < 0.10:
            words = rows[int(rng.integers(len(rows)))]["text"].split()
            words[int(rng.integers(len(words)))] = "changed"
            rows.append({"text": " ".join(words), "label": f"c{i % 7}"})
            continue
        text = " ".join(rng.choice(WORDS, int(rng.integers(25, 60))))
        if roll < 0.2:
            text = f"<p>{text} &amp; more</p>"
        if roll > 0.9:
            pii = PII[int(rng.integers(len(PII)))]
            text += pii.format(
                a=int(rng.integers(1000, 9999)), b=int(rng.integers(1000, 9999)), d=i % 28 + 1
            )
        rows.append({"text": text, "label": f"c{i % 7}"})
    return rows


def write(folder: Path, rows: list[dict[str, str]]) -> None:
    folder.mkdir(parents=True)
    cut = len(rows) * 9 // 10
    for name, part in (("train.jsonl", rows[:cut]), ("eval.jsonl", rows[cut:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


def timed(fn: object, *args: object) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn(*args)  # type: ignore[operator]
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    n = parser.parse_args().records
    cfg = Config.model_validate({"model": {"source": "tiny:llama", "max_length": 256}})
    rows = corpus(n)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "site"
        write(src, rows)
        check, t_check = timed(check_folder, src, cfg, byte_tokenizer())
        prep, t_prep = timed(prepare_folder, src, Path(tmp) / "out", True, True, True, cfg)
    print(f"check:   {n} records in {t_check:.1f} s ({n / t_check:,.0f}/s), usable={check.usable}")
    print(f"prepare: {n} -> {prep.records_out} records in {t_prep:.1f} s ({n / t_prep:,.0f}/s)")
    print("prepare counts:", json.dumps(prep.counts))
    for size in (n // 10, n * 3 // 10, n):
        docs = [Doc(f"f:{i}", [r["text"]], r["label"]) for i, r in enumerate(rows[:size])]
        dups, seconds = timed(find_duplicates, docs, DedupConfig())
        print(
            f"near-dup step: {size:>7} records {seconds:6.2f} s "
            f"{1e6 * seconds / size:6.1f} us/record"
            f"  exact={dups.exact} near={dups.near}"
        )  # type: ignore[attr-defined]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "check_records_per_s": round(n / t_check, 1),
        "prepare_records_per_s": round(n / t_prep, 1),
        "peak_mb": round(peak_mb, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
