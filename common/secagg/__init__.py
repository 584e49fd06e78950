"""Secure aggregation (Bonawitz et al. CCS 2017; SecAgg+, Bell et al. CCS 2020), without Flower.

The server learns the sum of the sites' updates and nothing else about any one of them; sites may
drop out at any stage after key advertisement while at least ``threshold`` survive. Full spec:
docs/secure-aggregation.md.

Public API (three site calls per round; every message is plain data via ``to_dict``/``from_dict``):

Every site holds :class:`Credentials`: its identity (an ECDSA P-256 key certified by the
federation's identity CA) and that CA's certificate; adverts are signed and verified with them.

Site (each call may be a new process; persist ``to_bytes()``, rebuild with ``from_bytes``)::

    client = SecAggClient(site_id, params, round_id, credentials, session)
    advert: KeyAdvert = client.advertise()                               # stage 1
    reveal: SeedReveal = client.reveal_seed(seed_request)                # stage 1b (SecAgg+)
    upload: MaskedUpload = client.mask(update_float32_1d, mask_request)  # stage 2
    signed: SurvivorSignature = client.sign_survivors(consistency)        # stage 3a
    reply: UnmaskReply = client.unmask(unmask_request)                   # stage 3b

Server::

    server = SecAggServer(params, round_id, sampled_site_ids, session=session)
    seed_request = server.seed_request(adverts)      # SecAgg+: to every advertiser; else None
    mask_request: MaskRequest = server.mask_request(adverts, reveals)     # to every advertiser
    server.add_upload(upload)                                             # per upload received
    consistency: ConsistencyRequest = server.consistency_request()        # to every survivor
    requests = server.unmask_requests({site: signed, ...})                # one per signer
    result: AggregateResult = server.finish({site: reply, ...})           # .total, .contributors

``simulate_round(updates, params, credentials, drop_after_stage=...)`` runs a round in one process.
"""

from common.secagg.auth import Credentials, Identity, TrustAnchor
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
from common.secagg.quantize import Quantizer
from common.secagg.server import AggregateResult, SecAggServer
from common.secagg.simulate import simulate_round

__all__ = [
    "AggregateResult",
    "ConsistencyRequest",
    "Credentials",
    "Identity",
    "KeyAdvert",
    "MaskRequest",
    "MaskedUpload",
    "Quantizer",
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "SeedRequest",
    "SeedReveal",
    "SurvivorSignature",
    "TrustAnchor",
    "UnmaskReply",
    "UnmaskRequest",
    "simulate_round",
]
