"""A whole round in one process, for tests and benchmarks.

It follows the deployment path: every message goes through ``to_dict``/``from_dict`` and every
site's state through ``to_bytes``/``from_bytes`` between stages, as separate ClientApp calls would.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from common.secagg.auth import Credentials
from common.secagg.client import SecAggClient
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
)
from common.secagg.params import SecAggParams
from common.secagg.server import AggregateResult, SecAggServer

logger = logging.getLogger(__name__)


def simulate_round(
    updates: Mapping[int, NDArray[np.floating]],
    params: SecAggParams,
    credentials: Mapping[int, Credentials],
    round_id: int = 0,
    drop_after_stage: Mapping[int, int] | None = None,
    session: bytes = b"simulated run",
) -> AggregateResult:
    """Sum ``updates`` (site id -> 1-D float array) under secure aggregation.

    ``credentials[site]``: that site's identity and trusted CA (tests and benchmarks make them with
    ``common.identity.certs.ephemeral_federation``). ``drop_after_stage[site] = s`` makes the site
    vanish after completing stage ``s``: 0 never advertises, 1 advertises but never uploads,
    2 uploads but never signs the survivor lists (nor unmasks), 3 signs but never unmasks.
    Raises :class:`~common.core.errors.SecAggError` when the round aborts.
    """
    drops = dict(drop_after_stage or {})
    alive = lambda site, stage: drops.get(site, 4) >= stage  # noqa: E731
    server = SecAggServer(params, round_id, updates, session=session)
    states: dict[int, bytes] = {}
    adverts: dict[int, KeyAdvert] = {}
    for site in (s for s in updates if alive(s, 1)):
        client = SecAggClient(site, params, round_id, credentials[site], session)
        adverts[site] = KeyAdvert.from_dict(client.advertise().to_dict())
        states[site] = client.to_bytes()
    seed_request = server.seed_request(adverts)
    reveals: dict[int, SeedReveal] = {}
    if seed_request is not None:  # SecAgg+: every advertiser opens its seed commitment
        wire = seed_request.to_dict()
        for site in adverts:
            client = SecAggClient.from_bytes(states[site])
            revealed = client.reveal_seed(SeedRequest.from_dict(wire))
            reveals[site] = SeedReveal.from_dict(revealed.to_dict())
            states[site] = client.to_bytes()
    request = server.mask_request(adverts, reveals).to_dict()
    for site in (s for s in adverts if alive(s, 2)):
        client = SecAggClient.from_bytes(states[site])
        upload = client.mask(updates[site], MaskRequest.from_dict(request))
        server.add_upload(MaskedUpload.from_dict(upload.to_dict(), upload.masked))
        states[site] = client.to_bytes()
    lists = server.consistency_request().to_dict()
    signatures: dict[int, SurvivorSignature] = {}
    for site in lists["survivors"]:
        if alive(site, 3):
            client = SecAggClient.from_bytes(states[site])
            signed = client.sign_survivors(ConsistencyRequest.from_dict(lists))
            signatures[site] = SurvivorSignature.from_dict(signed.to_dict())
            states[site] = client.to_bytes()
    replies: dict[int, UnmaskReply] = {}
    for site, unmask in server.unmask_requests(signatures).items():
        if alive(site, 4):
            client = SecAggClient.from_bytes(states[site])
            reply = client.unmask(UnmaskRequest.from_dict(unmask.to_dict()))
            replies[site] = UnmaskReply.from_dict(reply.to_dict())
    return server.finish(replies)
