"""The site's side of secure aggregation over the Message API (docs/secure-aggregation.md).

Three invocations per round, each possibly a new process (Flower's Deployment Engine):

1. ``query.secagg_keys``: create a :class:`SecAggClient`, keep its state in ``context.state``,
   reply with the public keys, signed. Under SecAgg+ it comes a second time with the committed
   adverts: the site reveals its share of the graph seed.
2. ``train`` carrying a mask request: train locally (client/site.py, with institution-level DP
   if on), weight, clip to the quantizer's range, quantize and mask the update; the reply
   carries the masked vector and encrypted shares only.
3. ``query.secagg_unmask``, twice: sign the survivor lists the coordinator shows (the consistency
   check), then, shown enough signatures of those very lists, reveal the shares that remove the
   masks and forget the secrets.

The client state holds secret keys: it lives in ``context.state`` on the site and is never sent.

Identity (:func:`credentials`): a site signs its advert with its identity key and verifies every
peer's against the identity CA it trusts. Both are the site's own: node config ``identity-key``,
``identity-cert``, ``ca-cert`` (PEM files from ``fedtune certs site``), or an identity the site's
own process put in its node state (``keys.STATE_IDENTITY``). Only a virtual site of a simulation
(no ``data-dir`` in its node config) takes the ephemeral identity the coordinator hands out in the
setup message: a simulation has no trust boundary, and that identity protects nothing against
the coordinator that issued it (docs/secure-aggregation.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.core.adapters import flatten
from common.core.config import Config
from common.core.errors import PrivacyError, SecAggError
from common.privacy.accounting import clip_update
from common.privacy.ddg import DdgEncoding, DdgPlan, rotation_seed
from common.protocol import keys
from common.secagg import (
    ConsistencyRequest,
    Credentials,
    Identity,
    MaskRequest,
    SecAggClient,
    SecAggParams,
    SeedRequest,
    TrustAnchor,
    UnmaskRequest,
)

logger = logging.getLogger(__name__)

__all__ = ["advertise", "masked_update", "noise_plan", "unmask"]
PARAM_KEYS = (
    "threshold", "neighbours", "modulus_bits", "clip_range", "stochastic_rounding", "encoding",
)  # fmt: skip


def clip_coordinates(vec: np.ndarray, bound: float) -> tuple[np.ndarray, int]:
    """Clip to [-bound, bound] (the quantizer's range); return the vector and how many moved."""
    clipped = int(np.count_nonzero(np.abs(vec) > bound))
    return np.clip(vec, -bound, bound), clipped


def advertise(
    content: RecordDict, state: RecordDict, node_config: Mapping[str, Any] | None = None
) -> RecordDict:
    """Stage 1: fresh keys for this round, signed; the secret state stays in ``context.state``.

    ``node_config``: the site's (Flower's ``context.node_config``), where its identity is named.
    Under SecAgg+ the same query comes again with the committed adverts (SEED_REQUEST): the site
    checks them and reveals its graph-seed share.
    """
    if keys.SEED_REQUEST in content.config_records:
        request = SeedRequest.from_dict(content.config_records[keys.SEED_REQUEST])
        client = _load(state, request.round_id)
        reveal = client.reveal_seed(request)
        _save(state, client, request.round_id)
        return RecordDict({keys.SEED_REVEAL: ConfigRecord(reveal.to_dict())})
    setup = content.config_records[keys.SETUP]
    params = SecAggParams.from_dict({k: setup[k] for k in PARAM_KEYS})
    round_idx = int(_number(setup, keys.SETUP_ROUND))
    site_id = int(_number(setup, keys.SETUP_SITE_ID))
    session = setup.get(keys.SESSION, "")
    if not isinstance(session, str):
        raise SecAggError(f"`{keys.SESSION}` must be a string in the secure-aggregation setup")
    creds = credentials(setup, state, node_config)
    client = SecAggClient(site_id, params, round_idx, creds, session.encode())
    _save(state, client, round_idx)
    logger.info("secagg round %d: advertised keys as site %d", round_idx, site_id)
    return RecordDict({keys.ADVERT: ConfigRecord(client.advertise().to_dict())})


def credentials(
    setup: ConfigRecord, state: RecordDict, node_config: Mapping[str, Any] | None
) -> Credentials:
    """The site's identity and trusted CA: its node config, else its node state, else (virtual
    sites of a simulation only) the ephemeral identity in the setup message."""
    named = {k: node_config.get(k) for k in _NODE_IDENTITY} if node_config else {}
    if any(named.values()):
        missing = [k for k, v in named.items() if not v]
        if missing:
            raise SecAggError(f"node config names an identity but lacks {', '.join(missing)}")
        return _from_pem(*(_read(k, str(v)) for k, v in named.items()))
    if keys.STATE_IDENTITY in state.config_records:
        record = state.config_records[keys.STATE_IDENTITY]
        return _from_pem(*(_pem(record, k) for k in _NODE_IDENTITY))
    if node_config is not None and "data-dir" in node_config:
        raise SecAggError(_NO_IDENTITY)  # a real site never takes the coordinator's identity
    if keys.SIM_IDENTITY_KEY in setup:
        logger.warning(
            "secure aggregation with an ephemeral identity issued by the coordinator "
            "(simulation): it does not protect against a dishonest coordinator"
        )
        return _from_pem(*(_pem(setup, k) for k in _SIM_IDENTITY))
    raise SecAggError(_NO_IDENTITY)


_NODE_IDENTITY = (keys.IDENTITY_KEY, keys.IDENTITY_CERT, keys.CA_CERT)
_SIM_IDENTITY = (keys.SIM_IDENTITY_KEY, keys.SIM_IDENTITY_CERT, keys.SIM_CA_CERT)
_NO_IDENTITY = (
    "secure aggregation needs this site's identity: start the SuperNode with --node-config "
    "\"identity-key='NAME.identity.key' identity-cert='NAME.identity.crt' "
    "ca-cert='identity-ca.crt'\" (`fedtune certs site NAME`; deploy/README.md)"
)


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as err:
        raise SecAggError(f"node config `{key}`: cannot read {path}: {err.strerror}") from None


def _pem(record: ConfigRecord, key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes | str):
        raise SecAggError(f"`{key}` must hold PEM bytes")
    return value.encode() if isinstance(value, str) else value


def _from_pem(key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> Credentials:
    return Credentials(Identity.from_pem(key_pem, cert_pem), TrustAnchor.from_pem(ca_pem))


def noise_plan(content: RecordDict, state: RecordDict, cfg: Config, dim: int) -> DdgPlan | None:
    """Before training: the plan this site will encode its update under, with distributed noise
    (None without). The site checks it against its own values (:meth:`DdgPlan.refusal`) and
    refuses the round, before spending anything on it, if the plan would weaken its protection
    or is not the one the round's signed parameters name."""
    if keys.MASK_REQUEST not in content:
        raise SecAggError(
            "`secagg.enabled` is true but the train message carries no mask request: "
            "refusing to send a plaintext update"
        )
    round_idx = int(_number(content.config_records[keys.CONFIG], keys.ROUND))
    digest = _load(state, round_idx).params.encoding
    distributed = cfg.institution_noise_at == "sites"
    if distributed != bool(digest):
        raise SecAggError(
            "the round's secure-aggregation parameters do not match the run's noise setting "
            f"(`privacy.institution.noise_at` = {cfg.institution_noise_at}): refusing to mask"
        )
    if not distributed:
        return None
    if keys.DDG_PLAN not in content.config_records:
        raise SecAggError("distributed noise is on but the train message carries no noise plan")
    try:
        plan = DdgPlan.from_dict(dict(content.config_records[keys.DDG_PLAN]))
    except PrivacyError as err:
        raise SecAggError(str(err)) from err
    refusal = plan.refusal(cfg, dim, digest)
    if refusal is not None:
        logger.error("secagg round %d: refusing the coordinator's noise plan: %s", round_idx,
                     refusal)  # fmt: skip
        raise SecAggError(f"refusing the coordinator's noise plan: {refusal}")
    return plan


def masked_update(
    delta: dict[str, np.ndarray],
    content: RecordDict,
    state: RecordDict,
    cfg: Config,
    plan: DdgPlan | None = None,
) -> tuple[RecordDict, int]:
    """Stage 2, after local training: weight, encode and mask.

    The encoding: with distributed noise (``plan``, from :func:`noise_plan`), the distributed
    discrete Gaussian: clip the weighted update to C (again: a weight from the coordinator
    never raises the sensitivity), rotate, scale, round, add exact discrete Gaussian noise from
    a CSPRNG, reduce mod 2^b (common/privacy/ddg.py). Without it: clip to the quantizer's range
    and quantize. Returns the MASKED and UPLOAD records and how many coordinates were clipped;
    no plaintext update leaves.
    """
    if keys.MASK_REQUEST not in content:
        raise SecAggError(
            "`secagg.enabled` is true but the train message carries no mask request: "
            "refusing to send a plaintext update"
        )
    conf = content.config_records[keys.CONFIG]
    round_idx, weight = int(_number(conf, keys.ROUND)), _number(conf, keys.WEIGHT)
    if not (np.isfinite(weight) and weight > 0):
        raise SecAggError(f"`{keys.WEIGHT}` must be a finite number > 0, got {weight!r}")
    client = _load(state, round_idx)
    if bool(plan) != bool(client.params.encoding):
        raise SecAggError("the noise plan and the round's parameters disagree: refusing to mask")
    # float64: float32 rounding of the weighted values would exceed the quantization error bound.
    weighted = flatten(delta).astype(np.float64) * weight
    request = MaskRequest.from_dict(content.config_records[keys.MASK_REQUEST])
    if plan is not None:
        clipped_vec, _ = clip_update(weighted, cfg.privacy.institution.clip_norm)
        run_id = str(conf.get(keys.RUN_ID, ""))
        try:
            vec = DdgEncoding(plan, rotation_seed(run_id, round_idx)).encode(clipped_vec)
        except PrivacyError as err:
            raise SecAggError(str(err)) from err
        clipped = 0
    else:
        vec, clipped = clip_coordinates(weighted, cfg.quantizer_range)
    upload = client.mask(vec, request)
    _save(state, client, round_idx)
    if clipped:
        logger.warning("secagg round %d: %d coordinate(s) clipped to the range", round_idx, clipped)
    records = RecordDict(
        {
            keys.MASKED: ArrayRecord(array_dict={keys.MASKED_ARRAY: Array(upload.masked)}),
            keys.UPLOAD: ConfigRecord(upload.to_dict()),
        }
    )
    return records, clipped


def unmask(content: RecordDict, state: RecordDict) -> RecordDict:
    """Stage 3, two calls: sign the survivor lists (the message carries SURVIVORS), then reveal
    the shares that remove the masks once enough sites signed the same lists; then forget."""
    if keys.SURVIVORS in content.config_records:
        lists = ConsistencyRequest.from_dict(content.config_records[keys.SURVIVORS])
        client = _load(state, lists.round_id)
        signed = client.sign_survivors(lists)
        _save(state, client, lists.round_id)
        return RecordDict({keys.SURVIVORS_SIGNED: ConfigRecord(signed.to_dict())})
    request = UnmaskRequest.from_dict(content.config_records[keys.UNMASK_REQUEST])
    client = _load(state, request.round_id)
    reply = client.unmask(request)
    _save(state, client, request.round_id)
    return RecordDict({keys.UNMASK_REPLY: ConfigRecord(reply.to_dict())})


def _number(record: ConfigRecord, key: str) -> float:
    value = record.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SecAggError(f"`{key}` must be a number in the secure-aggregation message")
    return float(value)


def _save(state: RecordDict, client: SecAggClient, round_idx: int) -> None:
    state[keys.STATE_SECAGG] = ConfigRecord({"client": client.to_bytes(), "round": round_idx})


def _load(state: RecordDict, round_idx: int) -> SecAggClient:
    record = state.config_records.get(keys.STATE_SECAGG)
    if record is None or record.get("round") != round_idx:
        raise SecAggError(
            f"no secure-aggregation state for round {round_idx} on this site: "
            "its key advertisement for this round did not happen here"
        )
    return SecAggClient.from_bytes(bytes(record["client"]))  # type: ignore[arg-type]
