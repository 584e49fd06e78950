"""One training round under secure aggregation: the coordinator's driver over the Message API.

Site invocations (docs/secure-aggregation.md): ``query.secagg_keys`` (signed key adverts; under
SecAgg+ a second time to reveal the graph-seed shares) -> ``train`` with the mask request (the site
trains, then uploads a masked vector and encrypted shares) -> ``query.secagg_unmask`` twice (sign
the survivor lists; then reveal shares). The coordinator only ever holds masked vectors and the
final sum.

Flower node ids (uint64) map to protocol site ids 0..n-1 by sorted node id. Sites pre-multiply
their update by their public weight ``w_i`` (common/protocol/aggregate.py: site_weights); the
unmasked sum and the contributors' ``sum w_i`` are this path's RoundSum. What happens to it (the
min-sites rule, noise, the step) is shared with the plain path.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.core.config import Config
from common.core.errors import PrivacyError, RoundError, SecAggError
from common.identity.certs import EphemeralFederation, ephemeral_federation
from common.privacy.ddg import DdgEncoding, DdgPlan, plan_for, rotation_seed
from common.protocol import keys
from common.protocol.aggregate import RoundSum, SiteReport, require_min_sites
from common.protocol.wire import declined_reason, metrics_of, record_count, to_record
from common.secagg import (
    AggregateResult,
    ConsistencyRequest,
    KeyAdvert,
    MaskedUpload,
    SecAggParams,
    SecAggServer,
    SeedRequest,
    SeedReveal,
    SurvivorSignature,
    TrustAnchor,
    UnmaskReply,
)
from server.exchange import record_bytes, send_and_receive

logger = logging.getLogger(__name__)
T = TypeVar("T")


def threshold_for(cfg: Config, sampled: int) -> int:
    """t = max(2, ceil(secagg.threshold * m)), m the holders of each site's shares: all
    ``sampled`` sites (SecAgg), or a site and its k neighbours (SecAgg+, k < sampled - 1). Never
    a sum of one site; `secagg.threshold` > 0.5 makes t a strict majority of m."""
    k = cfg.secagg.neighbours
    holders = sampled if k == 0 or k >= sampled - 1 else k + 1
    return max(2, math.ceil(round(cfg.secagg.threshold * holders, 9)))


class SecAggRound:
    """Drives round ``round_idx`` over ``grid`` for the sampled nodes; one object per round."""

    def __init__(
        self,
        grid: Grid,
        cfg: Config,
        round_idx: int,
        names: Mapping[int, str],
        weights: Mapping[int, float],
        expected: int = 0,
    ) -> None:
        """``expected``: the sites expected per round (the DP-FedAvg denominator); with
        distributed noise the coordinator adds the noise shares of those missing from it."""
        self.grid, self.cfg, self.r, self.expected = grid, cfg, round_idx, expected
        self.nodes = sorted(weights)
        self.site_of = {node: i for i, node in enumerate(self.nodes)}
        self.names = {node: names.get(node, str(node)) for node in self.nodes}
        self.weights = weights
        self.params = SecAggParams(
            threshold=threshold_for(cfg, len(self.nodes)),
            # k >= n - 1 is the complete graph: say so, t is a majority of n then.
            neighbours=k if (k := cfg.secagg.neighbours) < len(self.nodes) - 1 else 0,
            modulus_bits=cfg.secagg.modulus_bits,
            clip_range=cfg.quantizer_range,
        )
        self.plan: DdgPlan | None = None  # distributed noise: set by `run` (needs d)
        self.session = ""  # the run id, set by `run`
        self.ephemeral: EphemeralFederation | None = None
        self.summed = RoundSum(np.zeros(0), 0.0, [])
        self.dropped: dict[str, str] = {}  # site -> stage it dropped at
        self.clipped = 0  # coordinates clipped to the quantizer's range, summed over sites

    def run(self, state: dict[str, np.ndarray], config: ConfigRecord) -> RoundSum:
        """All stages; SecAggError (too few sites at any stage) becomes RoundError."""
        self.session = str(config.get(keys.RUN_ID, ""))
        if self.cfg.institution_noise_at == "sites":
            dim = sum(v.size for v in state.values())
            try:
                self.plan = plan_for(self.cfg, dim, self.expected or len(self.nodes))
            except PrivacyError as err:
                raise RoundError(f"round {self.r}: {err}") from err
            self.params = dataclasses.replace(self.params, encoding=self.plan.digest())
        # Virtual sites of a simulation (a data root is set) have no identities of their own: the
        # coordinator issues ephemeral ones (an in-memory CA per round). Real sites bring theirs.
        simulated = bool(config.get(keys.DATA_ROOT))
        self.ephemeral = ephemeral_federation(list(self.names.values())) if simulated else None
        anchor = TrustAnchor.from_pem(self.ephemeral.ca_cert) if self.ephemeral else None
        try:
            server = SecAggServer(
                self.params, self.r, range(len(self.nodes)),
                session=self.session.encode(), anchor=anchor,
            )  # fmt: skip
            adverts = self._keys(server)
            by_site = {self.site_of[n]: a for n, a in adverts.items()}
            seed_request = server.seed_request(by_site)
            reveals = self._seed(seed_request) if seed_request is not None else {}
            request = server.mask_request(by_site, reveals)
            self._train(server, request.to_dict(), state, config, list(adverts))
            # Before anything is unmasked: a sum of too few sites is never revealed.
            problems = {**self.summed.failed, **self.summed.declined}
            require_min_sites(self.cfg, self.r, len(self.summed.reports), problems)
            signatures = self._survivors(server.consistency_request())
            replies = self._unmask(server.unmask_requests(signatures))
            result = server.finish(replies)
        except SecAggError as err:
            raise RoundError(f"round {self.r}: secure aggregation aborted: {err}") from err
        return self._sum(result)

    # -- stages ------------------------------------------------------------------------------
    def _keys(self, server: SecAggServer) -> dict[int, KeyAdvert]:
        contents = {n: RecordDict({keys.SETUP: self._setup(n)}) for n in self.nodes}
        replies = self._exchange("keys", keys.KEYS, contents)
        adverts = self._parse("keys", replies, lambda n, c: self._advert(server, n, c))
        seen: dict[bytes, int] = {}
        for node in sorted(adverts):  # one identity, one site: a second advert is dropped
            identity = server.check_advert(adverts[node]).fingerprint
            if identity in seen:
                self._drop(node, "keys", f"advert signed by the identity of node {seen[identity]}")
                del adverts[node]
            seen.setdefault(identity, node)
        return adverts

    def _advert(self, server: SecAggServer, node: int, content: RecordDict) -> KeyAdvert:
        """A site's advert, dropped here if its signature does not verify: every honest site
        would refuse a round that contains it."""
        advert = self._own(node, KeyAdvert.from_dict(content.config_records[keys.ADVERT]))
        server.check_advert(advert)
        return advert

    def _train(
        self,
        server: SecAggServer,
        request: dict[str, Any],
        state: dict[str, np.ndarray],
        config: ConfigRecord,
        nodes: list[int],
    ) -> None:
        adapter, mask_request = to_record(state), ConfigRecord(request)
        size = self.plan.padded if self.plan else sum(v.size for v in state.values())
        plan = {keys.DDG_PLAN: ConfigRecord(dict(self.plan.to_dict()))} if self.plan else {}
        contents = {
            n: RecordDict(
                {
                    keys.ADAPTER: adapter,
                    keys.CONFIG: ConfigRecord({**config, keys.WEIGHT: self.weights[n]}),
                    keys.MASK_REQUEST: mask_request,
                    **plan,
                }
            )
            for n in nodes
        }
        replies = self._exchange("train", keys.TRAIN, contents)
        self._parse("train", replies, lambda n, c: self._upload(server, n, c, size))

    def _upload(self, server: SecAggServer, node: int, content: RecordDict, size: int) -> None:
        """Check one site's upload and add it to the masked sum; keep its metrics only."""
        reason = declined_reason(content)
        if reason is not None:  # over its privacy budget: a dropout, said out loud
            self.summed.declined[self.names[node]] = reason
            raise SecAggError(f"declined: {reason}")
        metrics = metrics_of(content)
        report = SiteReport(self.names[node], record_count(metrics), metrics)
        masked = content.array_records[keys.MASKED][keys.MASKED_ARRAY].numpy()
        if masked.shape != (size,):
            raise SecAggError(f"masked vector has shape {masked.shape}, expected ({size},)")
        upload = MaskedUpload.from_dict(content.config_records[keys.UPLOAD], masked)
        server.add_upload(self._own(node, upload))  # raises before adding anything
        self.clipped += int(metrics.get(keys.SECAGG_CLIPPED, 0))
        self.summed.reports.append(report)

    def _seed(self, request: SeedRequest) -> dict[int, SeedReveal]:
        """SecAgg+: every advertiser reveals its committed graph-seed share (one missing aborts
        the round in mask_request: the coordinator must not pick who counts after seeing them)."""
        record = ConfigRecord(request.to_dict())
        contents = {self.nodes[s]: RecordDict({keys.SEED_REQUEST: record}) for s in request.adverts}
        replies = self._exchange("seed", keys.KEYS, contents)
        parsed = self._parse(
            "seed",
            replies,
            lambda n, c: self._own(n, SeedReveal.from_dict(c.config_records[keys.SEED_REVEAL])),
        )
        return {self.site_of[n]: reveal for n, reveal in parsed.items()}

    def _survivors(self, lists: ConsistencyRequest) -> dict[int, SurvivorSignature]:
        """The consistency check: every survivor signs the survivor lists it is shown."""
        record = ConfigRecord(lists.to_dict())
        contents = {self.nodes[s]: RecordDict({keys.SURVIVORS: record}) for s in lists.survivors}
        replies = self._exchange("survivors", keys.UNMASK, contents)
        parsed = self._parse(
            "survivors",
            replies,
            lambda n, c: self._own(
                n, SurvivorSignature.from_dict(c.config_records[keys.SURVIVORS_SIGNED])
            ),
        )
        return {self.site_of[n]: signed for n, signed in parsed.items()}

    def _unmask(self, requests: Mapping[int, Any]) -> dict[int, UnmaskReply]:
        contents = {
            self.nodes[s]: RecordDict({keys.UNMASK_REQUEST: ConfigRecord(req.to_dict())})
            for s, req in requests.items()
        }
        replies = self._exchange("unmask", keys.UNMASK, contents)
        parsed = self._parse(
            "unmask",
            replies,
            lambda n, c: self._own(n, UnmaskReply.from_dict(c.config_records[keys.UNMASK_REPLY])),
        )
        return {self.site_of[n]: reply for n, reply in parsed.items()}

    def _sum(self, result: AggregateResult) -> RoundSum:
        contributors = [self.nodes[s] for s in result.contributors]
        summed = self.summed
        # A site that declined also dropped out of the protocol; it is reported as declined only.
        summed.failed = {k: v for k, v in summed.failed.items() if k not in summed.declined}
        summed.total = result.total
        if self.plan is not None:  # integers in Z_{2^b}: top up the missing shares, decode
            missing = max(0, self.expected - len(contributors))
            encoding = DdgEncoding(self.plan, rotation_seed(self.session, self.r))
            summed.total = encoding.decode_sum(result.total, top_up=missing)
            summed.extra["ddg_top_up_shares"] = missing
        summed.weight = float(sum(self.weights[n] for n in contributors))
        bound = result.error_bound / summed.weight  # per coordinate, on the averaged update
        summed.extra = {
            **summed.extra,
            "secagg_error_bound": bound,
            "secagg_dropped": self.dropped,
            "secagg_clipped": self.clipped,
        }
        logger.info(
            "round %d: secure sum of %d site(s), error bound %.3g per coordinate",
            self.r,
            len(contributors),
            bound,
        )
        return summed

    # -- plumbing ----------------------------------------------------------------------------
    def _setup(self, node: int) -> ConfigRecord:
        setup: dict[str, Any] = {
            keys.SETUP_ROUND: self.r,
            keys.SETUP_SITE_ID: self.site_of[node],
            keys.SESSION: self.session,
            **self.params.to_dict(),
        }
        if self.ephemeral is not None:  # simulation only (see `run`)
            key_pem, cert_pem = self.ephemeral.identities[self.names[node]]
            setup[keys.SIM_IDENTITY_KEY], setup[keys.SIM_IDENTITY_CERT] = key_pem, cert_pem
            setup[keys.SIM_CA_CERT] = self.ephemeral.ca_cert
        return ConfigRecord(setup)

    def _exchange(
        self, stage: str, message_type: str, contents: dict[int, RecordDict]
    ) -> dict[int, RecordDict]:
        """Send one stage's messages; return the good replies' content, record the failures."""
        msgs = [
            Message(c, dst_node_id=n, message_type=message_type, group_id=str(self.r))
            for n, c in contents.items()
        ]
        self.summed.bytes_down += sum(record_bytes(c) for c in contents.values())
        timeout = self.cfg.federation.round_timeout_s
        good: dict[int, RecordDict] = {}
        for node, reply in send_and_receive(self.grid, msgs, timeout).items():
            if node not in contents or node in good:
                continue
            if reply.has_error():
                self._drop(node, stage, str(reply.error.reason))
            else:
                good[node] = reply.content
                self.summed.bytes_up += record_bytes(reply.content, skip=(keys.METRICS,))
        for node in sorted(set(contents) - set(good)):
            if self.names[node] not in self.dropped:
                self._drop(node, stage, "no reply within `federation.round_timeout_s`")
        return good

    def _parse(
        self, stage: str, replies: dict[int, RecordDict], parse: Callable[[int, RecordDict], T]
    ) -> dict[int, T]:
        parsed: dict[int, T] = {}
        for node, content in replies.items():
            try:
                parsed[node] = parse(node, content)
            except (SecAggError, KeyError, TypeError, ValueError) as err:
                self._drop(node, stage, f"malformed {stage} reply rejected: {err}")
        return parsed

    def _own(self, node: int, message: T) -> T:
        """A reply must speak for the site id this node was given (no site answers for another)."""
        if getattr(message, "site_id", None) != self.site_of[node]:
            raise SecAggError(f"reply claims another site's id, expected {self.site_of[node]}")
        return message

    def _drop(self, node: int, stage: str, reason: str) -> None:
        """A site lost at `keys` or `train` is not in the sum; one lost later still is."""
        name = self.names[node]
        if stage not in ("survivors", "unmask"):
            self.summed.failed[name] = f"secagg {stage}: {reason}"
        self.dropped[name] = stage
        logger.warning("site %s dropped at secagg stage `%s`: %s", name, stage, reason)
