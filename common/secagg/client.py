"""The site's side of one secure-aggregation round: four or five calls, state kept in between.

Stages (docs/secure-aggregation.md has the full spec):

1. :meth:`SecAggClient.advertise` -> :class:`KeyAdvert` (fresh X25519 pairs ``c`` and ``s`` and
   a commitment to a graph-seed share, signed with the site's identity key).
1b. (SecAgg+) :meth:`SecAggClient.reveal_seed` (:class:`SeedRequest`) -> :class:`SeedReveal`.
2. :meth:`SecAggClient.mask` (update, :class:`MaskRequest`) -> :class:`MaskedUpload`: after
   checking every advert (common/secagg/checks.py), quantize, add a self mask from a fresh seed
   ``b`` and pairwise masks with neighbours, Shamir-share ``b`` and each pair key among the
   neighbourhood, encrypt each neighbour's shares to it.
3a. :meth:`SecAggClient.sign_survivors` (:class:`ConsistencyRequest`) -> :class:`SurvivorSignature`.
3b. :meth:`SecAggClient.unmask` (:class:`UnmaskRequest`) -> :class:`UnmaskReply`: shown enough
   signatures of the very lists it signed, reveal for every surviving neighbour its self-mask
   share and the shares of its pair keys with absent sites, never a pair key between survivors.

Every refusal is logged (ERROR) with its reason before :class:`SecAggError` is raised.

Each call may run in a new process: persist :meth:`SecAggClient.to_bytes` after each call and
rebuild with :meth:`SecAggClient.from_bytes`. The state holds the secret keys: keep it on the site.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from common.core.errors import SecAggError
from common.secagg import auth, checks, crypto, shamir
from common.secagg.auth import Credentials
from common.secagg.graph import Graph, build_graph, component_size
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
    adverts_digest,
    view_digest,
)
from common.secagg.params import SecAggParams
from common.secagg.quantize import Quantizer

logger = logging.getLogger(__name__)
T = TypeVar("T")

_ADVERTISED, _REVEALED = "advertised", "revealed"
_MASKED, _SIGNED, _DONE = "masked", "signed", "done"


@dataclass
class _State:
    """Everything a site keeps between stages. Hex-encoded bytes so it serialises as JSON."""

    site_id: int
    round_id: int
    params: dict[str, Any]
    stage: str
    c_secret: str
    s_secret: str
    session: str  # hex: the run this round belongs to; every signature binds it
    identity_key: str  # PEM: the site's identity key and certificate, and the CA it trusts
    identity_cert: str
    ca_cert: str
    seed_share: str = ""  # this site's share of the graph seed, committed to in its advert
    committed: str = ""  # digest of the advert set it revealed its share for (SecAgg+)
    site_ids: list[int] = field(default_factory=list)
    graph_seed: str = ""
    c_publics: dict[str, str] = field(default_factory=dict)  # neighbour -> c public key
    own_self_share: str = ""
    own_pair_shares: dict[str, str] = field(default_factory=dict)  # neighbour -> my share
    view: str = ""  # digest of the mask request this site masked under
    certs: dict[str, str] = field(default_factory=dict)  # advertiser -> its verified certificate
    signed_survivors: list[int] = field(default_factory=list)  # the lists this site signed
    signed_absent: list[int] = field(default_factory=list)


class SecAggClient:
    """One site in one round. Create it per round: keys and seeds are never reused.

    ``credentials``: the site's identity (it signs the advert) and the CA it trusts (every peer's
    advert must verify against it). ``session``: public bytes naming the run (its id), bound into
    every signature so that nothing signed for one run is accepted in another.
    """

    def __init__(
        self,
        site_id: int,
        params: SecAggParams,
        round_id: int,
        credentials: Credentials,
        session: bytes = b"",
    ) -> None:
        c_secret, _ = crypto.new_keypair()
        s_secret, _ = crypto.new_keypair()
        key_pem, cert_pem = credentials.identity.to_pem()
        ca_pem = credentials.anchor.to_pem()
        self._params = params
        self._s = _State(
            site_id, round_id, params.to_dict(), _ADVERTISED, c_secret.hex(), s_secret.hex(),
            session.hex(), key_pem.decode(), cert_pem.decode(), ca_pem.decode(),
            seed_share=os.urandom(crypto.KEY_BYTES).hex(),
        )  # fmt: skip

    @property
    def site_id(self) -> int:
        return self._s.site_id

    @property
    def params(self) -> SecAggParams:
        return self._params

    @property
    def stage(self) -> str:
        """``advertised`` (after construction), ``revealed`` (SecAgg+), ``masked``, ``signed``
        or ``done``."""
        return self._s.stage

    def to_bytes(self) -> bytes:
        """The whole state, secrets included: store it on the site only."""
        return json.dumps(asdict(self._s), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggClient:
        try:
            state = _State(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise SecAggError(f"corrupt secure-aggregation client state: {exc}") from exc
        client = cls.__new__(cls)
        client._params, client._s = SecAggParams.from_dict(state.params), state
        return client

    def _identity(self) -> auth.Identity:
        return auth.Identity.from_pem(self._s.identity_key.encode(), self._s.identity_cert.encode())

    def _refuse(self, reason: str) -> SecAggError:
        """Log why this site will not go on with the round (its own log says so), then raise."""
        message = f"site {self._s.site_id}: {reason}"
        logger.error("secagg round %s: refusing: %s", self._s.round_id, message)
        return SecAggError(message)

    # Stage 1 ------------------------------------------------------------------------------------
    def advertise(self) -> KeyAdvert:
        """The two public keys, signed with the site's identity key; the secrets stay here."""
        c_pub = crypto.public_of(bytes.fromhex(self._s.c_secret))
        s_pub = crypto.public_of(bytes.fromhex(self._s.s_secret))
        identity = self._identity()
        commit = crypto.commit(b"graph-seed", bytes.fromhex(self._s.seed_share))
        unsigned = KeyAdvert(self._s.site_id, c_pub, s_pub, commit, identity.cert_der)
        message = unsigned.statement(self._session, self._s.round_id, self._params.digest())
        return dataclasses.replace(unsigned, signature=identity.sign(message))

    @property
    def _session(self) -> bytes:
        return bytes.fromhex(self._s.session)

    def _guard(self, check: Callable[[], T]) -> T:
        """Run one of the checks (common/secagg/checks.py); a failure is this site's refusal."""
        try:
            return check()
        except SecAggError as err:
            raise self._refuse(str(err)) from err

    def _check_adverts(self, adverts: dict[int, KeyAdvert]) -> None:
        """The set of adverts this site would mask with: its own unchanged, every one signed by a
        distinct certified site, no public key twice, t a majority of each neighbourhood."""
        own, anchor = self.advertise(), auth.TrustAnchor.from_pem(self._s.ca_cert.encode())
        self._guard(lambda: checks.check_own_advert(adverts, own))
        self._guard(
            lambda: checks.verify_adverts(
                adverts, anchor, self._session, self._s.round_id, self._params
            )
        )
        self._guard(lambda: checks.check_advert_set(adverts, self._params))

    # Stage 1b (SecAgg+) -------------------------------------------------------------------------
    def reveal_seed(self, request: SeedRequest) -> SeedReveal:
        """Open this site's commitment to its graph-seed share, for exactly this set of adverts.

        Bell et al. 2020 need the graph to be random; a seed the coordinator drew could be ground
        until its own sites surround a victim. Each site committed to a fresh share in its signed
        advert; it reveals only after the set of commitments is fixed, and masks only with that
        set, so the seed (their hash) is unpredictable while one site is honest."""
        self._expect_stage(_ADVERTISED, request.round_id)
        self._check_adverts(request.adverts)
        self._s.stage, self._s.committed = _REVEALED, adverts_digest(request.adverts).hex()
        return SeedReveal(self._s.site_id, bytes.fromhex(self._s.seed_share))

    def _check_reveals(self, request: MaskRequest) -> None:
        revealed = self._s.stage == _REVEALED
        self._guard(
            lambda: checks.check_reveals(request, self._params, revealed, self._s.committed)
        )

    # Stage 2 ------------------------------------------------------------------------------------
    def mask(self, update: NDArray[Any], request: MaskRequest) -> MaskedUpload:
        """Masked ``update`` and encrypted shares. ``update``: 1-D floats (clipped upstream),
        quantized here; or, with ``params.encoding`` set, 1-D integers in Z_{2^b} already
        encoded by the site (of the quantizer's dtype), masked as they are."""
        graph = self._check_mask_request(update, request)
        me, rid = self._s.site_id, self._s.round_id
        neighbours = sorted(graph[me])
        quantizer = Quantizer(self._params, len(request.adverts))
        seed = os.urandom(crypto.KEY_BYTES)
        pair_keys = {v: self._pair_key(v, request.adverts[v].s_public) for v in neighbours}
        encoded = (
            update.astype(quantizer.dtype) if self._params.encoding else quantizer.encode(update)
        )
        masked = _apply_masks(quantizer, encoded, me, rid, seed, pair_keys)
        self._s.view = view_digest(self._session, request, self._params.digest()).hex()
        shares = self._share_secrets(seed, pair_keys, request)
        self._s.stage, self._s.s_secret = _MASKED, ""  # s is no longer needed: forget it
        self._s.site_ids = sorted(request.adverts)
        self._s.graph_seed = request.graph_seed(self._session).hex()
        self._s.c_publics = {str(v): request.adverts[v].c_public.hex() for v in neighbours}
        self._s.certs = {str(v): a.cert.hex() for v, a in request.adverts.items()}
        return MaskedUpload(
            site_id=me,
            masked=masked,
            shares=shares,
            self_commit=crypto.commit(b"self", seed),
            pair_commits={v: crypto.commit(b"pair", k) for v, k in pair_keys.items()},
        )

    def _check_mask_request(self, update: NDArray[Any], request: MaskRequest) -> Graph:
        if self._s.stage != _REVEALED:
            self._expect_stage(_ADVERTISED, request.round_id)
        self._expect_round(request.round_id)
        me = self._s.site_id
        self._check_adverts(request.adverts)
        self._check_reveals(request)
        if self._params.encoding:
            dtype = Quantizer(self._params, len(request.adverts)).dtype
            if update.ndim != 1 or update.dtype != dtype:
                raise SecAggError(
                    f"`update` must be a 1-D {dtype.__name__} array (the encoding is the "
                    f"site's), got {update.dtype}{update.shape}"
                )
        elif update.ndim != 1 or not np.issubdtype(update.dtype, np.floating):
            raise SecAggError(
                f"`update` must be a 1-D float array, got {update.dtype}{update.shape}"
            )
        elif not np.isfinite(update).all():
            raise SecAggError(f"site {me}: `update` contains NaN or infinity")
        seed = request.graph_seed(self._session)
        return build_graph(list(request.adverts), self._params.neighbours, seed)

    def _pair_key(self, peer: int, peer_public: bytes) -> bytes:
        secret = bytes.fromhex(self._s.s_secret)
        return crypto.agree(
            secret, peer_public, b"pair-mask", self._s.round_id, self._s.site_id, peer
        )

    def _share_secrets(
        self, seed: bytes, pair_keys: dict[int, bytes], request: MaskRequest
    ) -> dict[int, bytes]:
        """Shamir-share the seed and every pair key over the neighbourhood (me included), then
        seal each neighbour's shares to it (Bonawitz et al. §4 ShareKeys; Bell et al. §3)."""
        me, t = self._s.site_id, self._params.threshold
        holders = sorted([me, *pair_keys])
        seed_shares = shamir.split(seed, holders, t)
        key_shares = {v: shamir.split(k, holders, t) for v, k in sorted(pair_keys.items())}
        self._s.own_self_share = seed_shares[me].hex()
        self._s.own_pair_shares = {str(v): s[me].hex() for v, s in key_shares.items()}
        c_secret = bytes.fromhex(self._s.c_secret)
        sealed: dict[int, bytes] = {}
        for r in pair_keys:
            plain = seed_shares[r] + b"".join(s[r] for s in key_shares.values())
            key = crypto.agree(
                c_secret, request.adverts[r].c_public, b"share-key", request.round_id, me, r
            )
            sealed[r] = crypto.seal(key, plain, request.round_id, me, r, self._view)
        return sealed

    @property
    def _view(self) -> bytes:
        return bytes.fromhex(self._s.view)

    # Stage 3a -----------------------------------------------------------------------------------
    def sign_survivors(self, request: ConsistencyRequest) -> SurvivorSignature:
        """Sign the survivor and absent lists after checking them (Bonawitz et al. 2017, §6
        ConsistencyCheck). A site signs one pair of lists per round, and later reveals shares
        only for exactly these lists."""
        self._expect_stage(_MASKED, request.round_id)
        self._check_lists(request.survivors, request.absent)
        signature = self._identity().sign(request.statement(self._session, self._view))
        self._s.stage = _SIGNED
        self._s.signed_survivors = sorted(request.survivors)
        self._s.signed_absent = sorted(request.absent)
        return SurvivorSignature(self._s.site_id, signature)

    def _check_lists(self, survivors_list: list[int], absent_list: list[int]) -> None:
        me, t = self._s.site_id, self._params.threshold
        survivors, absent = set(survivors_list), set(absent_list)
        if both := survivors & absent:
            raise self._refuse(f"asked to treat {sorted(both)} as survivor and absent")
        if survivors | absent != set(self._s.site_ids) or me not in survivors:
            raise self._refuse("survivor/absent lists do not match the advertised sites")
        graph = self._graph()
        if len(survivors) < t or component_size(graph, survivors, me) < t:
            # Bonawitz et al. §4 Unmasking: a site refuses when fewer than t inputs would be summed.
            raise self._refuse(f"fewer than `threshold` {t} survivors are masked with it")

    def _graph(self) -> Graph:
        seed = bytes.fromhex(self._s.graph_seed)
        return build_graph(self._s.site_ids, self._params.neighbours, seed)

    # Stage 3 ------------------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Reveal what removes the masks, after checking the request is consistent and safe."""
        graph = self._check_unmask_request(request)
        me, absent = self._s.site_id, set(request.absent)
        self_shares = {me: bytes.fromhex(self._s.own_self_share)}
        pair_shares = {
            (me, int(v)): bytes.fromhex(s)
            for v, s in self._s.own_pair_shares.items()
            if int(v) in absent
        }
        for sender, blob in request.shares.items():
            seed_share, key_shares = self._open(sender, blob, sorted(graph[sender]))
            self_shares[sender] = seed_share
            pair_shares.update({(sender, v): s for v, s in key_shares.items() if v in absent})
        self._forget()
        return UnmaskReply(me, self_shares, pair_shares)

    def _check_unmask_request(self, request: UnmaskRequest) -> Graph:
        self._expect_stage(_SIGNED, request.round_id)
        me = self._s.site_id
        if (sorted(request.survivors), sorted(request.absent)) != (
            self._s.signed_survivors,
            self._s.signed_absent,
        ):
            raise self._refuse("asked to unmask for other survivor lists than the ones it signed")
        self._check_signatures(request)
        graph = self._graph()
        expected = graph[me] & set(request.survivors)
        if set(request.shares) != expected:
            raise self._refuse(
                f"shares came from {sorted(request.shares)}, but the surviving "
                f"neighbours are {sorted(expected)}"
            )
        return graph

    def _check_signatures(self, request: UnmaskRequest) -> None:
        needed = self._params.signatures_needed(len(self._s.site_ids))
        message = ConsistencyRequest(
            self._s.round_id, self._s.signed_survivors, self._s.signed_absent
        ).statement(self._session, self._view)
        certs = {int(v): bytes.fromhex(c) for v, c in self._s.certs.items()}
        self._guard(
            lambda: checks.check_signatures(
                request.signatures, request.survivors, needed, message, certs
            )
        )

    def _open(
        self, sender: int, blob: bytes, sender_neighbours: list[int]
    ) -> tuple[bytes, dict[int, bytes]]:
        me, rid = self._s.site_id, self._s.round_id
        c_secret = bytes.fromhex(self._s.c_secret)
        key = crypto.agree(
            c_secret, bytes.fromhex(self._s.c_publics[str(sender)]), b"share-key", rid, me, sender
        )
        plain = crypto.open_sealed(key, blob, rid, sender, me, self._view)
        size = shamir.SHARE_BYTES
        if len(plain) != size * (1 + len(sender_neighbours)):
            raise SecAggError(f"site {me}: share bundle from site {sender} has the wrong length")
        chunks = [plain[i : i + size] for i in range(0, len(plain), size)]
        return chunks[0], dict(zip(sender_neighbours, chunks[1:], strict=True))

    def _expect_round(self, round_id: int) -> None:
        if round_id != self._s.round_id:
            raise SecAggError(
                f"site {self._s.site_id}: request for round {round_id}, "
                f"state is round {self._s.round_id}"
            )

    def _expect_stage(self, stage: str, round_id: int) -> None:
        self._expect_round(round_id)
        if self._s.stage != stage:
            raise SecAggError(
                f"site {self._s.site_id}: request for stage `{stage}` but this site is at "
                f"`{self._s.stage}` (each stage runs once per round)"
            )

    def _forget(self) -> None:
        """After revealing, nothing secret remains useful; a second unmask must be impossible."""
        self._s.stage, self._s.c_secret, self._s.identity_key = _DONE, "", ""
        self._s.own_self_share, self._s.own_pair_shares = "", {}


