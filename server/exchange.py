"""Send messages to sites and collect the replies, polling the SuperLink briskly.

Flower's `Grid.send_and_receive` sleeps 3 s between pulls, so every exchange costs up to 3 s of
idle waiting even when every site has already answered; a secure-aggregation round has three
exchanges. This is the same push-then-pull loop with a short poll (a pull is one small request to
the SuperLink) that also returns as soon as every message has its reply.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

POLL_S = 0.25


_PROGRESS: list[Callable[[int, int], None]] = []


@contextlib.contextmanager
def reporting(callback: Callable[[int, int], None]) -> Iterator[None]:
    """While the block runs, every exchange reports (replied, asked) to ``callback``: the live
    view's "k of n sites replied"."""
    _PROGRESS.append(callback)
    try:
        yield
    finally:
        _PROGRESS.remove(callback)


def _report(replied: int, asked: int) -> None:
    for callback in _PROGRESS:
        callback(replied, asked)


def send_and_receive(
    grid: Any, messages: Iterable[Message], timeout: float, poll_s: float = POLL_S
) -> dict[int, Message]:
    """Push ``messages``; return the replies that arrive within ``timeout``, by destination node.

    A reply is matched to the node its message went to through the message id, not through the
    reply's source: the SuperLink itself answers for a node that stopped sending heartbeats.
    A message the SuperLink did not accept (id None) gets no reply.
    """
    msgs = list(messages)
    ids = list(grid.push_messages(msgs))
    node_of = {i: m.metadata.dst_node_id for i, m in zip(ids, msgs, strict=True) if i is not None}
    deadline = time.monotonic() + timeout
    replies: dict[int, Message] = {}
    pending = set(node_of)
    _report(0, len(msgs))
    while pending:
        for reply in grid.pull_messages(pending):
            msg_id = reply.metadata.reply_to_message_id
            if msg_id in pending:
                pending.discard(msg_id)
                replies[node_of[msg_id]] = reply
        _report(len(replies), len(msgs))
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return replies


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
