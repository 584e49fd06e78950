"""The messages of one round, as plain values that fit Flower records.

Every message has ``to_dict()`` giving only int, str, bytes and lists of those (a Flower
ConfigRecord's value types) and a ``from_dict()`` that validates and raises
:class:`~common.core.errors.SecAggError` on anything malformed. The masked vector of
:class:`MaskedUpload` is a numpy array that travels separately (an ArrayRecord).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from common.core.errors import SecAggError
from common.secagg import auth

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _get(data: Mapping[str, Any], key: str, kind: type[T]) -> T:
    value = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SecAggError(f"`{key}` must be {kind.__name__}, got {type(value).__name__}")
    return value


def _list(data: Mapping[str, Any], key: str, kind: type[T]) -> list[T]:
    values = _get(data, key, list)
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise SecAggError(f"`{key}` must be a list of {kind.__name__}")
    return values


def _zip(data: Mapping[str, Any], keys: str, values: str) -> dict[int, bytes]:
    ids, blobs = _list(data, keys, int), _list(data, values, bytes)
    if len(ids) != len(blobs) or len(set(ids)) != len(ids):
        raise SecAggError(f"`{keys}` and `{values}` must have equal length and unique ids")
    return dict(zip(ids, blobs, strict=True))


_ADVERT_FIELDS = ("c_public", "s_public", "seed_commit", "cert", "signature")


@dataclass(frozen=True)
class KeyAdvert:
    """Stage 1, site -> server: the site's two X25519 public keys (32 bytes each), signed.

    ``signature``: the site's identity key over :meth:`statement` (session, round, site id, the
    parameters' digest and both keys); ``cert`` (DER) certifies that key (common/secagg/auth.py).
    """

    site_id: int
    c_public: bytes  # encrypts shares
    s_public: bytes  # agrees pairwise mask keys
    seed_commit: bytes = b""  # SHA-256 commitment to the site's share of the graph seed
    cert: bytes = b""  # the site's identity certificate, DER
    signature: bytes = b""  # ECDSA P-256 over statement(...)

    def statement(self, session: bytes, round_id: int, params_digest: bytes) -> bytes:
        """What the signature covers: a coordinator can neither forge nor re-purpose it."""
        return auth.statement(
            b"advert", session, round_id, self.site_id, params_digest,
            self.c_public, self.s_public, self.seed_commit,
        )  # fmt: skip

    def content(self) -> tuple[int, bytes, bytes, bytes, bytes]:
        """Everything but the signature (ECDSA signatures differ between signings)."""
        return self.site_id, self.c_public, self.s_public, self.seed_commit, self.cert

    def same_keys(self, other: KeyAdvert | None) -> bool:
        """Same site, keys, seed commitment and certificate."""
        return other is not None and self.content() == other.content()

    def to_dict(self) -> dict[str, Any]:
        return {"site_id": self.site_id, **{k: getattr(self, k) for k in _ADVERT_FIELDS}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyAdvert:
        advert = cls(_get(data, "site_id", int), *(_get(data, k, bytes) for k in _ADVERT_FIELDS))
        if len(advert.c_public) != 32 or len(advert.s_public) != 32:
            raise SecAggError(f"site {advert.site_id}: public keys must be 32 bytes")
        return advert


def adverts_digest(adverts: Mapping[int, KeyAdvert]) -> bytes:
    """SHA-256 of a set of adverts (their content, by site): which set a site committed to."""
    fields: list[bytes | int] = []
    for site in sorted(adverts):
        _, c_pub, s_pub, commit, cert = adverts[site].content()
        fields += [site, c_pub, s_pub, commit, hashlib.sha256(cert).digest()]
    return hashlib.sha256(auth.statement(b"adverts", *fields)).digest()


def graph_seed(session: bytes, round_id: int, reveals: Mapping[int, bytes]) -> bytes:
    """The SecAgg+ graph seed: a hash of every advertiser's revealed share (commit-then-reveal,
    Blum's coin flipping): unpredictable to anyone while one revealer is honest, and fixed for
    the committed set before anyone reveals. Empty ``reveals``: the complete graph (unused)."""
    fields: list[bytes | int] = [session, round_id]
    for site in sorted(reveals):
        fields += [site, reveals[site]]
    return hashlib.sha256(auth.statement(b"graph-seed", *fields)).digest()


def _adverts_to_dict(adverts: Mapping[int, KeyAdvert]) -> dict[str, Any]:
    ids = sorted(adverts)
    lists = {f"{k}s": [getattr(adverts[i], k) for i in ids] for k in _ADVERT_FIELDS}
    return {"site_ids": ids, **lists}


def _adverts_from_dict(data: Mapping[str, Any]) -> dict[int, KeyAdvert]:
    columns = {k: _zip(data, "site_ids", f"{k}s") for k in _ADVERT_FIELDS}
    return {
        i: KeyAdvert.from_dict({"site_id": i, **{k: columns[k][i] for k in _ADVERT_FIELDS}})
        for i in columns["c_public"]
    }


@dataclass(frozen=True)
class SeedRequest:
    """Stage 1b (SecAgg+ only), server -> every advertiser: the committed set of adverts."""

    round_id: int
    adverts: dict[int, KeyAdvert]

    def to_dict(self) -> dict[str, Any]:
        return {"round_id": self.round_id, **_adverts_to_dict(self.adverts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeedRequest:
        return cls(_get(data, "round_id", int), _adverts_from_dict(data))


@dataclass(frozen=True)
class SeedReveal:
    """Stage 1b, site -> server: the site's share of the graph seed, opening its commitment."""

    site_id: int
    seed: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"site_id": self.site_id, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeedReveal:
        return cls(_get(data, "site_id", int), _get(data, "seed", bytes))


