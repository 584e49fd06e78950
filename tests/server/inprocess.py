"""A Grid that delivers messages to the real ClientApp in this process (unit tests only).

The e2e tests use Flower's real engines; this one lets a test watch a round loop closely and
inject faults. Exceptions in the ClientApp become error replies, as in Flower's engines.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid:
    def __init__(
        self,
        client_app: ClientApp,
        node_configs: dict[int, dict],
        fault: Callable[[int, Message], Message | None] | None = None,
    ) -> None:
        self.client_app = client_app
        # Flower's engines set the identity of the running task; messages need it.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(), run_config={})
            for n, c in node_configs.items()
        }
        self.fault = fault
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message now; its reply waits for `pull_messages` (none if dropped)."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            ids.append(msg.metadata.message_id)
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            injected = self.fault(node, msg) if self.fault else None
            if injected == "drop":
                continue
            if injected is None:
                try:
                    injected = self.client_app(msg, self.contexts[node])
                except Exception as err:  # what Flower's engines turn into an error reply
                    injected = Message(
                        Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg
                    )
            self.replies[msg.metadata.message_id] = injected
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


class ServerKilled(Exception):
    """The coordinator dying mid-run (raised from a grid fault)."""


def kill_in_round(round_no: int) -> Callable[[int, Message], Message | None]:
    """A grid fault that kills the coordinator as it sends round ``round_no``'s training."""

    def fault(node: int, msg: Message) -> Message | None:
        if msg.metadata.message_type == "train" and msg.metadata.group_id == str(round_no):
            raise ServerKilled("coordinator killed")
        return None

    return fault
