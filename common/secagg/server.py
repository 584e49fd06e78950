"""The coordinator's side of one secure-aggregation round.

Call order: :meth:`SecAggServer.seed_request` (with the adverts that arrived; under SecAgg+ its
request goes to every advertiser, which reveals its graph-seed share), then
:meth:`SecAggServer.mask_request` (the same adverts and the reveals), then
:meth:`SecAggServer.add_upload` per masked upload that arrived, then
:meth:`SecAggServer.consistency_request` (the same for every survivor, which signs it), then
:meth:`SecAggServer.unmask_requests` with the signatures (one request per signer), then
:meth:`SecAggServer.finish` with the replies that arrived. Any step raises
:class:`~common.core.errors.SecAggError` when the round must be aborted. The server only ever holds
masked vectors, their running sum, and (after finish) the sum of the survivors' inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from common.core.errors import SecAggError
from common.secagg import auth, crypto, shamir
from common.secagg.client import reduce_mod
from common.secagg.graph import Graph, build_graph, component_size, is_sparse
from common.secagg.messages import (
    ConsistencyRequest,
    KeyAdvert,
    MaskedUpload,
    MaskRequest,
    SeedRequest,
    SeedReveal,
    SurvivorSignature,
    UnmaskReply,
    UnmaskRequest,
    view_digest,
)
from common.secagg.params import SecAggParams
from common.secagg.quantize import Quantizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregateResult:
    """What the round produces: the plain sum of the contributors' (clipped) updates."""

    total: NDArray[Any]  # (d,) float64 sum of their updates; with `params.encoding`, the
    # integer sum in Z_{2^b} (the quantizer's dtype), for the encoding's owner to decode
    contributors: list[int]  # sites whose update is in `total` (divide by their public weight)
    absent: list[int]  # advertised keys but never uploaded
    error_bound: float  # max |total - true sum| per coordinate, for in-range inputs


@dataclass(frozen=True)
class _Upload:
    shares: dict[int, bytes]
    self_commit: bytes
    pair_commits: dict[int, bytes]


