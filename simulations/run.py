"""Virtual sites for a simulation: partition a corpus, or the user's records, into site folders.

Each virtual site's partition is written to its own data folder (`OUT/sites/site-<i>/`) and the
ClientApp reads it exactly as a real site would; the held-out test file goes to `OUT/test/`.
Every folder written is checked as `fedtune data check` would check it before any training.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from common.core.config import Config
from common.core.config.simulation import VIRTUAL_SITE_POLICY, default_site_state
from common.core.errors import ConfigError, DataError
from common.core.records import write_jsonl
from common.dataprep import check_folder
from simulations.canaries import INDEX_FILE, write_canaries
from simulations.corpora import CORPORA, Corpus
from simulations.partition import assign, reference, select, top_labels
from simulations.userdata import user_corpus

logger = logging.getLogger(__name__)


def resolve_labels(cfg: Config, corpus: Corpus) -> Config:
    """Fill in `data.labels` (the top-N labels of the training rows, all with `top_labels` = 0;
    none for instruction and chat records) and the corpus' prompt, when unset."""
    part = cfg.simulation.partition
    labels = list(cfg.data.labels) or top_labels(corpus.train, part.top_labels)
    update: dict[str, Any] = {"labels": labels}
    if cfg.data.prompt is None and corpus.prompt is not None:
        update["prompt"] = corpus.prompt
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)})


def write_sites(cfg: Config, corpus: Corpus, out: Path) -> dict[str, int]:
    """Partition the corpus, write each site's folder and the test folder; returns counts."""
    part = cfg.simulation.partition
    train, groups, test = select(corpus.train, corpus.groups, corpus.test, cfg.data.labels, part)
    parts = assign(train, groups, part)
    counts = {}
    for i, idx in enumerate(parts):
        rows = [train[j] for j in idx]
        write_jsonl(out / "sites" / f"site-{i}" / "records.jsonl", rows)
        counts[f"site-{i}"] = len(rows)
        mix = Counter(r["label"] for r in rows if "label" in r).most_common(3)
        logger.info("site-%d: %d records, top labels %s", i, len(rows), mix)
    write_jsonl(out / "test" / "records.jsonl", test)
    write_policies(cfg, out, list(counts))
    if cfg.simulation.audit.canaries:
        canaries = write_canaries(cfg, out, list(counts))
        logger.info(
            "audit: %d canaries, %d of them trained on (%s)",
            len(canaries), sum(c.included for c in canaries), INDEX_FILE,
        )  # fmt: skip
    return counts


def write_reference(cfg: Config, corpus: Corpus, out: Path) -> Config:
    """`simulation.partition.reference_records`: the coordinator's public reference texts
    (`OUT/reference/`), named by `model.head_reference` in the config returned (in place of
    any it had: a run's own config.toml, simulated again, names its old folder)."""
    n = cfg.simulation.partition.reference_records
    if not n:
        return cfg
    if cfg.model.head_input != "whitened":
        raise ConfigError(
            '`simulation.partition.reference_records` is for `model.head_input` = "whitened"'
        )
    path = out / "reference" / "reference.jsonl"
    write_jsonl(path, reference(corpus.test, cfg.data.labels, cfg.simulation.partition))
    logger.info("reference: %d held-out texts for the head's whitening (%s)", n, path)
    return cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"head_reference": str(path.resolve())})}
    )


def write_policies(cfg: Config, out: Path, sites: list[str]) -> None:
    """Each virtual site's own policy file (`OUT/site-policies/<site>.toml`, read by the site as
    a real site reads its `policy-file`). Its ledger folder defaults to one per scenario and
    site under the user's state folder, never under `out`: a fresh run folder is not a fresh
    budget."""
    import tomli_w

    for site in sites:
        policy = cfg.simulation.policy_of(site)
        fields = {k.replace("_", "-"): v for k, v in policy.model_dump(exclude_none=True).items()}
        state = default_site_state() / cfg.name / site
        fields.setdefault("state-dir", str(state))
        path = out / VIRTUAL_SITE_POLICY.format(site=site)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {site}'s own policy (client/policy.py)\n" + tomli_w.dumps(fields))


def load_corpus(cfg: Config) -> Corpus:
    """The pooled records of `simulation.partition.source`: a packaged corpus or the user's."""
    part = cfg.simulation.partition
    return CORPORA[part.corpus]() if part.source == "corpus" else user_corpus(cfg)


def check_sites(cfg: Config, out: Path) -> None:
    """`fedtune data check` on every virtual site and the test folder, before any training:
    a folder it finds unusable stops the run with its reasons."""
    from common.core.models import load_base  # the tokenizer, for token lengths

    tok = load_base(cfg.model, cfg.data.labels).tokenizer
    folders = [*sorted((out / "sites").iterdir(), key=lambda p: p.name), out / "test"]
    reasons = []
    for folder in folders:
        report = check_folder(folder, cfg, tok)
        reasons += [f"{folder.name}: {reason}" for reason in report.reasons]
        logger.info(
            "%s checked: %d records, %d labels, %d truncated, %d exact duplicates",
            folder.name, report.records, len(report.labels), report.tokens.truncated,
            report.duplicates.get("exact", 0),
        )  # fmt: skip
    if reasons:
        raise DataError("virtual sites not usable for training:\n  " + "\n  ".join(reasons))


def prepare(cfg: Config, out: Path) -> Config:
    """Write the virtual sites' folders and check them; return the config the run will use."""
    corpus = load_corpus(cfg)
    cfg = resolve_labels(cfg, corpus)
    for sub in ("sites", "test", "reference", "rounds", "plots", "audit"):
        shutil.rmtree(out / sub, ignore_errors=True)
    write_sites(cfg, corpus, out)
    cfg = write_reference(cfg, corpus, out)
    check_sites(cfg, out)
    ev = cfg.evaluation.model_copy(update={"test_dir": str(out / "test")})
    return cfg.model_copy(update={"evaluation": ev})