@dataclass(frozen=True)
class MaskRequest:
    """Stage 2, server -> every site (same content): all signed adverts and, under SecAgg+, every
    advertiser's revealed graph-seed share (the graph seed is their hash: :func:`graph_seed`)."""

    round_id: int
    adverts: dict[int, KeyAdvert]
    reveals: dict[int, bytes] = field(default_factory=dict)  # site -> its seed share

    def graph_seed(self, session: bytes) -> bytes:
        return graph_seed(session, self.round_id, self.reveals)

    def to_dict(self) -> dict[str, Any]:
        ids = sorted(self.reveals)
        return {
            "round_id": self.round_id,
            **_adverts_to_dict(self.adverts),
            "revealers": ids,
            "reveals": [self.reveals[i] for i in ids],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MaskRequest:
        reveals = _zip(data, "revealers", "reveals")
        return cls(_get(data, "round_id", int), _adverts_from_dict(data), reveals)


def view_digest(session: bytes, request: MaskRequest, params_digest: bytes) -> bytes:
    """SHA-256 of everything a site masked under: run, round, parameters, every advert and the
    graph seed. Shares are sealed to it and survivor lists are signed with it, so sites that were
    shown different rounds can neither open each other's shares nor vouch for each other."""
    fields: list[bytes | int] = [session, request.round_id, params_digest]
    fields += [adverts_digest(request.adverts), request.graph_seed(session)]
    return hashlib.sha256(auth.statement(b"view", *fields)).digest()


def _ids(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(8, "big") for v in sorted(values))


@dataclass(frozen=True)
class ConsistencyRequest:
    """Stage 3a, server -> every survivor (same content): who uploaded and who did not.

    Bonawitz et al. 2017, §6 ConsistencyCheck: each survivor signs the list it was shown; a site
    reveals shares only once it sees enough signatures of the very same list (UnmaskRequest).
    """

    round_id: int
    survivors: list[int]
    absent: list[int]

    def statement(self, session: bytes, view: bytes) -> bytes:
        return auth.statement(
            b"survivors", session, self.round_id, view, _ids(self.survivors), _ids(self.absent)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "round_id": self.round_id,
            "survivors": sorted(self.survivors),
            "absent": sorted(self.absent),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConsistencyRequest:
        return cls(
            _get(data, "round_id", int), _list(data, "survivors", int), _list(data, "absent", int)
        )


@dataclass(frozen=True)
class SurvivorSignature:
    """Stage 3a, site -> server: the site's identity signature over the lists it was shown."""

    site_id: int
    signature: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"site_id": self.site_id, "signature": self.signature}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SurvivorSignature:
        return cls(_get(data, "site_id", int), _get(data, "signature", bytes))


@dataclass(frozen=True)
class MaskedUpload:
    """Stage 2, site -> server: masked vector, encrypted shares for neighbours, commitments."""

    site_id: int
    masked: NDArray[np.unsignedinteger]  # (d,) uint32 (b <= 32) or uint64: the ArrayRecord part
    shares: dict[int, bytes]  # receiver -> AES-GCM ciphertext
    self_commit: bytes  # SHA-256 commitment to the self-mask seed
    pair_commits: dict[int, bytes] = field(default_factory=dict)  # neighbour -> pair-key commitment

    def to_dict(self) -> dict[str, Any]:
        """Everything but :attr:`masked`."""
        receivers, peers = sorted(self.shares), sorted(self.pair_commits)
        return {
            "site_id": self.site_id,
            "share_receivers": receivers,
            "shares": [self.shares[r] for r in receivers],
            "self_commit": self.self_commit,
            "pair_commit_peers": peers,
            "pair_commits": [self.pair_commits[p] for p in peers],
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], masked: NDArray[np.unsignedinteger]
    ) -> MaskedUpload:
        return cls(
            site_id=_get(data, "site_id", int),
            masked=masked,
            shares=_zip(data, "share_receivers", "shares"),
            self_commit=_get(data, "self_commit", bytes),
            pair_commits=_zip(data, "pair_commit_peers", "pair_commits"),
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3b, server -> one site that signed: the lists, its routed shares, the signatures."""

    round_id: int
    survivors: list[int]  # sites whose masked vector is in the sum
    absent: list[int]  # advertised keys but never uploaded
    shares: dict[int, bytes]  # sender -> ciphertext addressed to this site
    signatures: dict[int, bytes] = field(default_factory=dict)  # signer -> its survivor signature

    def to_dict(self) -> dict[str, Any]:
        senders, signers = sorted(self.shares), sorted(self.signatures)
        return {
            "round_id": self.round_id,
            "survivors": sorted(self.survivors),
            "absent": sorted(self.absent),
            "share_senders": senders,
            "shares": [self.shares[s] for s in senders],
            "signers": signers,
            "signatures": [self.signatures[s] for s in signers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnmaskRequest:
        return cls(
            round_id=_get(data, "round_id", int),
            survivors=_list(data, "survivors", int),
            absent=_list(data, "absent", int),
            shares=_zip(data, "share_senders", "shares"),
            signatures=_zip(data, "signers", "signatures"),
        )


@dataclass(frozen=True)
class UnmaskReply:
    """Stage 3, site -> server: self-mask shares of survivors, pair-key shares towards absentees."""

    site_id: int
    self_shares: dict[int, bytes]  # survivor -> share of its self-mask seed
    pair_shares: dict[tuple[int, int], bytes]  # (survivor, absent neighbour) -> pair-key share

    def to_dict(self) -> dict[str, Any]:
        owners, pairs = sorted(self.self_shares), sorted(self.pair_shares)
        return {
            "site_id": self.site_id,
            "self_owners": owners,
            "self_shares": [self.self_shares[o] for o in owners],
            "pair_owners": [p[0] for p in pairs],
            "pair_peers": [p[1] for p in pairs],
            "pair_shares": [self.pair_shares[p] for p in pairs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnmaskReply:
        owners, peers = _list(data, "pair_owners", int), _list(data, "pair_peers", int)
        blobs = _list(data, "pair_shares", bytes)
        if not len(owners) == len(peers) == len(blobs):
            raise SecAggError("`pair_owners`, `pair_peers` and `pair_shares` differ in length")
        return cls(
            site_id=_get(data, "site_id", int),
            self_shares=_zip(data, "self_owners", "self_shares"),
            pair_shares=dict(zip(zip(owners, peers, strict=True), blobs, strict=True)),
        )
