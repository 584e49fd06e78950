"""Canary records for an empirical privacy audit (`fedtune audit`).

A canary is a record no real data resembles: a few random made-up words and, for
classification, a label drawn at random; for instruction data, a random six-digit secret to
recall. Each canary is trained on with probability 1/2, independently (the one-run audit of
Steinke, Nasr, Jagielski 2023 needs exactly this), at a virtual site drawn at random. The ones
trained on go into that site's folder as ``audit-canaries.jsonl``; all of them, with where they
went, into ``OUT/audit/canaries.jsonl``, which only the auditor reads.

Everything is drawn from ``simulation.audit.seed``, so an audit can be repeated exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.core.config import Config
from common.core.errors import ConfigError
from common.core.records import write_jsonl

SITE_FILE = "audit-canaries.jsonl"
INDEX_FILE = Path("audit") / "canaries.jsonl"
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass(frozen=True)
class Canary:
    row: dict[str, Any]  # the record as a site file holds it
    secret: str  # what the model should not learn: the label, or the answer
    included: bool  # trained on
    site: str | None  # where it was written (None when left out)
    candidates: list[str]  # the other secrets it is ranked against (exposure)


def _word(rng: np.random.Generator) -> str:
    syllables = int(rng.integers(2, 4))
    return "".join(
        rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(syllables)
    )


def _secret(rng: np.random.Generator) -> str:
    return f"{int(rng.integers(0, 10**6)):06d}"


def make_canaries(cfg: Config, sites: list[str]) -> list[Canary]:
    """``simulation.audit.canaries`` canaries of the run's record form, each included with
    probability 1/2 at a random site of ``sites``."""
    audit = cfg.simulation.audit
    rng = np.random.default_rng(audit.seed)
    labels = list(cfg.data.labels)
    out = []
    for _ in range(audit.canaries):
        words = " ".join(_word(rng) for _ in range(4))
        if labels:
            secret = str(rng.choice(labels))
            row: dict[str, Any] = {"text": words, "label": secret}
            candidates = [x for x in labels if x != secret]
        else:
            secret = _secret(rng)
            row = {"instruction": f"What is the code of {words}?", "output": secret}
            candidates = []
            while len(candidates) < audit.candidates:
                other = _secret(rng)
                if other != secret and other not in candidates:
                    candidates.append(other)
        included = bool(rng.random() < 0.5)
        site = str(rng.choice(sites)) if included else None
        out.append(Canary(row, secret, included, site, candidates))
    return out


def check_auditable(cfg: Config) -> None:
    """Refuse settings under which a canary written to a site might not be trained on as
    written: the one-run bound needs each canary's inclusion to be a fair coin."""
    if cfg.data.eval_fraction:
        raise ConfigError(
            "`data.eval_fraction` holds records out at each site, canaries too: an audit needs "
            "every canary written to a site trained on; set it to 0 for the audit"
        )
    if cfg.data.prepare.enabled:
        raise ConfigError(
            "`data.prepare` may drop or redact canaries before training: turn its rules off "
            "for the audit (prepare the real data beforehand instead)"
        )
    if cfg.data.form == "chat":
        raise ConfigError("audit canaries are classification or instruction records, not chat")


def write_canaries(cfg: Config, out: Path, sites: list[str]) -> list[Canary]:
    """Make the canaries, write the included ones to their sites and all to the index."""
    check_auditable(cfg)
    canaries = make_canaries(cfg, sites)
    for site in sites:
        rows = [c.row for c in canaries if c.site == site]
        if rows:
            write_jsonl(out / "sites" / site / SITE_FILE, rows)
    index = out / INDEX_FILE
    index.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(index, [asdict(c) for c in canaries])
    return canaries


def read_canaries(out: Path) -> list[Canary]:
    path = out / INDEX_FILE
    if not path.is_file():
        raise ConfigError(f"`{out}` has no {INDEX_FILE}: it was not run by `fedtune audit`")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Canary(**json.loads(line)) for line in lines if line.strip()]
