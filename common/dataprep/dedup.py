"""Exact and near-duplicate detection, keeping the first record of each cluster.

Exact: a hash of the normalized text (NFKC, case-folded, whitespace collapsed). Near: MinHash
signatures of word shingles (Broder 1997), banded locality-sensitive hashing to find candidate
pairs in O(n log n) (Leskovec, Rajaraman, Ullman, *Mining of Massive Datasets*, ch. 3), and the
exact Jaccard similarity of the shingle sets to confirm each candidate. Signatures follow the
datasketch scheme ((a·h + b) mod (2^61 - 1)) & (2^32 - 1), vectorized over batches of records.

Clusters are connected components; the kept record is the one read first. Passes repeat on the
kept records until none is removed, which makes de-duplication idempotent.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from common.core.config import DedupConfig
from common.core.errors import DataError
from common.dataprep.rows import Doc

_PRIME = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)
_EMPTY = np.uint32((1 << 32) - 1)
_ROTATE = 0x9E3779B1  # odd constant: an empty bin differs from the bin it borrows from
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
MAX_PASSES = 10


def normalize(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(normalized: str) -> bytes:
    return hashlib.blake2b(normalized.encode(), digest_size=16).digest()


@dataclass
class Duplicates:
    """Which records repeat an earlier one (index -> kept index), and how."""

    of: dict[int, int] = field(default_factory=dict)
    kind: dict[int, str] = field(default_factory=dict)  # index -> `exact` or `near`
    exact: int = 0
    near: int = 0
    cross_split: int = 0  # evaluation records with a duplicate in the training split
    label_conflicts: int = 0  # clusters whose records carry different labels
    passes: int = 0


class UnionFind:
    """Components whose root is their smallest index (the record kept)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class MinHasher:
    """Word-shingle sets and their MinHash signatures, deterministic for a seed.

    All records are shingled at once: word hashes are looked up once per distinct word, k-grams
    are hashed over one array, and one sort makes every record's set unique.
    """

    def __init__(self, cfg: DedupConfig) -> None:
        rng = np.random.default_rng(cfg.seed)
        self.a = rng.integers(1, int(_PRIME), cfg.num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(_PRIME), cfg.num_perm, dtype=np.uint64)
        self.mix = rng.integers(1, 1 << 63, cfg.shingle_words, dtype=np.uint64) | np.uint64(1)
        self.k = cfg.shingle_words

    def shingles(self, texts: list[str]) -> np.ndarray:
        """Sorted unique ``(text index << 32) | 32-bit k-gram hash`` of all texts at once."""
        vocab: defaultdict[str, int] = defaultdict(lambda: len(vocab))
        words = [list(map(vocab.__getitem__, t.split())) for t in texts]
        word_hash = np.fromiter((zlib.crc32(w.encode()) for w in vocab), np.uint64, len(vocab))
        lengths = np.fromiter(map(len, words), np.int64, len(words))
        ids = word_hash[np.fromiter(chain.from_iterable(words), np.int64, int(lengths.sum()))]
        owner = np.repeat(np.arange(len(texts), dtype=np.uint64), lengths)
        grams, gram_owner = self._grams(ids, owner, lengths)
        return _sorted_unique((gram_owner << np.uint64(32)) | grams)

    def _grams(
        self, ids: np.ndarray, owner: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """k-gram hashes that lie within one text, plus one whole-text gram for short texts."""
        k = self.k
        grams = np.zeros(max(len(ids) - k + 1, 0), dtype=np.uint64)
        for j in range(k):
            grams += ids[j : len(ids) - k + 1 + j] * self.mix[j]
        inside = owner[: len(grams)] == owner[k - 1 :]
        grams, gram_owner = grams[inside], owner[: len(grams)][inside]
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        short = np.flatnonzero((lengths > 0) & (lengths < k))
        extra = [
            (ids[starts[t] : starts[t] + lengths[t]] * self.mix[: lengths[t]]).sum() for t in short
        ]
        grams = np.concatenate([grams, np.array(extra, dtype=np.uint64)]) >> np.uint64(32)
        return grams, np.concatenate([gram_owner, short.astype(np.uint64)])

    def signatures(self, packed: np.ndarray, n: int) -> np.ndarray:
        """(n, num_perm) uint32 one-permutation MinHash signatures (Li, Owen, Zhang 2012).

        One hash per shingle picks a bin and a value; each bin keeps its minimum; empty bins
        borrow from the next filled bin (rotation densification, Shrivastava and Li 2014), so
        k values cost one hash per shingle instead of k. Rows of texts without shingles are
        meaningless and must be left out by the caller.
        """
        bins = len(self.a)
        if n * bins >= 1 << 32:
            raise DataError(f"too many records ({n}) for `dedup.num_perm` = {bins}")
        h = ((packed & _MAX32) * self.a[0] + self.b[0]) % _PRIME
        owner_bin = (packed >> np.uint64(32)) * np.uint64(bins) + (h >> np.uint64(32)) % np.uint64(
            bins
        )
        keys = np.sort((owner_bin << np.uint64(32)) | (h & _MAX32))
        hi = keys >> np.uint64(32)
        first = np.flatnonzero(np.r_[True, hi[1:] != hi[:-1]])
        sig = np.full(n * bins, _EMPTY, dtype=np.uint32)
        sig[hi[first]] = keys[first] & _MAX32
        return _densify(sig.reshape(n, bins))


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2's hash-based unique is many times slower here)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _densify(sig: np.ndarray) -> np.ndarray:
    """Fill each empty bin from the next filled bin to its right (circularly), plus an offset."""
    n, bins = sig.shape
    cols = np.arange(bins)
    for start in range(0, n, 4096):
        block = sig[start : start + 4096]
        pos = np.where(block != _EMPTY, cols, 3 * bins)
        both = np.concatenate([pos, pos + bins], axis=1)
        nxt = np.minimum.accumulate(both[:, ::-1], axis=1)[:, ::-1][:, :bins]
        rows = np.arange(len(block))[:, None]
        shift = ((nxt - cols) * _ROTATE).astype(np.uint32)
        sig[start : start + 4096] = block[rows, nxt % bins] + shift
    return sig


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows minimizing false positives plus false negatives (as datasketch does)."""
    s = np.linspace(0.0, 1.0, 501)
    below, above = s <= threshold, s >= threshold
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1 - (1 - s**rows) ** bands  # chance a pair of similarity s shares a bucket
            err = float(np.trapezoid(p[below], s[below]) + np.trapezoid(1 - p[above], s[above]))
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def candidate_pairs(sig: np.ndarray, bands: int, rows: int) -> Iterator[tuple[int, int]]:
    """(first, other) row pairs sharing a band bucket; ``first`` is the bucket's lowest row."""
    mult = np.random.default_rng(0).integers(1, 1 << 63, rows, dtype=np.uint64) | np.uint64(1)
    for band in range(bands):
        keys = (sig[:, band * rows : (band + 1) * rows].astype(np.uint64) * mult).sum(axis=1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, len(keys)])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
            members = order[start : start + size]
            for other in members[1:]:
                yield int(members[0]), int(other)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def find_duplicates(docs: list[Doc], cfg: DedupConfig) -> Duplicates:
    """Duplicates among ``docs`` (in order); exact and near as configured."""
    uf, dups = UnionFind(len(docs)), Duplicates()
    normalized = [normalize(d.content) for d in docs]
    alive = _exact_pass(normalized, uf, dups) if cfg.exact else list(range(len(docs)))
    if cfg.near:
        _near_passes(normalized, alive, cfg, uf, dups)
    dups.of = {i: uf.find(i) for i in dups.of}
    _cluster_stats(docs, uf, dups)
    return dups


