"""The coordinator's round loop, top to bottom: preflight, rounds, outputs.

Each round gets its weighted sum from one of two sources, plain (server/plain_round.py) or secure
(server/secagg_round.py); the min-sites rule, the institution-level noise and the step are the
same for both (common/protocol/aggregate.py). A failed or empty round raises RoundError and stops
the run; it never returns as a success.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.core import headinput
from common.core.adapters import (
    attach_lora,
    exchanged_keys,
    frozen_fingerprint,
    get_state,
    num_layers,
    set_state,
    stage_scales,
)
from common.core.config import Config
from common.core.errors import RoundError
from common.core.models import load_base
from common.core.records import Record, read_folder
from common.core.tasks import evaluate
from common.evaluation.metrics import largest_gap
from common.protocol import keys
from common.protocol.aggregate import (
    RoundSum,
    apply_sum,
    expected_sites,
    require_min_sites,
    site_weights,
)
from common.protocol.server_optimizer import ServerOptimizer
from common.protocol.wire import (
    config_record,
    declined_name,
    declined_reason,
    metrics_of,
    site_evaluation_of,
    site_evaluation_shared,
    to_record,
)
from server import checkpoint, exchange
from server.exchange import send_and_receive
from server.outputs import RunWriter, dropouts
from server.plain_round import PlainRound
from server.privacy_round import ServerPrivacy
from server.secagg_round import SecAggRound
from server.status import Monitor, RunStatus
from server.strategy import EarlyStopper, SiteSampler

logger = logging.getLogger(__name__)
NODE_WAIT_S = 120.0
NODE_POLL_S = 2.0
WHITENING_INFO = "head-whitening.json"  # the map's reference (name, count, sha256) and sha256


@dataclass
class FederatedRun:
    cfg: Config
    out: Path
    grid: Grid
    data_root: str = ""
    on_round: Callable[[dict[str, Any]], None] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    site_names: dict[int, str] = field(default_factory=dict)
    # None: the site does not disclose its count (any DP level on: counts are not covered).
    site_records: dict[str, int | None] = field(default_factory=dict)
    site_prepare: dict[str, dict[str, int]] = field(default_factory=dict)  # counts per rule
    site_eval_records: dict[str, int] = field(default_factory=dict)  # held out (no DP only)
    preflight_declined: dict[str, str] = field(default_factory=dict)  # site -> its reason
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    resume: bool = False
    expected: int = 0  # sites expected per round (set once preflight is done)
    whitening: bytes | None = None  # `model.head_input = "whitened"`: the map sent to sites
    whitening_info: dict[str, Any] = field(default_factory=dict)  # its source and sha256
    monitor: Monitor | None = None  # Prometheus metrics and the status page, if asked for
    status: RunStatus = field(init=False)  # the live state (OUT/status.json), set by `execute`
    _offline: set[int] = field(default_factory=set)

    def execute(self) -> dict[str, Any]:
        """Preflight, every round (resuming: from the checkpoint's next), then the outputs.
        The live state goes to OUT/status.json (and the monitor, if any) throughout."""
        self.status = RunStatus(self.out, self.cfg.name, self.cfg.federation.rounds, self.monitor)
        try:
            with exchange.reporting(self.status.replied):
                summary = self._execute()
        except BaseException as err:
            self.status.finish(f"{type(err).__name__}: {err}")
            raise
        self.status.finish()
        return summary

    def _held_back(
        self,
        old: dict[str, np.ndarray],
        new: dict[str, np.ndarray],
        round_no: int,
        model: Any,
    ) -> dict[str, np.ndarray]:
        """`train.unfreeze`: what this round's stage holds back keeps its value. The sites
        returned no change for it; this also undoes what a server optimizer's momentum or
        institution-level noise would move (post-processing: no privacy cost)."""
        stages = self.cfg.train.unfreeze
        if not stages:
            return new
        trained = stage_scales(list(new), stages, num_layers(model), round_no)
        return type(new)((k, v if k in trained else old[k]) for k, v in new.items())

    def _execute(self) -> dict[str, Any]:
        status = self.status
        start = time.monotonic()
        ckpt = checkpoint.load(self.out, self.cfg.digest()) if self.resume else None
        if not self.resume:
            (self.out / checkpoint.NAME).unlink(missing_ok=True)
        writer = RunWriter(self.out, self.cfg, keep_rows=ckpt.rows if ckpt else None)
        loaded = load_base(self.cfg.model, self.cfg.data.labels)
        self.whitening = self._head_whitening(loaded.model, loaded.tokenizer, ckpt is not None)
        model = attach_lora(loaded.model, self.cfg.lora, self.cfg.model)
        keys = exchanged_keys(model, self.cfg.lora)
        for stage in self.cfg.train.unfreeze:  # a schedule that cannot work fails before round 1
            stage_scales(keys, self.cfg.train.unfreeze, num_layers(model), stage.from_round)
        fingerprint = frozen_fingerprint(model, self.cfg.lora)
        test = self._test_records()
        status.phase("evaluating the base model")
        base = ckpt.base if ckpt else self._evaluate(model, loaded.tokenizer, test)
        logger.info("base model: %s", _fmt(base))
        status.phase("waiting for sites")
        nodes = self._wait_for_nodes()
        status.phase("preflight", asked=len(nodes))
        nodes = self._preflight(nodes, fingerprint)
        self._site_states(nodes)
        state: dict[str, np.ndarray] = get_state(model, keys)
        privacy = ServerPrivacy(self.cfg, len(nodes), sum(v.size for v in state.values()))
        final, first, elapsed = base, 1, 0.0
        if ckpt:
            state, final, first, elapsed = self._restore(ckpt, keys, privacy)
            set_state(model, state)
        self.server_opt = ServerOptimizer(self.cfg.federation)
        if ckpt:  # the step count drives `server_schedule`, stateful or not
            self.server_opt.steps = ckpt.server_optimizer_steps
        if ckpt and self.server_opt.stateful:
            self.server_opt.load_arrays(
                checkpoint.load_optimizer(self.out, ckpt.round), ckpt.server_optimizer_steps, keys
            )
        sampler = SiteSampler(self.cfg.federation)
        stopper = EarlyStopper(self.cfg.federation.early_stop, self.rows)
        if stopper.enabled and not test:
            raise RoundError(
                "`federation.early_stop.patience` needs the coordinator's test set "
                "(`evaluation.test_dir`)"
            )
        noise = privacy.noise()
        expected = self.expected = expected_sites(self.cfg, len(nodes))
        for r in range(first, self.cfg.federation.rounds + 1):
            t0 = time.monotonic()
            sampled = sampler.sample(self._available(r, nodes), r)
            self._site_states(nodes, sampled)
            status.phase("training", r, asked=len(sampled))
            summed = self._train_round(r, sampled, state, fingerprint)
            self._site_states(nodes, sampled, summed)
            status.phase("aggregating", r)
            new = apply_sum(self.cfg, state, summed, expected, noise, self.server_opt)
            state = self._held_back(state, new, r, model)
            set_state(model, state)
            writer.adapter(model, r, keys)
            if self._eval_due(r):
                status.phase("evaluating", r)
                final = self._evaluate(model, loaded.tokenizer, test)
            row = self._row(r, summed, final if self._eval_due(r) else {}, len(sampled))
            declined = {**self.preflight_declined, **summed.declined}  # who is out, and why
            row.update(privacy.record_round(r, summed.reports, declined))
            row["seconds"] = round(time.monotonic() - t0, 3)
            self._record(writer, row)
            status.round_done(row)
            wall = elapsed + time.monotonic() - start
            if self.server_opt.stateful:
                checkpoint.save_optimizer(self.out, r, self.server_opt.arrays())
            checkpoint.save(self.out, self._checkpoint(r, base, final, wall, privacy))
            checkpoint.prune_optimizer(self.out, r)
            if self._eval_due(r) and stopper.observe(r, final) and r < self.cfg.federation.rounds:
                es = self.cfg.federation.early_stop
                logger.info(
                    "stopping early after round %d: no %s improvement of %g for %d evaluations "
                    "(best: round %d)", r, es.metric, es.min_delta, es.patience, stopper.best_round,
                )  # fmt: skip
                break
        summary = self._summary(base, final, elapsed + time.monotonic() - start, loaded.source)
        if site_eval := self._evaluate_at_sites(nodes, state, fingerprint):
            summary["site_evaluation"] = site_eval
        if stopper.enabled and stopper.best_round is not None:
            summary["early_stop"] = {
                "best_round": stopper.best_round,
                "best": stopper.best_metrics,
                "stopped_after": len(self.rows),
                "stopped_early": len(self.rows) < self.cfg.federation.rounds,
            }
        if privacy.active:
            summary["privacy"] = privacy.summary()
        writer.summary(summary)
        writer.plots(self.rows)
        writer.site_plot(self.rows, summary.get("site_evaluation"))
        return summary

    def _evaluate_at_sites(
        self, nodes: list[int], state: dict[str, np.ndarray], fingerprint: str
    ) -> dict[str, Any] | None:
        """Each site evaluates the final global model on its own held-out split (`evaluate`
        messages, with `data.eval_fraction`). The figures come back only where they may leave
        a site (`site_evaluation_shared`: no DP, no secure aggregation); elsewhere each site
        keeps them in its own log. A site that fails is logged and left out."""
        if not self.cfg.data.eval_fraction:
            return None
        r = len(self.rows)
        self.status.phase("evaluating at the sites", r, asked=len(nodes))
        adapter, config = to_record(state), self._config(r, fingerprint)
        msgs = [
            Message(RecordDict({keys.ADAPTER: adapter, keys.CONFIG: config}), dst_node_id=n,
                    message_type=keys.EVALUATE, group_id=f"evaluate-{r}")
            for n in self._available(r, nodes)
        ]  # fmt: skip
        replies = send_and_receive(self.grid, msgs, self.cfg.federation.round_timeout_s)
        sites: dict[str, dict[str, float]] = {}
        for node, reply in sorted(replies.items()):
            name = self.site_names.get(node, str(node))
            if reply.has_error():
                logger.warning("site %s could not evaluate: %s", name, reply.error.reason)
                continue
            try:
                figures = site_evaluation_of(metrics_of(reply.content))
            except (KeyError, ValueError) as err:
                logger.warning("site %s sent a malformed evaluation: %s", name, err)
                continue
            if figures:
                sites[name] = figures
        if not site_evaluation_shared(self.cfg):
            return None
        metric = "accuracy" if self.cfg.data.labels else "loss"
        gap = largest_gap(sites, metric)
        for name, figures in sites.items():
            logger.info("site %s, final model on its held-out split: %s", name, _fmt(figures))
        return {"round": r, "sites": sites, **gap}

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpoint(
        self,
        r: int,
        base: dict[str, float],
        final: dict[str, float],
        wall: float,
        privacy: ServerPrivacy,
    ) -> checkpoint.Checkpoint:
        return checkpoint.Checkpoint(
            round=r, run_id=self.run_id, config_sha256=self.cfg.digest(), base=base, final=final,
            rows=self.rows, site_records=self.site_records, elapsed_s=wall,
            privacy=privacy.state_dict(), server_optimizer_steps=self.server_opt.steps,
        )  # fmt: skip

    def _restore(
        self, ckpt: checkpoint.Checkpoint, keys: list[str], privacy: ServerPrivacy
    ) -> tuple[dict[str, np.ndarray], dict[str, float], int, float]:
        self.run_id, self.rows = ckpt.run_id, list(ckpt.rows)
        privacy.load_state_dict(ckpt.privacy)
        state = checkpoint.load_adapter(self.out, ckpt.round, keys)
        logger.info("resuming after round %d of %d", ckpt.round, self.cfg.federation.rounds)
        return state, ckpt.final, ckpt.round + 1, ckpt.elapsed_s

    # -- setup -------------------------------------------------------------------------------
    def _head_whitening(self, model: Any, tokenizer: Any, resuming: bool) -> bytes | None:
        """`model.head_input = "whitened"`: the map from the public reference texts, installed
        here and sent to every site with each message. A run resumed from its checkpoint sends
        the map it saved (its sites' head trained with that one), never a recomputed one."""
        mcfg = self.cfg.model
        if mcfg.head_input != "whitened":
            return None
        info_path = self.out / WHITENING_INFO
        if resuming:
            if not info_path.is_file():
                raise RoundError(
                    f"`{info_path}` is missing: this run's sites trained with the head whitening "
                    "map saved beside it, and a resumed run must send them the same one"
                )
            a = headinput.load_whitening(self.out)
            info = json.loads(info_path.read_text(encoding="utf-8"))
        elif not mcfg.head_reference:
            raise RoundError(
                '`model.head_input` = "whitened" needs `model.head_reference` (the coordinator\'s '
                "public reference texts) or, in a simulation, `simulation.partition."
                "reference_records`"
            )
        else:
            self.status.phase("whitening the head's input")
            a = headinput.reference_whitening(
                model, tokenizer, mcfg.head_reference, mcfg.max_length, mcfg.cache_dir
            )
            headinput.save_whitening(self.out, a)
            texts = headinput.read_reference(mcfg.head_reference)
            info = {
                "reference": mcfg.head_reference,
                "reference_texts": len(texts),
                "reference_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
                "file": headinput.WHITENING_FILE,
            }
        raw = headinput.to_bytes(a)
        digest = hashlib.sha256(raw).hexdigest()
        if resuming and info.get("sha256") != digest:
            raise RoundError(
                f"`{self.out / headinput.WHITENING_FILE}` is not the map this run sent its sites "
                f"(its sha256 differs from `{info_path.name}`'s)"
            )
        info["sha256"] = digest
        info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        headinput.set_whitening(model, a)
        self.whitening_info = info
        logger.info("head whitening map sha256 %s (%s)", digest, info["reference"])
        return raw

    def _test_records(self) -> list[Record]:
        ev = self.cfg.evaluation
        if not ev.test_dir:
            return []
        records = read_folder(ev.test_dir, self.cfg.data.form, self.cfg.data.labels)
        return records[: ev.max_records] if ev.max_records else records

    def _evaluate(self, model: Any, tok: Any, test: list[Record]) -> dict[str, float]:
        if not test:
            return {}
        return evaluate(model, tok, test, self.cfg, self.cfg.evaluation.batch_size)

    def _eval_due(self, r: int) -> bool:
        every = self.cfg.federation.evaluate_every
        return r == self.cfg.federation.rounds or bool(every and r % every == 0)

    def _site_states(
        self, nodes: list[int], sampled: list[int] | None = None, summed: RoundSum | None = None
    ) -> None:
        """Each site's state for the live view: online/offline, sampled, then replied, failed
        or declined; sites that declined at preflight stay `declined`."""
        states = {name: "declined" for name in self.preflight_declined}
        for node in nodes:
            name = self.site_names.get(node, str(node))
            state = "offline" if node in self._offline else "online"
            if sampled is not None and node in sampled:
                state = "sampled"
            states[name] = state
        if summed is not None:
            states.update({u.site: "replied" for u in summed.reports})
            states.update({s: "failed" for s in summed.failed})
            states.update({s: "declined" for s in summed.declined})
        self.status.sites(states)

    def _wait_for_nodes(self) -> list[int]:
        fed = self.cfg.federation
        needed = max(fed.min_sites, fed.sites_per_round)
        deadline = time.monotonic() + NODE_WAIT_S
        previous: list[int] = []
        while True:
            # Enough sites, and the same set as a moment ago: late starters are not left out.
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if (len(nodes) >= needed and nodes == previous) or time.monotonic() > deadline:
                break
            previous = nodes
            time.sleep(NODE_POLL_S)
        if len(nodes) < needed:
            raise RoundError(
                f"only {len(nodes)} site(s) connected after {NODE_WAIT_S:.0f} s; "
                f"need {needed} (`federation.min_sites` / `sites_per_round`)"
            )
        logger.info("%d site(s) connected", len(nodes))
        return nodes

    def _available(self, r: int, nodes: list[int]) -> list[int]:
        """The preflighted sites connected now; one that went offline is not sampled (logged)."""
        online = {int(n) for n in self.grid.get_node_ids()}
        offline = set(nodes) - online
        for node in sorted(offline - self._offline):
            logger.warning(
                "round %d: site %s is offline; not sampled until it reconnects",
                r, self.site_names.get(node, node),
            )  # fmt: skip
        for node in sorted(self._offline - offline):
            logger.info("round %d: site %s is back online", r, self.site_names.get(node, node))
        self._offline = offline
        return [n for n in nodes if n in online]

    def _preflight(self, nodes: list[int], fingerprint: str) -> list[int]:
        """Every site checks its data and model before any training; any failure stops the run.

        A site whose own policy refuses this run's protection declines here: it is left out of
        the run (logged with its reason); too few left stops the run before any training.
        Returns the nodes that take part."""
        content = lambda: RecordDict({keys.CONFIG: self._config(0, fingerprint)})  # noqa: E731
        msgs = [Message(content(), dst_node_id=n, message_type=keys.CHECK) for n in nodes]
        replies = send_and_receive(self.grid, msgs, self.cfg.federation.round_timeout_s)
        problems: list[str] = []
        for node, reply in replies.items():
            if reply.has_error():
                problems.append(f"site on node {node}: {reply.error.reason}")
                continue
            reason = declined_reason(reply.content)
            if reason is not None:
                name = declined_name(reply.content) or f"node {node}"
                if name in self.preflight_declined:  # a name is the site's own claim
                    name = f"{name} (node {node})"
                self.preflight_declined[name] = reason
                logger.warning("site %s declined this run: %s", name, reason)
                continue
            try:
                self._register_site(node, reply.content.config_records[keys.SITE], fingerprint)
            except (KeyError, ValueError, RoundError) as err:
                problems.append(f"site on node {node}: {err}")
        missing = set(nodes) - set(replies)
        problems += [f"node {n}: no answer within the round timeout" for n in sorted(missing)]
        if problems:
            raise RoundError("preflight failed, nothing was trained:\n  " + "\n  ".join(problems))
        taking_part = [n for n in nodes if n in self.site_names]
        needed = max(self.cfg.federation.min_sites, self.cfg.federation.sites_per_round)
        if len(taking_part) < needed:
            why = "; ".join(f"{n}: {r}" for n, r in self.preflight_declined.items())
            raise RoundError(
                f"only {len(taking_part)} site(s) accept this run's protection, need {needed} "
                f"(`federation.min_sites` / `sites_per_round`); declined: {why}"
            )
        logger.info(
            "preflight ok: %s",
            ", ".join(
                k if v is None else f"{k} ({v} records)" for k, v in self.site_records.items()
            ),
        )
        return taking_part

    def _register_site(self, node: int, info: Any, fingerprint: str) -> None:
        """Record a site's preflight answer: a unique name, its counts, the same frozen A."""
        name = str(info[keys.NAME])
        if name in self.site_records:
            raise RoundError(f"site name `{name}` is used by two nodes (`site-name`)")
        if str(info[keys.FINGERPRINT]) != fingerprint:
            raise RoundError(
                f"`{name}`'s frozen LoRA A differs from the coordinator's (same base model, "
                "`lora` settings and fedtune version needed)"
            )
        self.site_names[node] = name
        self.site_records[name] = int(str(info[keys.RECORDS])) if keys.RECORDS in info else None
        prefix = keys.PREPARE_PREFIX
        prep = {k[len(prefix) :]: int(str(v)) for k, v in info.items() if k.startswith(prefix)}
        if prep:
            self.site_prepare[name] = prep
        if keys.EVAL_RECORDS in info:
            self.site_eval_records[name] = int(str(info[keys.EVAL_RECORDS]))

    def _config(self, round_idx: int, fingerprint: str) -> Any:
        return config_record(
            self.cfg,
            {
                keys.ROUND: round_idx,
                keys.FINGERPRINT: fingerprint,
                keys.DATA_ROOT: self.data_root,
                keys.RUN_ID: self.run_id,
                **({keys.HEAD_WHITENING: self.whitening} if self.whitening else {}),
            },
        )

    # -- one round ---------------------------------------------------------------------------
    def _train_round(
        self, r: int, sampled: list[int], state: dict[str, np.ndarray], fingerprint: str
    ) -> RoundSum:
        """The round's weighted sum, from the plain or the secure source; too few fails it."""
        counts = {n: self.site_records[self.site_names[n]] for n in sampled}
        weights = site_weights(self.cfg, counts)
        if self.cfg.secagg.enabled:
            source: PlainRound | SecAggRound = SecAggRound(
                self.grid, self.cfg, r, self.site_names, weights, self.expected
            )
        else:
            source = PlainRound(self.grid, self.cfg, r, self.site_names, weights)
        summed = source.run(state, self._config(r, fingerprint))
        require_min_sites(self.cfg, r, len(summed.reports), {**summed.failed, **summed.declined})
        return summed

    def _row(self, r: int, summed: RoundSum, ev: dict[str, float], sampled: int) -> dict[str, Any]:
        reports = summed.reports
        with_loss = [u for u in reports if keys.TRAIN_LOSS in u.metrics and u.records is not None]
        weights = np.array([u.records for u in with_loss], dtype=np.float64)
        losses = np.array([u.metrics[keys.TRAIN_LOSS] for u in with_loss])
        # Sites report no loss under record-level DP or secure aggregation (it is not private).
        train_loss = float((weights * losses).sum() / weights.sum()) if with_loss else None
        row: dict[str, Any] = {
            "round": r,
            "sites": sorted(u.site for u in reports),
            "sites_sampled": sampled,
            "sites_failed": summed.failed,
            "sites_offline": sorted(str(self.site_names.get(n, n)) for n in self._offline),
            "train_loss": train_loss,
            "site_train_loss": {u.site: u.metrics[keys.TRAIN_LOSS] for u in with_loss},
            "site_seconds": {
                u.site: u.metrics[keys.SITE_SECONDS]
                for u in with_loss
                if keys.SITE_SECONDS in u.metrics
            },
            "bytes_up": summed.bytes_up,
            "bytes_down": summed.bytes_down,
        }
        row.update({f"eval_{k}": v for k, v in ev.items() if k != "examples"})
        # each site's figures for the global model it received: that of the round before
        site_eval = {u.site: f for u in reports if (f := site_evaluation_of(u.metrics))}
        if site_eval:
            row["site_eval"] = {"of_round": r - 1, "sites": site_eval}
        row.update(summed.extra)
        return row

    def _record(self, writer: RunWriter, row: dict[str, Any]) -> None:
        self.rows.append(row)
        writer.round_metrics(row)
        logger.info(
            "round %d/%d: %d site(s), train loss %s%s, %.1f s",
            row["round"],
            self.cfg.federation.rounds,
            len(row["sites"]),
            "not reported" if row["train_loss"] is None else f"{row['train_loss']:.4f}",
            "".join(f", {k} {v:.4f}" for k, v in row.items() if k.startswith("eval_")),
            row["seconds"],
        )
        if self.on_round:
            self.on_round(row)

    def _site_summary(self, name: str) -> dict[str, Any]:
        """What the summary says of a site: only what the site disclosed (no counts under DP)."""
        out: dict[str, Any] = {}
        if self.site_records[name] is not None:
            out["records"] = self.site_records[name]
        if name in self.site_prepare:
            out["prepare"] = self.site_prepare[name]
        if self.site_eval_records.get(name):
            out["held_out_records"] = self.site_eval_records[name]
        return out

    def _summary(
        self, base: dict[str, float], final: dict[str, float], wall: float, source: str
    ) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "model": source,
            "task": self.cfg.model.task,
            "rounds": len(self.rows),
            "sites": {name: self._site_summary(name) for name in sorted(self.site_records)},
            "base": base,
            "final": final,
            "train_loss": [row["train_loss"] for row in self.rows],
            "bytes_up": [row["bytes_up"] for row in self.rows],
            "bytes_down": [row["bytes_down"] for row in self.rows],
            "dropouts": dropouts(self.rows),
            "declined_at_preflight": self.preflight_declined,
            "wall_time_s": round(wall, 2),
            "run_id": self.run_id,
            "config_sha256": self.cfg.digest(),
            **({"head_whitening": self.whitening_info} if self.whitening_info else {}),
        }


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "(no test set)"
