"""fedtune's ClientApp, except that `site-1` sends malformed updates (test app, never shipped).

Round 1: a NaN in the update; round 2: an array of the wrong shape; round 3: an unknown key. The
rest of the reply is the real ClientApp's, so only the coordinator's checks stand in the way.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import app as real_app
from common.protocol import keys
from common.protocol.wire import from_record, to_record

BAD_SITE = "site-1"


def corrupt(update: dict[str, np.ndarray], round_idx: int) -> dict[str, np.ndarray]:
    bad = dict(update)
    key = next(iter(bad))
    if round_idx == 1:
        arr = bad[key].copy()
        arr.flat[0] = np.nan
        bad[key] = arr
    elif round_idx == 2:
        bad[key] = np.zeros((3, 3), dtype=bad[key].dtype)
    else:
        bad["base_model.model.lm_head.smuggled"] = np.ones(4, dtype=np.float32)
    return bad


class PatchedClientApp(ClientApp):
    def __call__(self, message: Message, context: Context) -> Message:
        reply = real_app(message=message, context=context)
        site = str(context.node_config.get("site-name", ""))
        if message.metadata.message_type != keys.TRAIN or site != BAD_SITE or reply.has_error():
            return reply
        round_idx = int(str(message.content.config_records[keys.CONFIG][keys.ROUND]))
        update = from_record(reply.content.array_records[keys.UPDATE])
        reply.content.array_records[keys.UPDATE] = to_record(corrupt(dict(update), round_idx))
        return reply


app = PatchedClientApp()