def _apply_masks(
    quantizer: Quantizer,
    encoded: NDArray[np.unsignedinteger],
    me: int,
    round_id: int,
    seed: bytes,
    pair_keys: dict[int, bytes],
) -> NDArray[np.unsignedinteger]:
    """y = x + PRG(b) + sum_{v > me} PRG(k) - sum_{v < me} PRG(k)  (mod 2^b), in place.

    Bonawitz et al. §3: the lower id adds and the higher subtracts, so pair masks cancel in the sum.
    """
    size, dtype = encoded.shape[0], quantizer.dtype
    np.add(
        encoded,
        crypto.prg(crypto.derive(seed, b"self-mask", round_id, me), size, dtype),
        out=encoded,
    )
    for peer, key in pair_keys.items():
        op = np.add if me < peer else np.subtract
        op(encoded, crypto.prg(key, size, dtype), out=encoded)
    return reduce_mod(encoded, quantizer)


def reduce_mod(
    values: NDArray[np.unsignedinteger], quantizer: Quantizer
) -> NDArray[np.unsignedinteger]:
    """``values mod 2^b`` in place (a no-op when b is the word size: numpy wraps)."""
    if quantizer.params.modulus_bits not in (32, 64):
        np.bitwise_and(values, quantizer.dtype(quantizer.modulus_mask), out=values)
    return values
