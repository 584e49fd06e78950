"""One training round under secure aggregation: the coordinator's driver over the Message API.

Three site invocations (docs/secure-aggregation.md): ``query.secagg_keys`` -> ``train`` with the
mask request (the site trains, then uploads a masked vector and encrypted shares) ->
``query.secagg_unmask``. The coordinator only ever holds masked vectors and the final sum.

Flower node ids (uint64) map to protocol site ids 0..n-1 by sorted node id. Sites pre-multiply
their update by a public weight ``w_i`` (records / mean records of the sampled sites, from
preflight; 1 without record weighting); the server divides the unmasked sum by the contributors'
``sum w_i``, which equals WeightedFedAvg's average. ``server_lr`` is applied by the strategy.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.core.adapters import unflatten
from common.core.config import Config
from common.core.errors import RoundError, SecAggError
from common.protocol.secagg_keys import (
    ADVERT,
    KEYS_QUERY,
    MASK_REQUEST,
    MASKED,
    SETUP,
    UNMASK_QUERY,
    UNMASK_REPLY,
    UNMASK_REQUEST,
    UPLOAD,
    WEIGHT_KEY,
)
from common.protocol.wire import to_record
from common.secagg import (
    AggregateResult,
    KeyAdvert,
    MaskedUpload,
    SecAggParams,
    SecAggServer,
    UnmaskReply,
)
from server.exchange import send_and_receive
from server.strategy import SiteUpdate

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class SecAggStats:
    """What a round under secure aggregation reports (never an individual update)."""

    reports: list[SiteUpdate] = field(default_factory=list)  # contributors' metrics, no delta
    failed: dict[str, str] = field(default_factory=dict)  # site -> reason
    dropped: dict[str, str] = field(default_factory=dict)  # site -> stage it dropped at
    bytes_up: int = 0
    bytes_down: int = 0
    error_bound: float = 0.0  # per coordinate, on the averaged update, in-range inputs
    clipped: int = 0  # coordinates clipped to `secagg.clip_range`, summed over sites
    declined: dict[str, str] = field(default_factory=dict)  # site -> why (privacy budget)

    def row(self) -> dict[str, Any]:
        return {
            "secagg_error_bound": self.error_bound,
            "secagg_dropped": self.dropped,
            "secagg_clipped": self.clipped,
        }


@dataclass
class SecAggRoundResult:
    delta: OrderedDict[str, np.ndarray]  # sum_i w_i delta_i / sum_i w_i over contributors
    records: int  # contributors' records
    stats: SecAggStats


def threshold_for(cfg: Config, sampled: int) -> int:
    """t = max(2, ceil(secagg.threshold * n)): never a sum of one site."""
    return max(2, math.ceil(round(cfg.secagg.threshold * sampled, 9)))


class SecAggRound:
    """Drives round ``round_idx`` over ``grid`` for the sampled nodes; one object per round."""

    def __init__(
        self,
        grid: Grid,
        cfg: Config,
        round_idx: int,
        names: Mapping[int, str],
        records: Mapping[int, int],
    ) -> None:
        self.grid, self.cfg, self.r = grid, cfg, round_idx
        self.nodes = sorted(records)
        self.site_of = {node: i for i, node in enumerate(self.nodes)}
        self.names = {node: names.get(node, str(node)) for node in self.nodes}
        self.weights = _weights(cfg, records, self.nodes)
        self.params = SecAggParams(
            threshold=threshold_for(cfg, len(self.nodes)),
            neighbours=cfg.secagg.neighbours,
            modulus_bits=cfg.secagg.modulus_bits,
            clip_range=cfg.quantizer_range,
        )
        self.stats = SecAggStats()

    def run(self, state: dict[str, np.ndarray], config: ConfigRecord) -> SecAggRoundResult:
        """All three stages; SecAggError (too few sites at any stage) becomes RoundError."""
        try:
            server = SecAggServer(self.params, self.r, range(len(self.nodes)))
            adverts = self._keys()
            request = server.mask_request({self.site_of[n]: a for n, a in adverts.items()})
            self._train(server, request.to_dict(), state, config, list(adverts))
            self._require_min_sites()
            replies = self._unmask(server.unmask_requests())
            result = server.finish(replies)
        except SecAggError as err:
            raise RoundError(f"round {self.r}: secure aggregation aborted: {err}") from err
        return self._average(result, state)

    # -- stages ------------------------------------------------------------------------------
    def _keys(self) -> dict[int, KeyAdvert]:
        contents = {n: RecordDict({SETUP: self._setup(n)}) for n in self.nodes}
        replies = self._exchange("keys", f"query.{KEYS_QUERY}", contents)
        return self._parse(
            "keys",
            replies,
            lambda n, c: self._own(n, KeyAdvert.from_dict(c.config_records[ADVERT])),
        )

    def _train(
        self,
        server: SecAggServer,
        request: dict[str, Any],
        state: dict[str, np.ndarray],
        config: ConfigRecord,
        nodes: list[int],
    ) -> None:
        adapter, mask_request = to_record(state), ConfigRecord(request)
        size = sum(v.size for v in state.values())
        contents = {
            n: RecordDict(
                {
                    "adapter": adapter,
                    "config": ConfigRecord({**config, WEIGHT_KEY: self.weights[n]}),
                    MASK_REQUEST: mask_request,
                }
            )
            for n in nodes
        }
        replies = self._exchange("train", "train", contents)
        self._parse("train", replies, lambda n, c: self._upload(server, n, c, size))

    def _upload(self, server: SecAggServer, node: int, content: RecordDict, size: int) -> None:
        """Check one site's upload and add it to the masked sum; keep its metrics only."""
        if "declined" in content:  # over its privacy budget: a dropout, said out loud
            reason = str(content.config_records["declined"]["reason"])
            self.stats.declined[self.names[node]] = reason
            raise SecAggError(f"declined: {reason}")
        metrics = {k: float(v) for k, v in content.metric_records["metrics"].items()}  # type: ignore[arg-type]
        report = SiteUpdate(self.names[node], {}, int(metrics["num-examples"]), metrics)
        masked = content.array_records[MASKED]["masked"].numpy()
        if masked.shape != (size,):
            raise SecAggError(f"masked vector has shape {masked.shape}, expected ({size},)")
        upload = MaskedUpload.from_dict(content.config_records[UPLOAD], masked)
        server.add_upload(self._own(node, upload))  # raises before adding anything
        self.stats.clipped += int(metrics.get("secagg-clipped", 0))
        self.stats.reports.append(report)

    def _unmask(self, requests: Mapping[int, Any]) -> dict[int, UnmaskReply]:
        contents = {
            self.nodes[s]: RecordDict({UNMASK_REQUEST: ConfigRecord(req.to_dict())})
            for s, req in requests.items()
        }
        replies = self._exchange("unmask", f"query.{UNMASK_QUERY}", contents)
        parsed = self._parse(
            "unmask",
            replies,
            lambda n, c: self._own(n, UnmaskReply.from_dict(c.config_records[UNMASK_REPLY])),
        )
        return {self.site_of[n]: reply for n, reply in parsed.items()}

    def _require_min_sites(self) -> None:
        count, needed = len(self.stats.reports), self.cfg.federation.min_sites
        if count < needed:
            detail = "; ".join(f"{s}: {e}" for s, e in self.stats.failed.items()) or "none failed"
            raise RoundError(
                f"round {self.r}: {count} site(s) succeeded, `federation.min_sites` is "
                f"{needed} ({detail})"
            )

    def _average(self, result: AggregateResult, state: dict[str, np.ndarray]) -> SecAggRoundResult:
        contributors = [self.nodes[s] for s in result.contributors]
        total_weight = float(sum(self.weights[n] for n in contributors))
        self.stats.error_bound = result.error_bound / total_weight
        delta = unflatten(result.total / total_weight, state)
        records = sum(r.records for r in self.stats.reports)
        logger.info(
            "round %d: secure sum of %d site(s), error bound %.3g per coordinate",
            self.r,
            len(contributors),
            self.stats.error_bound,
        )
        return SecAggRoundResult(delta, records, self.stats)

    # -- plumbing ----------------------------------------------------------------------------
    def _setup(self, node: int) -> ConfigRecord:
        return ConfigRecord(
            {"round": self.r, "site-id": self.site_of[node], **self.params.to_dict()}
        )

    def _exchange(
        self, stage: str, message_type: str, contents: dict[int, RecordDict]
    ) -> dict[int, RecordDict]:
        """Send one stage's messages; return the good replies' content, record the failures."""
        msgs = [
            Message(c, dst_node_id=n, message_type=message_type, group_id=str(self.r))
            for n, c in contents.items()
        ]
        self.stats.bytes_down += sum(record_bytes(c) for c in contents.values())
        timeout = self.cfg.federation.round_timeout_s
        good: dict[int, RecordDict] = {}
        for node, reply in send_and_receive(self.grid, msgs, timeout).items():
            if node not in contents or node in good:
                continue
            if reply.has_error():
                self._drop(node, stage, str(reply.error.reason))
            else:
                good[node] = reply.content
                self.stats.bytes_up += record_bytes(reply.content, skip=("metrics",))
        for node in sorted(set(contents) - set(good)):
            if self.names[node] not in self.stats.dropped:
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
        """A site lost at `keys` or `train` is not in the sum; one lost at `unmask` still is."""
        name = self.names[node]
        if stage != "unmask":
            self.stats.failed[name] = f"secagg {stage}: {reason}"
        self.stats.dropped[name] = stage
        logger.warning("site %s dropped at secagg stage `%s`: %s", name, stage, reason)


def _weights(cfg: Config, records: Mapping[int, int], nodes: list[int]) -> dict[int, float]:
    """Public per-site weights with mean 1 over the sampled sites (records weighting), else 1."""
    if cfg.site_weighting != "records":
        return {n: 1.0 for n in nodes}
    mean = sum(records[n] for n in nodes) / len(nodes)
    if mean <= 0:
        raise RoundError("site weights sum to zero (every site reported 0 records)")
    return {n: records[n] / mean for n in nodes}


def record_bytes(content: RecordDict, skip: tuple[str, ...] = ()) -> int:
    """Bytes of arrays and config values (Flower's ConfigRecord.count_bytes fails on [])."""
    total = 0
    for name, record in content.items():
        if name in skip:
            continue
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        elif isinstance(record, ConfigRecord):
            total += sum(len(k) + _value_bytes(v) for k, v in record.items())
    return total


def _value_bytes(value: Any) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, (bytes, str)):
        return len(value)
    return 1 if isinstance(value, bool) else 8