class SecAggServer:
    """Drives one round for the sampled ``site_ids``; create a new one every round."""

    def __init__(
        self,
        params: SecAggParams,
        round_id: int,
        site_ids: Iterable[int],
        *,
        session: bytes = b"",
        anchor: auth.TrustAnchor | None = None,
    ) -> None:
        self.params, self.round_id, self.session = params, round_id, session
        self._anchor = anchor  # the coordinator's copy of the CA, if it has one
        self._sampled = set(site_ids)
        self._committed: dict[int, KeyAdvert] | None = None  # the set sent in a seed request
        self._adverts: dict[int, KeyAdvert] = {}
        self._graph: Graph = {}
        self._quantizer: Quantizer | None = None
        self._uploads: dict[int, _Upload] = {}
        self._sum: NDArray[np.unsignedinteger] | None = None
        self._view = b""  # the digest of the mask request every site got
        self._lists: ConsistencyRequest | None = None

    def check_advert(self, advert: KeyAdvert) -> auth.Peer:
        """The advert's signature verifies under its certificate (and the CA, if the coordinator
        has it). Sites verify for themselves; this only keeps one bad advert from making every
        honest site refuse the round: the caller drops that site instead."""
        who = f"the key advert of site {advert.site_id}"
        peer = (self._anchor.peer if self._anchor else auth.uncertified_peer)(advert.cert, who)
        message = advert.statement(self.session, self.round_id, self.params.digest())
        peer.verify(message, advert.signature, who)
        return peer

    def _check_adverts(self, adverts: Mapping[int, KeyAdvert]) -> None:
        for site, advert in adverts.items():
            if advert.site_id != site or site not in self._sampled:
                raise SecAggError(f"advert for site {site} is not from a sampled site")
        identities = [self.check_advert(a).fingerprint for a in adverts.values()]
        if len(set(identities)) != len(identities):
            raise SecAggError(f"round {self.round_id}: two adverts are signed by one identity")
        self._require(len(adverts), "sites advertised keys")
        k = self.params.neighbours
        holders = k + 1 if is_sparse(k, len(adverts)) else len(adverts)
        self.params.require_majority(holders, f"round {self.round_id}")

    def seed_request(self, adverts: Mapping[int, KeyAdvert]) -> SeedRequest | None:
        """Stage 1 -> 1b under SecAgg+: the set of committed adverts every advertiser reveals its
        graph-seed share for; None for the complete graph (no seed needed: go to mask_request)."""
        if self._committed is not None or self._quantizer is not None:
            raise SecAggError("`seed_request` called twice, or after `mask_request`")
        self._check_adverts(adverts)
        if not is_sparse(self.params.neighbours, len(adverts)):
            return None
        self._committed = dict(adverts)
        return SeedRequest(self.round_id, dict(adverts))

    def mask_request(
        self, adverts: Mapping[int, KeyAdvert], reveals: Mapping[int, SeedReveal] | None = None
    ) -> MaskRequest:
        """Stage 1 (or 1b) -> 2: the request every advertising site gets (same for all).

        Under SecAgg+ ``adverts`` must be the set of the seed request and every one of them must
        have revealed a share that opens its commitment: a missing one aborts the round, since
        dropping it after seeing the others' shares would let the coordinator pick the graph."""
        if self._quantizer is not None:
            raise SecAggError("`mask_request` called twice in one round")
        self._check_adverts(adverts)
        shares = self._seed_shares(adverts, reveals or {})
        self._adverts = dict(adverts)
        request = MaskRequest(self.round_id, self._adverts, shares)
        seed = request.graph_seed(self.session)
        self._graph = build_graph(list(adverts), self.params.neighbours, seed)
        self._quantizer = Quantizer(self.params, len(adverts))
        if not self.params.encoding:
            _ = self._quantizer.levels  # raises now if b is too small for this many sites
        logger.info("secagg round %s: %d sites advertised keys", self.round_id, len(adverts))
        self._view = view_digest(self.session, request, self.params.digest())
        return request

    def _seed_shares(
        self, adverts: Mapping[int, KeyAdvert], reveals: Mapping[int, SeedReveal]
    ) -> dict[int, bytes]:
        if not is_sparse(self.params.neighbours, len(adverts)):
            return {}
        if self._committed is None or dict(adverts) != self._committed:
            raise SecAggError(f"round {self.round_id}: SecAgg+ needs the seed request's adverts")
        shares = {}
        for site, advert in sorted(adverts.items()):
            reveal = reveals.get(site)
            if reveal is None or crypto.commit(b"graph-seed", reveal.seed) != advert.seed_commit:
                raise SecAggError(
                    f"round {self.round_id} aborted: site {site} did not open its graph-seed "
                    "commitment; the graph cannot be drawn without it (nothing was masked yet)"
                )
            shares[site] = reveal.seed
        return shares

    def add_upload(self, upload: MaskedUpload) -> None:
        """Stage 2: check one site's upload and add its masked vector to the running sum."""
        site, quantizer = upload.site_id, self._quantizer
        if quantizer is None or site not in self._adverts or site in self._uploads:
            raise SecAggError(f"unexpected or repeated upload from site {site}")
        if set(upload.shares) != self._graph[site] or set(upload.pair_commits) != self._graph[site]:
            raise SecAggError(f"site {site}: shares are not addressed to exactly its neighbours")
        masked = upload.masked
        if masked.dtype != quantizer.dtype or masked.ndim != 1:
            raise SecAggError(f"site {site}: masked vector must be 1-D {quantizer.dtype.__name__}")
        if self._sum is None:
            self._sum = masked.copy()
        elif masked.shape != self._sum.shape:
            raise SecAggError(f"site {site}: masked vector has shape {masked.shape}")
        else:
            np.add(self._sum, masked, out=self._sum)
        self._uploads[site] = _Upload(upload.shares, upload.self_commit, upload.pair_commits)

    def consistency_request(self) -> ConsistencyRequest:
        """Stage 2 -> 3a: the survivor and absent lists every survivor is asked to sign."""
        survivors, absent = sorted(self._uploads), sorted(set(self._adverts) - set(self._uploads))
        self._require(len(survivors), "sites uploaded masked vectors")
        for site in survivors:
            self._require(
                component_size(self._graph, survivors, site), f"survivors masked with {site}"
            )
            self._require(len((self._graph[site] | {site}) & set(survivors)), f"holders of {site}")
        logger.info(
            "secagg round %s: %d uploads, %d absent", self.round_id, len(survivors), len(absent)
        )
        self._lists = ConsistencyRequest(self.round_id, survivors, absent)
        return self._lists

    def unmask_requests(
        self, signatures: Mapping[int, SurvivorSignature]
    ) -> dict[int, UnmaskRequest]:
        """Stage 3a -> 3b: one request per survivor whose signature verifies, carrying the
        shares addressed to it and every valid signature (sites check them all)."""
        if self._lists is None:
            raise SecAggError("`unmask_requests` called before `consistency_request`")
        message = self._lists.statement(self.session, self._view)
        valid: dict[int, bytes] = {}
        for site, reply in sorted(signatures.items()):
            if reply.site_id != site or site not in self._uploads:
                raise SecAggError(f"survivor signature from site {site}, which was not asked")
            try:
                self._peer(site).verify(message, reply.signature, f"site {site}'s survivor lists")
            except SecAggError as err:
                logger.warning("secagg round %s: dropped: %s", self.round_id, err)
                continue
            valid[site] = reply.signature
        needed = self.params.signatures_needed(len(self._adverts))
        if len(valid) < needed:
            raise SecAggError(
                f"round {self.round_id} aborted: {len(valid)} survivors signed the survivor "
                f"lists, {needed} needed; nothing is unmasked"
            )
        requests = {}
        survivors, absent = self._lists.survivors, self._lists.absent
        for site in valid:
            routed = {
                w: self._uploads[w].shares[site] for w in self._graph[site] if w in self._uploads
            }
            requests[site] = UnmaskRequest(self.round_id, survivors, absent, routed, valid)
        return requests

    def _peer(self, site: int) -> auth.Peer:
        check = self._anchor.peer if self._anchor else auth.uncertified_peer
        return check(self._adverts[site].cert, f"site {site}")

    def finish(self, replies: Mapping[int, UnmaskReply]) -> AggregateResult:
        """Stage 3: rebuild self-mask seeds and absent pair keys, strip them, decode the sum."""
        if self._sum is None or self._quantizer is None:
            raise SecAggError("`finish` called before any masked upload")
        for site, reply in replies.items():
            if reply.site_id != site or site not in self._uploads:
                raise SecAggError(f"unmask reply from site {site}, which was not asked")
        total, size = self._sum, self._sum.shape[0]
        for owner in sorted(self._uploads):
            self._remove_self_mask(total, owner, replies, size)
            for peer in sorted(self._graph[owner] - set(self._uploads)):
                self._remove_pair_mask(total, owner, peer, replies, size)
        reduce_mod(total, self._quantizer)
        self._sum = None  # the unmasked sum is handed over, not kept
        count = len(self._uploads)
        encoded = bool(self.params.encoding)
        return AggregateResult(
            total=total if encoded else self._quantizer.decode_sum(total, count),
            contributors=sorted(self._uploads),
            absent=sorted(set(self._adverts) - set(self._uploads)),
            error_bound=0.0 if encoded else self._quantizer.error_bound(count),
        )

    def _remove_self_mask(
        self,
        total: NDArray[np.unsignedinteger],
        owner: int,
        replies: Mapping[int, UnmaskReply],
        size: int,
    ) -> None:
        shares = {h: r.self_shares[owner] for h, r in replies.items() if owner in r.self_shares}
        seed = self._reconstruct(owner, shares, self._uploads[owner].self_commit, b"self")
        key = crypto.derive(seed, b"self-mask", self.round_id, owner)
        np.subtract(total, crypto.prg(key, size, total.dtype.type), out=total)

    def _remove_pair_mask(
        self,
        total: NDArray[np.unsignedinteger],
        owner: int,
        peer: int,
        replies: Mapping[int, UnmaskReply],
        size: int,
    ) -> None:
        """Undo the owner's mask with an absent peer (it added when owner < peer)."""
        shares = {
            h: r.pair_shares[(owner, peer)]
            for h, r in replies.items()
            if (owner, peer) in r.pair_shares
        }
        key = self._reconstruct(owner, shares, self._uploads[owner].pair_commits[peer], b"pair")
        op = np.subtract if owner < peer else np.add
        op(total, crypto.prg(key, size, total.dtype.type), out=total)

    def _reconstruct(
        self, owner: int, shares: dict[int, bytes], commitment: bytes, purpose: bytes
    ) -> bytes:
        holders = self._graph[owner] | {owner}
        shares = {h: s for h, s in shares.items() if h in holders}
        if len(shares) < self.params.threshold:
            raise SecAggError(
                f"round {self.round_id} aborted: {len(shares)} holders of site {owner}'s secrets "
                f"answered, `threshold` is {self.params.threshold}"
            )
        secret = shamir.combine(shares, self.params.threshold)
        if crypto.commit(purpose, secret) != commitment:
            raise SecAggError(f"round {self.round_id}: a share of site {owner}'s secret is corrupt")
        return secret

    def _require(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise SecAggError(
                f"round {self.round_id} aborted: {count} {what}, fewer than `threshold` "
                f"{self.params.threshold}; nothing is unmasked"
            )
