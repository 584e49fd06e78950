"""Virtual sites for a simulation: partition a corpus into per-site data folders.

Each virtual site's partition is written to its own data folder (`OUT/sites/site-<i>/`) and the
ClientApp reads it exactly as a real site would; the held-out test file goes to `OUT/test/`.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from common.core.config import Config
from common.core.records import write_jsonl
from simulations.corpora import CORPORA, Corpus
from simulations.partition import split, top_labels

logger = logging.getLogger(__name__)


def resolve_labels(cfg: Config, corpus: Corpus) -> Config:
    """Fill in `data.labels` (top-N of the training set) and the corpus' prompt when unset."""
    part = cfg.simulation.partition
    labels = list(cfg.data.labels) or top_labels(corpus.train, part.top_labels)
    update: dict[str, Any] = {"labels": labels}
    if cfg.data.prompt is None:
        update["prompt"] = corpus.prompt
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)})


def write_sites(cfg: Config, corpus: Corpus, out: Path) -> dict[str, int]:
    """Partition the corpus, write each site's folder and the test folder; returns counts."""
    part = cfg.simulation.partition
    labels = set(cfg.data.labels)
    train = [r for r in corpus.train if r["label"] in labels]
    test = [r for r in corpus.test if r["label"] in labels]
    if part.max_train_records:
        train = train[: part.max_train_records]
    if part.max_test_records:
        test = test[: part.max_test_records]
    parts = split([r["label"] for r in train], part.num_sites, part.scheme, part.alpha, part.seed)
    counts = {}
    for i, idx in enumerate(parts):
        rows = [train[j] for j in idx]
        write_jsonl(out / "sites" / f"site-{i}" / "records.jsonl", rows)
        counts[f"site-{i}"] = len(rows)
        mix = Counter(r["label"] for r in rows).most_common(3)
        logger.info("site-%d: %d records, top labels %s", i, len(rows), mix)
    write_jsonl(out / "test" / "records.jsonl", test)
    return counts


def prepare(cfg: Config, out: Path) -> Config:
    """Write the virtual sites' folders; return the config the run will use."""
    corpus = CORPORA[cfg.simulation.partition.corpus]()
    cfg = resolve_labels(cfg, corpus)
    for sub in ("sites", "test", "rounds", "plots"):
        shutil.rmtree(out / sub, ignore_errors=True)
    write_sites(cfg, corpus, out)
    ev = cfg.evaluation.model_copy(update={"test_dir": str(out / "test")})
    return cfg.model_copy(update={"evaluation": ev})
