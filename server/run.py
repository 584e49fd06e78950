"""The coordinator's round loop, top to bottom: preflight, rounds, outputs.

A failed or empty round raises RoundError and stops the run; it never returns as a success.
"""

from __future__ import annotations

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

from common.core.adapters import (
    attach_lora,
    exchanged_keys,
    flatten,
    frozen_fingerprint,
    get_state,
    set_state,
)
from common.core.config import Config
from common.core.errors import FedtuneError, RoundError
from common.core.models import load_base
from common.core.records import Record, read_folder
from common.core.tasks import evaluate
from common.protocol.wire import config_record, from_record, to_record
from server import checkpoint
from server.exchange import send_and_receive
from server.outputs import RunWriter, dropouts
from server.privacy_round import ServerPrivacy, server_adds_noise
from server.secagg_round import SecAggRound
from server.strategy import SiteSampler, SiteUpdate, WeightedFedAvg

logger = logging.getLogger(__name__)
NODE_WAIT_S = 120.0
NODE_POLL_S = 2.0


@dataclass
class RoundOutcome:
    updates: list[SiteUpdate]
    failed: dict[str, str]
    bytes_up: int
    # Secure aggregation: `updates` is the one aggregate (no site's own update is ever seen);
    # `reports` the contributors' metrics (empty deltas); `extra` the secagg_* row keys.
    reports: list[SiteUpdate] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)  # site -> why (privacy budget)