def _exact_pass(normalized: list[str], uf: UnionFind, dups: Duplicates) -> list[int]:
    first: dict[bytes, int] = {}
    alive: list[int] = []
    for i, text in enumerate(normalized):
        j = first.setdefault(exact_key(text), i)
        if j == i:
            alive.append(i)
        else:
            uf.union(j, i)
            dups.of[i] = j
            dups.kind[i] = "exact"
            dups.exact += 1
    return alive


def _near_passes(
    normalized: list[str], alive: list[int], cfg: DedupConfig, uf: UnionFind, dups: Duplicates
) -> None:
    hasher = MinHasher(cfg)
    packed = hasher.shingles([normalized[i] for i in alive])
    if not len(packed):
        return  # no text has a shingle (or there are no texts): nothing can be near another
    bounds = np.searchsorted(packed >> np.uint64(32), np.arange(len(alive) + 1, dtype=np.uint64))
    signatures = hasher.signatures(packed, len(alive))
    sets = {i: packed[bounds[k] : bounds[k + 1]] & _MAX32 for k, i in enumerate(alive)}
    sigs = {i: signatures[k] for k, i in enumerate(alive) if bounds[k + 1] > bounds[k]}
    alive = list(sigs)
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    while alive and dups.passes < MAX_PASSES:
        dups.passes += 1
        sig = np.stack([sigs[i] for i in alive])
        removed = _near_pass(alive, sig, sets, cfg.threshold, (bands, rows), uf)
        for i in removed:
            dups.of[i] = uf.find(i)
            dups.kind[i] = "near"
        dups.near += len(removed)
        if not removed:
            return
        alive = [i for i in alive if i not in removed]


def _near_pass(
    alive: list[int],
    sig: np.ndarray,
    sets: dict[int, np.ndarray],
    threshold: float,
    shape: tuple[int, int],
    uf: UnionFind,
) -> set[int]:
    """One LSH pass over ``alive``; returns the records joined to an earlier one."""
    checked: set[tuple[int, int]] = set()
    for a, b in candidate_pairs(sig, *shape):
        i, j = alive[a], alive[b]
        if (i, j) not in checked and jaccard(sets[i], sets[j]) >= threshold:
            uf.union(i, j)
        checked.add((i, j))
    return {i for i in alive if uf.find(i) != i}


def _cluster_stats(docs: list[Doc], uf: UnionFind, dups: Duplicates) -> None:
    clusters: dict[int, list[int]] = {}
    for i in dups.of:
        clusters.setdefault(dups.of[i], [dups.of[i]]).append(i)
    for members in clusters.values():
        has_train = any(not docs[i].eval for i in members)
        dups.cross_split += sum(docs[i].eval for i in members) if has_train else 0
        dups.label_conflicts += len({docs[i].label for i in members}) > 1
