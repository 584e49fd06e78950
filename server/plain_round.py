"""One training round without secure aggregation: the coordinator sums the plain updates itself.

One invocation per site (``train``); each reply carries the site's update, which is checked
(keys, shapes, finite values, and the clip bound when the coordinator adds institution-level
noise), weighted by the site's public weight and added to the sum. What happens to the sum is
shared with the secure path (common/protocol/aggregate.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.core.adapters import flatten
from common.core.config import Config
from common.core.errors import FedtuneError, RoundError
from common.protocol import keys
from common.protocol.aggregate import RoundSum, SiteReport
from common.protocol.wire import declined_reason, from_record, metrics_of, record_count, to_record
from server.exchange import record_bytes, send_and_receive

logger = logging.getLogger(__name__)


class PlainRound:
    """Round ``round_idx`` over ``grid`` for the sampled nodes; one object per round."""

    def __init__(
        self,
        grid: Grid,
        cfg: Config,
        round_idx: int,
        names: Mapping[int, str],
        weights: Mapping[int, float],
    ) -> None:
        self.grid, self.cfg, self.r = grid, cfg, round_idx
        self.nodes = sorted(weights)
        self.names = {node: names.get(node, str(node)) for node in self.nodes}
        self.weights = weights

    def run(self, state: dict[str, np.ndarray], config: ConfigRecord) -> RoundSum:
        adapter = to_record(state)
        contents = {n: RecordDict({keys.ADAPTER: adapter, keys.CONFIG: config}) for n in self.nodes}
        msgs = [
            Message(c, dst_node_id=n, message_type=keys.TRAIN, group_id=str(self.r))
            for n, c in contents.items()
        ]
        summed = RoundSum(np.zeros(sum(v.size for v in state.values())), 0.0, [])
        # what each site receives: the global weights and the config record (with the head
        # whitening map, `model.head_input = "whitened"`), as a secure-aggregation round counts
        summed.bytes_down = sum(record_bytes(c) for c in contents.values())
        replies = send_and_receive(self.grid, msgs, self.cfg.federation.round_timeout_s)
        for node, reply in replies.items():
            self._add(summed, node, reply, state)
        for node in sorted(set(self.nodes) - set(replies)):
            self._fail(summed, node, "no reply within `federation.round_timeout_s`")
        return summed

    def _add(
        self, summed: RoundSum, node: int, reply: Message, state: dict[str, np.ndarray]
    ) -> None:
        name = self.names[node]
        if reply.has_error():
            self._fail(summed, node, str(reply.error.reason))
            return
        content = reply.content
        reason = declined_reason(content)
        if reason is not None:
            summed.declined[name] = reason
            logger.warning("site %s declined this round: %s", name, reason)
            return
        try:
            record = content.array_records[keys.UPDATE]
            delta = flatten(from_record(record, expected=state)).astype(np.float64)
            self._check_norm(delta)
            metrics = metrics_of(content)
            records = record_count(metrics)
        except (FedtuneError, KeyError, ValueError, TypeError) as err:
            self._fail(summed, node, f"malformed update rejected: {err}")
            return
        summed.total += self.weights[node] * delta
        summed.weight += self.weights[node]
        summed.bytes_up += record_bytes(content, skip=(keys.METRICS,))
        summed.reports.append(SiteReport(name, records, metrics))

    def _check_norm(self, delta: np.ndarray) -> None:
        """With institution-level DP and the noise added here, every update must be clipped."""
        if self.cfg.institution_noise_at != "server":
            return
        norm = float(np.linalg.norm(delta))
        if norm > self.cfg.privacy.institution.clip_norm * (1 + 1e-4):
            raise RoundError(f"update norm {norm:.4g} exceeds `privacy.institution.clip_norm`")

    def _fail(self, summed: RoundSum, node: int, reason: str) -> None:
        name = self.names[node]
        summed.failed[name] = reason
        logger.warning("site %s failed this round: %s", name, reason)
