"""Splitting pooled records into virtual sites: IID, non-IID by label (Dirichlet), or by group.

A group is a site given by the data itself: a user's folder, or a value of a column.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from common.core.config import PartitionConfig
from common.core.errors import ConfigError

Row = dict[str, Any]
MIN_PER_SITE = 2
MAX_TRIES = 100


def top_labels(rows: list[Row], k: int) -> list[str]:
    """The k most frequent labels (ties broken by name, so the choice is stable); 0 = all."""
    counts = Counter(r["label"] for r in rows if "label" in r)
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


def by_group(groups: list[str], sites: int) -> list[list[int]]:
    """One site per distinct group, in name order; there must be exactly ``sites`` of them."""
    names = sorted(set(groups))
    if len(names) != sites:
        raise ConfigError(
            f"`simulation.partition.num_sites` = {sites}, but the data names {len(names)} sites "
            "(folders of `sites_dir`, or values of `column`): set `num_sites` to that number"
        )
    index = {name: i for i, name in enumerate(names)}
    parts: list[list[int]] = [[] for _ in names]
    for i, group in enumerate(groups):
        parts[index[group]].append(i)
    return parts


def split(labels: list[str], sites: int, scheme: str, alpha: float, seed: int) -> list[list[int]]:
    if sites * MIN_PER_SITE > len(labels):
        raise ConfigError(
            f"`simulation.partition.num_sites` = {sites} is too many for {len(labels)} records"
        )
    rng = np.random.default_rng(seed)
    if scheme == "dirichlet":
        return dirichlet(labels, sites, alpha, rng)
    return iid(len(labels), sites, rng)


def _kept(row: Row, allowed: set[str]) -> bool:
    """A row of an allowed label; rows without one (instruction or chat) all stay."""
    return not allowed or "label" not in row or row["label"] in allowed


def select(
    train: list[Row],
    groups: list[str] | None,
    test: list[Row],
    labels: list[str],
    part: PartitionConfig,
) -> tuple[list[Row], list[str] | None, list[Row]]:
    """Rows of the allowed labels (rows without one, instruction or chat, all stay), then the
    caps (`max_train_records`, `max_test_records`); ``groups`` follows ``train``."""
    allowed = set(labels)

    def keep(row: Row) -> bool:
        return _kept(row, allowed)

    kept = [i for i, r in enumerate(train) if keep(r)]
    if part.max_train_records:
        kept = kept[: part.max_train_records]
    test = [r for r in test if keep(r)]
    if part.max_test_records:
        test = test[: part.max_test_records]
    picked = [groups[i] for i in kept] if groups is not None else None
    return [train[i] for i in kept], picked, test


def reference(test: list[Row], labels: list[str], part: PartitionConfig) -> list[Row]:
    """`reference_records`: held-out rows after the test records (never trained or tested on),
    as unlabelled texts: the coordinator's public reference in a simulation."""
    pool = [r for r in test if _kept(r, set(labels))]  # as `select` keeps the test records
    start = part.max_test_records
    if not start:
        raise ConfigError(
            "`simulation.partition.reference_records` takes held-out records after the test "
            "records: set `max_test_records` below the held-out split's size"
        )
    rows = [{"text": str(r["text"])} for r in pool[start:] if "text" in r]
    rows = rows[: part.reference_records]
    if len(rows) < part.reference_records:
        raise ConfigError(
            f"`simulation.partition.reference_records` = {part.reference_records}: only "
            f"{len(rows)} held-out records are left after the first {start} (the test records)"
        )
    return rows


def assign(train: list[Row], groups: list[str] | None, part: PartitionConfig) -> list[list[int]]:
    """Indices of ``train`` per site: by the groups the data gives, else by `scheme`."""
    if groups is not None:
        return by_group(groups, part.num_sites)
    if part.scheme == "dirichlet" and any("label" not in r for r in train):
        raise ConfigError(
            "`simulation.partition.scheme` = dirichlet splits by label, and these records have "
            "none (instruction or chat form): use `iid` or `column`"
        )
    labels = [str(r.get("label", "")) for r in train]
    return split(labels, part.num_sites, part.scheme, part.alpha, part.seed)
