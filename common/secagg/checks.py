"""What a site checks before it acts on what the coordinator shows it (Bonawitz et al. 2017, §6).

Each function raises :class:`~common.core.errors.SecAggError` saying what is wrong; the site
(:class:`~common.secagg.client.SecAggClient`) logs it as its reason to refuse and raises it on.
None of them trusts the coordinator: every fact is checked against something a site signed, a
certificate the site's own CA issued, or a commitment made before the fact could be chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from common.core.errors import SecAggError
from common.secagg import auth, crypto
from common.secagg.graph import is_sparse
from common.secagg.messages import KeyAdvert, MaskRequest, adverts_digest
from common.secagg.params import SecAggParams

logger = logging.getLogger(__name__)


def verify_adverts(
    adverts: Mapping[int, KeyAdvert],
    anchor: auth.TrustAnchor,
    session: bytes,
    round_id: int,
    params: SecAggParams,
) -> dict[int, auth.Peer]:
    """Every advert signed, for this session, round and these parameters, by a distinct site the
    CA certified (signed AdvertiseKeys). One bad advert spoils the set: a site would otherwise
    mask with, and share its secrets to, keys nobody vouches for."""
    digest, peers = params.digest(), {}
    for site, advert in sorted(adverts.items()):
        who = f"the key advert of site {site}"
        try:
            if advert.site_id != site:
                raise SecAggError(f"{who} speaks for site {advert.site_id}")
            peer = anchor.peer(advert.cert, who)
            peer.verify(advert.statement(session, round_id, digest), advert.signature, who)
        except SecAggError as err:
            raise SecAggError(f"{err}; refusing a round that contains it") from err
        peers[site] = peer
    identities = [p.fingerprint for p in peers.values()]
    if len(set(identities)) != len(identities):
        raise SecAggError("two key adverts are signed by one identity; refusing the round")
    return peers


def check_own_advert(adverts: Mapping[int, KeyAdvert], own: KeyAdvert) -> None:
    if not own.same_keys(adverts.get(own.site_id)):
        raise SecAggError("the server relayed a wrong advert for this site")


def check_advert_set(adverts: Mapping[int, KeyAdvert], params: SecAggParams) -> None:
    """The set a site would mask with: no public key twice, and t between a strict majority of
    each site's holders and all of them."""
    keys = [k for a in adverts.values() for k in (a.c_public, a.s_public)]
    if len(set(keys)) != len(keys):
        raise SecAggError("two adverts share a public key")
    n, k = len(adverts), params.neighbours
    holders = k + 1 if is_sparse(k, n) else n
    if holders < params.threshold:
        raise SecAggError(
            f"{holders} sites in the neighbourhood, fewer than `threshold` {params.threshold}"
        )
    params.require_majority(holders, "")


def check_reveals(
    request: MaskRequest, params: SecAggParams, revealed: bool, committed: str
) -> None:
    """Under SecAgg+, the graph seed opens every advertiser's commitment over exactly the set
    this site revealed its own share for (``committed``: that set's digest, hex)."""
    if not is_sparse(params.neighbours, len(request.adverts)):
        return  # the complete graph: no seed needed
    if not revealed:
        raise SecAggError("a sparse graph, but this site never revealed its seed share")
    if adverts_digest(request.adverts).hex() != committed:
        raise SecAggError("the adverts differ from the set this site revealed its seed for")
    if set(request.reveals) != set(request.adverts):
        raise SecAggError("the graph seed lacks some advertisers' shares")
    for site, share in request.reveals.items():
        if crypto.commit(b"graph-seed", share) != request.adverts[site].seed_commit:
            raise SecAggError(f"site {site}'s seed share does not open its commitment")


def check_signatures(
    signatures: Mapping[int, bytes],
    survivors: list[int],
    needed: int,
    message: bytes,
    certs: Mapping[int, bytes],
) -> None:
    """At least ``needed`` survivors signed the very lists this site signed (``message``;
    Unmasking: abort unless enough valid signatures of U3 from U4 ⊆ U3). With a strict majority
    of the advertisers required, two different lists cannot both gather enough signatures, so
    every honest site that reveals anything was shown the same lists. ``certs``: the advertisers'
    certificates, checked against the CA when the site masked."""
    signers = set(signatures)
    if not signers <= set(survivors):
        raise SecAggError(f"survivor lists signed by non-survivors {sorted(signers)}")
    if len(signers) < needed:
        raise SecAggError(
            f"only {len(signers)} survivors signed the survivor lists, {needed} needed: "
            "no proof the other sites were shown the same lists"
        )
    for signer, signature in sorted(signatures.items()):
        who = f"the survivor lists of site {signer}"
        try:
            auth.uncertified_peer(certs[signer], who).verify(message, signature, who)
        except SecAggError as err:
            raise SecAggError(
                f"{err}: the coordinator showed sites different survivor lists, or forged a "
                "signature; no share is revealed"
            ) from err
