"""Send messages to sites and collect the replies, polling the SuperLink briskly.

Flower's `Grid.send_and_receive` sleeps 3 s between pulls, so every exchange costs up to 3 s of
idle waiting even when every site has already answered; a secure-aggregation round has three
exchanges. This is the same push-then-pull loop with a short poll (a pull is one small request to
the SuperLink) that also returns as soon as every message has its reply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message

POLL_S = 0.25


def send_and_receive(
    grid: Any, messages: Iterable[Message], timeout: float, poll_s: float = POLL_S
) -> list[Message]:
    """Push ``messages``; return the replies that arrive within ``timeout`` seconds."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return replies
