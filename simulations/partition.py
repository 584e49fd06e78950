"""Splitting a pooled corpus into virtual sites: IID, or non-IID by label with a Dirichlet prior."""

from __future__ import annotations

from collections import Counter

import numpy as np

from common.core.errors import ConfigError

Row = dict[str, str]
MIN_PER_SITE = 2
MAX_TRIES = 100


def top_labels(rows: list[Row], k: int) -> list[str]:
    """The k most frequent labels (ties broken by name, so the choice is stable); 0 = all."""
    counts = Counter(r["label"] for r in rows)
    ordered = sorted(counts, key=lambda label: (-counts[label], label))
    return ordered[:k] if k else ordered


def iid(n: int, sites: int, rng: np.random.Generator) -> list[list[int]]:
    return [part.tolist() for part in np.array_split(rng.permutation(n), sites)]


def dirichlet(
    labels: list[str], sites: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """Per label, shares of its records drawn from Dir(alpha) over the sites (Hsu et al. 2019).

    Redrawn until every site holds at least MIN_PER_SITE records.
    """
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for _ in range(MAX_TRIES):
        parts: list[list[int]] = [[] for _ in range(sites)]
        for label in sorted(by_label):
            idx = rng.permutation(by_label[label])
            shares = rng.dirichlet([alpha] * sites)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= MIN_PER_SITE:
            return [sorted(p) for p in parts]
    raise ConfigError(
        f"`simulation.partition`: could not give each of {sites} sites {MIN_PER_SITE} records "
        f"with alpha={alpha}; raise `alpha` or lower `num_sites`"
    )


def split(labels: list[str], sites: int, scheme: str, alpha: float, seed: int) -> list[list[int]]:
    if sites * MIN_PER_SITE > len(labels):
        raise ConfigError(
            f"`simulation.partition.num_sites` = {sites} is too many for {len(labels)} records"
        )
    rng = np.random.default_rng(seed)
    if scheme == "dirichlet":
        return dirichlet(labels, sites, alpha, rng)
    return iid(len(labels), sites, rng)
