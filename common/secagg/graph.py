"""Who masks with whom: everyone (SecAgg) or a random k-regular graph (SecAgg+).

Bell et al. 2020, §3.2 replace the complete graph of Bonawitz et al. with a Harary graph
H(k, n) whose vertices are randomly permuted: each site masks with, and shares its secrets with,
only k neighbours, so cost per site is O(k) = O(log n) instead of O(n). Every party computes the
same graph from the public list of sites that advertised keys and the round's public graph seed,
which no party chooses alone: it hashes every advertiser's revealed share, each committed to in
its signed advert before any was revealed (messages.graph_seed).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Mapping, Sequence

logger = logging.getLogger(__name__)

Graph = dict[int, frozenset[int]]


def is_sparse(neighbours: int, sites: int) -> bool:
    """Whether ``neighbours`` makes a SecAgg+ graph on ``sites`` (else: the complete graph)."""
    return 0 < neighbours < sites - 1


def build_graph(site_ids: Sequence[int], neighbours: int, seed: bytes) -> Graph:
    """Neighbour sets (never containing the site itself) for ``site_ids``.

    ``neighbours`` = 0, or >= n - 1, gives the complete graph. Otherwise it is even (checked by
    :class:`~common.secagg.params.SecAggParams`): k/2 neighbours on each side of a ring whose order
    is a keyed hash of the seed, i.e. a uniformly permuted Harary graph.
    """
    ids = sorted(set(site_ids))
    n = len(ids)
    if not is_sparse(neighbours, n):
        return {i: frozenset(j for j in ids if j != i) for i in ids}
    ring = sorted(ids, key=lambda i: hashlib.sha256(seed + i.to_bytes(8, "big")).digest())
    half = neighbours // 2
    graph: Graph = {}
    for pos, site in enumerate(ring):
        near = {ring[(pos + d) % n] for d in range(-half, half + 1) if d != 0}
        graph[site] = frozenset(near)
    return graph


def component_size(graph: Mapping[int, Collection[int]], alive: Collection[int], start: int) -> int:
    """Number of sites reachable from ``start`` through ``alive`` sites only.

    The server learns the masked sum of each connected component of the survivors separately
    (pairwise masks cancel inside a component), so each component must hold >= t inputs.
    """
    alive_set = set(alive)
    seen, todo = {start}, [start]
    while todo:
        node = todo.pop()
        for peer in graph[node]:
            if peer in alive_set and peer not in seen:
                seen.add(peer)
                todo.append(peer)
    return len(seen)