@dataclass
class FederatedRun:
    cfg: Config
    out: Path
    grid: Grid
    data_root: str = ""
    on_round: Callable[[dict[str, Any]], None] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    site_names: dict[int, str] = field(default_factory=dict)
    site_records: dict[str, int] = field(default_factory=dict)
    site_prepare: dict[str, dict[str, int]] = field(default_factory=dict)  # counts per rule
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    resume: bool = False
    _offline: set[int] = field(default_factory=set)

    def execute(self) -> dict[str, Any]:
        """Preflight, every round (resuming: from the checkpoint's next), then the outputs."""
        start = time.monotonic()
        ckpt = checkpoint.load(self.out, self.cfg.digest()) if self.resume else None
        if not self.resume:
            (self.out / checkpoint.NAME).unlink(missing_ok=True)
        writer = RunWriter(self.out, self.cfg, keep_rows=ckpt.rows if ckpt else None)
        loaded = load_base(self.cfg.model, self.cfg.data.labels)
        model = attach_lora(loaded.model, self.cfg.lora, self.cfg.model)
        keys = exchanged_keys(model, self.cfg.lora)
        fingerprint = frozen_fingerprint(model, self.cfg.lora)
        test = self._test_records()
        base = ckpt.base if ckpt else self._evaluate(model, loaded.tokenizer, test)
        logger.info("base model: %s", _fmt(base))
        nodes = self._wait_for_nodes()
        self._preflight(nodes, fingerprint)
        privacy = ServerPrivacy(self.cfg, len(nodes))
        state: dict[str, np.ndarray] = get_state(model, keys)
        final, first, elapsed = base, 1, 0.0
        if ckpt:
            state, final, first, elapsed = self._restore(ckpt, keys, privacy)
            set_state(model, state)
        strategy, sampler = WeightedFedAvg(self.cfg.federation), SiteSampler(self.cfg.federation)
        noise = privacy.noise_average if privacy.server_adds_noise() else None
        for r in range(first, self.cfg.federation.rounds + 1):
            t0 = time.monotonic()
            sampled = sampler.sample(self._available(r, nodes), r)
            outcome = self._train_round(r, sampled, state, fingerprint)
            reports = outcome.reports if outcome.reports is not None else outcome.updates
            state = strategy.apply(state, outcome.updates, noise, len(reports))
            set_state(model, state)
            writer.adapter(model, r)
            if self._eval_due(r):
                final = self._evaluate(model, loaded.tokenizer, test)
            row = self._row(r, outcome, final if self._eval_due(r) else {}, len(sampled), state)
            row.update(privacy.record_round(r, reports, outcome.declined))
            row["seconds"] = round(time.monotonic() - t0, 3)
            self._record(writer, row)
            wall = elapsed + time.monotonic() - start
            checkpoint.save(self.out, self._checkpoint(r, base, final, wall, privacy))
        summary = self._summary(base, final, elapsed + time.monotonic() - start, loaded.source)
        if privacy.active:
            summary["privacy"] = privacy.summary()
        writer.summary(summary)
        writer.plots(self.rows)
        return summary

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
            privacy=privacy.state_dict(),
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

    def _preflight(self, nodes: list[int], fingerprint: str) -> None:
        """Every site checks its data and model before any training; any failure stops the run."""
        content = lambda: RecordDict({"config": self._config(0, fingerprint)})  # noqa: E731
        msgs = [Message(content(), dst_node_id=n, message_type="query.check") for n in nodes]
        replies = send_and_receive(self.grid, msgs, self.cfg.federation.round_timeout_s)
        problems: list[str] = []
        for node, reply in replies.items():
            if reply.has_error():
                problems.append(f"site on node {node}: {reply.error.reason}")
                continue
            try:
                self._register_site(node, reply.content.config_records["site"], fingerprint)
            except (KeyError, ValueError, RoundError) as err:
                problems.append(f"site on node {node}: {err}")
        missing = set(nodes) - set(replies)
        problems += [f"node {n}: no answer within the round timeout" for n in sorted(missing)]
        if problems:
            raise RoundError("preflight failed, nothing was trained:\n  " + "\n  ".join(problems))
        logger.info(
            "preflight ok: %s",
            ", ".join(f"{k} ({v} records)" for k, v in self.site_records.items()),
        )

    def _register_site(self, node: int, info: Any, fingerprint: str) -> None:
        """Record a site's preflight answer: a unique name, its counts, the same frozen A."""
        name = str(info["name"])
        if name in self.site_records:
            raise RoundError(f"site name `{name}` is used by two nodes (`site-name`)")
        if str(info["fingerprint"]) != fingerprint:
            raise RoundError(
                f"`{name}`'s frozen LoRA A differs from the coordinator's (same base model, "
                "`lora` settings and fedtune version needed)"
            )
        self.site_names[node] = name
        self.site_records[name] = int(str(info["records"]))
        prep = {k[8:]: int(str(v)) for k, v in info.items() if k.startswith("prepare:")}
        if prep:
            self.site_prepare[name] = prep

    def _config(self, round_idx: int, fingerprint: str) -> Any:
        return config_record(
            self.cfg,
            round=round_idx,
            fingerprint=fingerprint,
            data_root=self.data_root,
            run_id=self.run_id,
        )

    # -- one round ---------------------------------------------------------------------------
    def _train_round(
        self, r: int, sampled: list[int], state: dict[str, np.ndarray], fingerprint: str
    ) -> RoundOutcome:
        if self.cfg.secagg.enabled:
            records = {n: self.site_records[self.site_names[n]] for n in sampled}
            driver = SecAggRound(self.grid, self.cfg, r, self.site_names, records)
            result = driver.run(state, self._config(r, fingerprint))
            stats = result.stats
            self._bytes_down = stats.bytes_down
            aggregate = SiteUpdate(
                f"secure sum of {len(stats.reports)}", result.delta, result.records, {}
            )
            failed = {k: v for k, v in stats.failed.items() if k not in stats.declined}
            return RoundOutcome(
                [aggregate], failed, stats.bytes_up, stats.reports, stats.row(), stats.declined
            )
        payload = to_record(state)
        self._bytes_down = payload.count_bytes() * len(sampled)
        msgs = [
            Message(
                RecordDict({"adapter": payload, "config": self._config(r, fingerprint)}),
                dst_node_id=n,
                message_type="train",
                group_id=str(r),
            )
            for n in sampled
        ]
        replies = send_and_receive(self.grid, msgs, self.cfg.federation.round_timeout_s)
        outcome = self._collect(replies, sampled, state)
        if len(outcome.updates) < self.cfg.federation.min_sites:
            problems = {**outcome.failed, **outcome.declined}
            detail = "; ".join(f"{s}: {e}" for s, e in problems.items()) or "none failed"
            raise RoundError(
                f"round {r}: {len(outcome.updates)} site(s) succeeded, "
                f"`federation.min_sites` is {self.cfg.federation.min_sites} ({detail})"
            )
        return outcome

    def _collect(
        self, replies: dict[int, Message], sampled: list[int], state: dict[str, np.ndarray]
    ) -> RoundOutcome:
        outcome = RoundOutcome([], {}, 0)
        for node, reply in replies.items():
            name = self.site_names.get(node, str(node))
            if reply.has_error():
                outcome.failed[name] = str(reply.error.reason)
                logger.warning("site %s failed this round: %s", name, reply.error.reason)
                continue
            if "declined" in reply.content:
                reason = str(reply.content.config_records["declined"]["reason"])
                outcome.declined[name] = reason
                logger.warning("site %s declined this round: %s", name, reason)
                continue
            try:
                record = reply.content.array_records["update"]
                delta = from_record(record, expected=state)
                self._check_norm(delta)
                raw = reply.content.metric_records["metrics"]
                metrics = {k: float(str(v)) for k, v in raw.items()}
                records = int(metrics["num-examples"])
            except (FedtuneError, KeyError, ValueError, TypeError) as err:
                outcome.failed[name] = f"malformed update rejected: {err}"
                logger.warning("site %s: malformed update rejected: %s", name, err)
                continue
            outcome.bytes_up += record.count_bytes()
            outcome.updates.append(SiteUpdate(name, delta, records, metrics))
        for node in sorted(set(sampled) - set(replies)):
            name = self.site_names.get(node, str(node))
            outcome.failed[name] = "no reply within `federation.round_timeout_s`"
            logger.warning("site %s did not reply in time", name)
        return outcome

    def _check_norm(self, delta: dict[str, np.ndarray]) -> None:
        """With institution-level DP and the noise added here, every update must be clipped."""
        inst = self.cfg.privacy.institution
        if not server_adds_noise(self.cfg):
            return
        norm = float(np.linalg.norm(flatten(delta)))
        if norm > inst.clip_norm * (1 + 1e-4):
            raise RoundError(f"update norm {norm:.4g} exceeds `privacy.institution.clip_norm`")

    def _row(
        self,
        r: int,
        outcome: RoundOutcome,
        ev: dict[str, float],
        sampled: int,
        state: dict[str, Any],
    ) -> dict[str, Any]:
        reports = outcome.updates if outcome.reports is None else outcome.reports
        with_loss = [u for u in reports if "train-loss" in u.metrics]
        weights = np.array([u.records for u in with_loss], dtype=np.float64)
        losses = np.array([u.metrics["train-loss"] for u in with_loss])
        # Sites report no loss under record-level DP or secure aggregation (it is not private).
        train_loss = float((weights * losses).sum() / weights.sum()) if with_loss else None
        row: dict[str, Any] = {
            "round": r,
            "sites": sorted(u.site for u in reports),
            "sites_sampled": sampled,
            "sites_failed": outcome.failed,
            "sites_offline": sorted(str(self.site_names.get(n, n)) for n in self._offline),
            "train_loss": train_loss,
            "site_train_loss": {u.site: u.metrics["train-loss"] for u in with_loss},
            "site_seconds": {
                u.site: u.metrics["site-seconds"] for u in with_loss if "site-seconds" in u.metrics
            },
            "bytes_up": outcome.bytes_up,
            "bytes_down": self._bytes_down,
        }
        row.update({f"eval_{k}": v for k, v in ev.items() if k != "examples"})
        row.update(outcome.extra)
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

    def _summary(
        self, base: dict[str, float], final: dict[str, float], wall: float, source: str
    ) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "model": source,
            "task": self.cfg.model.task,
            "rounds": len(self.rows),
            "sites": {
                name: {
                    "records": n,
                    **({"prepare": self.site_prepare[name]} if name in self.site_prepare else {}),
                }
                for name, n in sorted(self.site_records.items())
            },
            "base": base,
            "final": final,
            "train_loss": [row["train_loss"] for row in self.rows],
            "bytes_up": [row["bytes_up"] for row in self.rows],
            "bytes_down": [row["bytes_down"] for row in self.rows],
            "dropouts": dropouts(self.rows),
            "wall_time_s": round(wall, 2),
            "run_id": self.run_id,
            "config_sha256": self.cfg.digest(),
        }


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "(no test set)"
