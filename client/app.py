"""fedtune's ClientApp: the same code in simulation (Ray) and deployment (SuperNode).

Message types: ``query.check`` (preflight: data and model usable, record counts) and ``train``
(one local round; replies with the adapter update and metrics). Records never leave the site.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg_site
from client.site import LocalUpdate, SiteInfo, check_site, run_local_round
from common.core.config import Config
from common.protocol.wire import config_from_record, from_record, to_record

logger = logging.getLogger(__name__)
app = ClientApp()

# Known and harmless with the pinned versions; repeated by every site process they drown the log.
# transformers 5 deprecates the name PEFT still calls; Opacus' hooks on LoRA's frozen inputs.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


def _site(msg: Message, context: Context) -> SiteInfo:
    conf = msg.content.config_records["config"]
    data_root, run_id = str(conf.get("data-root", "")), str(conf.get("run-id", ""))
    return SiteInfo.from_node_config(context.node_config, data_root, run_id)


def _privacy_state(context: Context) -> dict[str, Any]:
    """The site's privacy accountant as kept in Flower's node state between messages."""
    if "privacy" not in context.state:
        return {}
    return dict(context.state.config_records["privacy"])


def _budget(context: Context) -> float | None:
    """A site may cap its own record-level epsilon: node config `budget-epsilon`."""
    value = context.node_config.get("budget-epsilon")
    return None if value in (None, "") else float(str(value))


def _metrics(update: LocalUpdate, cfg: Config, seconds: float) -> dict[str, Any]:
    """What a site reports besides its update. Its training losses (and how long its round took,
    which under Poisson sampling follows the batch sizes drawn) are computed on its private
    records outside any DP accounting and (under secure aggregation) outside the masked sum, so
    they are only reported when neither record-level DP nor secure aggregation is on."""
    r = update.result
    out: dict[str, Any] = {"num-examples": update.records, **update.privacy}
    if r is not None and not (cfg.privacy.record.enabled or cfg.secagg.enabled):
        out.update({"train-loss": r.loss, "first-loss": r.first_loss, "last-loss": r.last_loss})
        out["site-seconds"] = round(seconds, 3)  # the train handler: load, train, pack
    return out


def _declined(msg: Message, site: SiteInfo, reason: str, records: int) -> Message:
    content = RecordDict(
        {
            "declined": ConfigRecord({"name": site.name, "reason": reason}),
            "metrics": MetricRecord({"num-examples": records}),
        }
    )
    return Message(content, reply_to=msg)


@app.query("check")
def check(msg: Message, context: Context) -> Message:
    cfg = config_from_record(msg.content.config_records["config"])
    site = _site(msg, context)
    info = check_site(site, cfg)
    reply = RecordDict({"site": ConfigRecord({"name": site.name, **info})})
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.monotonic()
    conf = msg.content.config_records["config"]
    cfg = config_from_record(conf)
    site = _site(msg, context)
    global_state = from_record(msg.content.array_records["adapter"])
    privacy_state = _privacy_state(context)
    update = run_local_round(
        site, cfg, global_state, int(str(conf["round"])) - 1, str(conf.get("fingerprint", "")),
        privacy_state, _budget(context),
    )  # fmt: skip
    if privacy_state:
        context.state["privacy"] = ConfigRecord(privacy_state)
    if update.declined or update.result is None:
        return _declined(msg, site, update.declined or "no training result", update.records)
    metrics = MetricRecord(_metrics(update, cfg, time.monotonic() - started))
    if cfg.secagg.enabled or secagg_site.MASK_REQUEST in msg.content:
        # Secure aggregation: only the masked update leaves the site (refuses without a request).
        masked = secagg_site.masked_reply(update.delta, msg.content, context.state, cfg, metrics)
        return Message(masked, reply_to=msg)
    content = RecordDict(
        {
            "update": to_record(update.delta),
            "metrics": metrics,
            "site": ConfigRecord({"name": site.name}),
        }
    )
    return Message(content, reply_to=msg)


@app.query(secagg_site.KEYS_QUERY)
def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation stage 1: fresh keys for this round; secrets stay in context.state."""
    return Message(secagg_site.advertise(msg.content, context.state), reply_to=msg)


@app.query(secagg_site.UNMASK_QUERY)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation stage 3: shares that remove the masks of this round's sum."""
    return Message(secagg_site.unmask(msg.content, context.state), reply_to=msg)
