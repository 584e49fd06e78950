"""The preparation steps on documents, shared by ``data prepare`` and the ClientApp.

Order: clean, redact, length bounds, then de-duplication (on the redacted text: records that
differ only in personal data are duplicates, and a second run finds nothing new to remove).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from common.core.config import PrepareConfig
from common.dataprep.clean import clean_texts, length_problem, rules
from common.dataprep.dedup import find_duplicates
from common.dataprep.redact import Redactor
from common.dataprep.rows import Doc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Steps:
    """Which steps run; parameters come from :class:`~common.core.config.PrepareConfig`."""

    clean: bool = False
    dedup: bool = False
    redact: bool = False

    @classmethod
    def from_config(cls, cfg: PrepareConfig) -> Steps:
        return cls(cfg.clean.enabled, cfg.dedup.enabled, cfg.redact.enabled)


@dataclass(frozen=True)
class Dropped:
    where: str
    rule: str
    detail: str


@dataclass
class Prepared:
    """Documents after preparation (``docs[i]`` is None when record ``i`` was dropped)."""

    docs: list[Doc | None]
    counts: Counter[str] = field(default_factory=Counter)
    dropped: list[Dropped] = field(default_factory=list)

    @property
    def kept(self) -> list[int]:
        return [i for i, d in enumerate(self.docs) if d is not None]


def prepare_docs(docs: list[Doc], cfg: PrepareConfig, steps: Steps) -> Prepared:
    """Run the chosen steps; counts per rule (records changed or dropped, items redacted)."""
    out = Prepared([Doc(d.where, list(d.texts), d.label, d.eval) for d in docs])
    if steps.clean:
        _clean(out, cfg)
    if steps.redact:
        _redact(out, cfg)
    if steps.dedup:
        _dedup(out, cfg)
    logger.info("prepared %d records: %d kept", len(docs), len(out.kept))
    return out


def _clean(out: Prepared, cfg: PrepareConfig) -> None:
    chosen = rules(cfg.clean)
    for i, doc in enumerate(out.docs):
        if doc is None:
            continue
        doc.texts = clean_texts(doc.texts, chosen, out.counts)
        problem = length_problem(doc.content, cfg.clean)
        if problem:
            rule = "clean.too_short" if problem.startswith("shorter") else "clean.too_long"
            _drop(out, i, rule, problem)


def _redact(out: Prepared, cfg: PrepareConfig) -> None:
    redactor = Redactor(cfg.redact)
    found: Counter[str] = Counter()
    for doc in out.docs:
        if doc is None:
            continue
        before = sum(found.values())
        doc.texts = redactor.redact_texts(doc.texts, found)
        out.counts["redact.records"] += sum(found.values()) > before
    out.counts.update({f"redact.{kind}": n for kind, n in found.items()})


def _dedup(out: Prepared, cfg: PrepareConfig) -> None:
    kept = out.kept
    docs = [d for d in out.docs if d is not None]
    dups = find_duplicates(docs, cfg.dedup)
    for k, first in sorted(dups.of.items()):
        _drop(out, kept[k], f"dedup.{dups.kind[k]}", f"duplicate of {docs[first].where}")
    out.counts["dedup.cross_split"] += dups.cross_split
    out.counts["dedup.label_conflicts"] += dups.label_conflicts


def _drop(out: Prepared, i: int, rule: str, detail: str) -> None:
    doc = out.docs[i]
    if doc is None:
        return
    out.dropped.append(Dropped(doc.where, rule, detail))
    out.counts[rule] += 1
    out.docs[i] = None
