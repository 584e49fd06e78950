"""fedtune's ClientApp: the same code in simulation (Ray) and deployment (SuperNode).

Message types and record names: common/protocol/keys.py. ``query.check`` (preflight: data and
model usable, record counts without DP, and DECLINED when the site's own policy refuses the run);
``train`` (one local round; the reply carries the update, masked when secure aggregation is on,
and metrics, or a decline with its reason); ``query.secagg_keys`` and ``query.secagg_unmask``
(the other two secure-aggregation stages). Records never leave the site; under either DP level
nothing about them does either beyond the (clipped, noised, masked) update and the accounting.

The site's protection is its own (client/policy.py): node config and its policy file, never the
run config, which can only ask for more protection.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg_site
from client.site import (
    LocalUpdate,
    SiteInfo,
    evaluate_global,
    preflight,
    private,
    receive_whitening,
    run_local_round,
)
from common.core.config import Config
from common.protocol import keys
from common.protocol.wire import (
    config_from_record,
    declined,
    from_record,
    site_evaluation_shared,
    to_record,
)

logger = logging.getLogger(__name__)
app = ClientApp()

# Known and harmless with the pinned versions; repeated by every site process they drown the log.
# transformers 5 deprecates the name PEFT still calls; Opacus' hooks on LoRA's frozen inputs.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


def _site(msg: Message, context: Context) -> SiteInfo:
    conf = msg.content.config_records[keys.CONFIG]
    data_root, run_id = str(conf.get(keys.DATA_ROOT, "")), str(conf.get(keys.RUN_ID, ""))
    return SiteInfo.from_node_config(context.node_config, data_root, run_id)


def _round_config(msg: Message) -> tuple[ConfigRecord, Config]:
    """The message's CONFIG record and its config; the head's whitening map, if any, installed."""
    conf = msg.content.config_records[keys.CONFIG]
    cfg = config_from_record(conf)
    receive_whitening(cfg, conf.get(keys.HEAD_WHITENING))
    return conf, cfg


def _metrics(update: LocalUpdate, cfg: Config, seconds: float) -> MetricRecord:
    """What a site reports besides its update.

    Under either DP level only what the accounting covers: the record-level epsilon and delta
    this run has spent (none at institution level alone). Losses, timings (under Poisson
    sampling they follow the batch sizes drawn) and record counts are computed on the private
    records outside any accounting, so they stay here. Without DP the count is sent, and the
    losses too unless secure aggregation is on (they would sit outside the masked sum).
    """
    if private(cfg):
        return MetricRecord(dict(update.privacy))
    r = update.result
    out: dict[str, Any] = {keys.NUM_EXAMPLES: update.records}
    if r is not None and not cfg.secagg.enabled:
        out.update({keys.TRAIN_LOSS: r.loss, keys.FIRST_LOSS: r.first_loss})
        out[keys.LAST_LOSS] = r.last_loss
        out[keys.SITE_SECONDS] = round(seconds, 3)  # the train handler: load, train, pack
        out.update(site_evaluation(update.evaluation))
    return MetricRecord(out)


def site_evaluation(evaluation: dict[str, float]) -> dict[str, Any]:
    return {f"{keys.SITE_EVAL_PREFIX}{k}": float(v) for k, v in evaluation.items()}


def _log_evaluation(name: str, what: str, evaluation: dict[str, float]) -> None:
    if evaluation:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items() if k != "examples")
        logger.info("site %s: %s on %d held-out records: %s (kept here)", name, what,
                    int(evaluation.get("examples", 0)), shown)  # fmt: skip


def _declined(name: str, reason: str) -> RecordDict:
    """A decline names the site and its reason only: no record count (the site may be declining
    because the run would not protect its records)."""
    content = declined(name, reason, 0)
    content[keys.METRICS] = MetricRecord({})
    return content


@app.query(keys.CHECK_QUERY)
def check(msg: Message, context: Context) -> Message:
    _, cfg = _round_config(msg)
    site = _site(msg, context)
    check = preflight(site, cfg)
    reply = RecordDict({keys.SITE: ConfigRecord({keys.NAME: site.name, **check.info})})
    if check.refusal:  # the site is still registered; each of its rounds will be declined
        reply[keys.DECLINED] = _declined(site.name, check.refusal)[keys.DECLINED]
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round; the reply is built on one path, the masking step optional."""
    started = time.monotonic()
    conf, cfg = _round_config(msg)
    site = _site(msg, context)
    global_state = from_record(msg.content.array_records[keys.ADAPTER])
    plan = None
    if cfg.secagg.enabled:  # refuse a weakened noise plan before spending anything on it
        dim = sum(v.size for v in global_state.values())
        plan = secagg_site.noise_plan(msg.content, context.state, cfg, dim)
    update = run_local_round(
        site, cfg, global_state, int(str(conf[keys.ROUND])) - 1,
        str(conf.get(keys.FINGERPRINT, "")),
    )  # fmt: skip
    if update.declined or update.result is None:
        reason = update.declined or "no training result"
        return Message(_declined(site.name, reason), reply_to=msg)
    metrics = _metrics(update, cfg, time.monotonic() - started)
    if not _may_share(cfg, site):
        metrics = MetricRecord({k: v for k, v in metrics.items()
                                if not k.startswith(keys.SITE_EVAL_PREFIX)})  # fmt: skip
        _log_evaluation(site.name, f"global model of round {int(str(conf[keys.ROUND])) - 1}",
                        update.evaluation)  # fmt: skip
    if cfg.secagg.enabled or keys.MASK_REQUEST in msg.content:
        # Secure aggregation: only the masked update leaves the site (refuses without a request).
        content, clipped = secagg_site.masked_update(
            update.delta, msg.content, context.state, cfg, plan
        )
        if private(cfg):  # a count outside the sum and the accounting: kept in the local log
            logger.info("site %s: %d coordinate(s) clipped to the range", site.name, clipped)
        else:
            metrics[keys.SECAGG_CLIPPED] = clipped
    else:
        content = RecordDict({keys.UPDATE: to_record(update.delta)})
    content[keys.METRICS] = metrics
    return Message(content, reply_to=msg)


def _may_share(cfg: Config, site: SiteInfo) -> bool:
    """Held-out figures leave only if the run allows it (:func:`site_evaluation_shared`) and the
    site's own policy does too: a site that requires record-level DP or secure aggregation never
    sends them, whatever config a coordinator sends with an `evaluate` message."""
    policy = site.policy
    return site_evaluation_shared(cfg) and not (policy.record_dp_required or policy.require_secagg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The final global model on the site's held-out split. Its figures leave the site only
    where :func:`site_evaluation_shared` allows; otherwise they go to the site's own log."""
    conf, cfg = _round_config(msg)
    site = _site(msg, context)
    global_state = from_record(msg.content.array_records[keys.ADAPTER])
    result = evaluate_global(site, cfg, global_state, str(conf.get(keys.FINGERPRINT, "")))
    if not _may_share(cfg, site):
        _log_evaluation(site.name, "final global model", result)
        result = {}
    reply = RecordDict({keys.SITE: ConfigRecord({keys.NAME: site.name})})
    reply[keys.METRICS] = MetricRecord(site_evaluation(result))
    return Message(reply, reply_to=msg)


@app.query(keys.KEYS_QUERY)
def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation stage 1: fresh keys for this round; secrets stay in context.state."""
    return Message(
        secagg_site.advertise(msg.content, context.state, context.node_config), reply_to=msg
    )


@app.query(keys.UNMASK_QUERY)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation stage 3: shares that remove the masks of this round's sum."""
    return Message(secagg_site.unmask(msg.content, context.state), reply_to=msg)
