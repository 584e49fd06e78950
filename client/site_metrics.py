"""A site's own metrics for its operator (`fedtune site-exec --metrics-port`), off by default.

Prometheus text on 127.0.0.1 unless told otherwise: ClientApp tasks run (by outcome), running
now, the last task's duration and end time, and, when the site names its ledger folder
(`--state-dir`), what its ledger says it has spent (per dataset: epsilon over all runs at the
site's delta, its cap, rounds charged). Read from the ledger at each scrape, never from what a
coordinator says. Nothing about the records themselves: no counts, losses or gradients.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class _LedgerCollector(Collector):
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from client.privacy_site import ledger_report

        eps = GaugeMetricFamily("fedtune_site_epsilon", "Record-level epsilon this site's ledger "
                                "has spent over all runs (at the site's delta).",
                                labels=["dataset"])  # fmt: skip
        cap = GaugeMetricFamily("fedtune_site_epsilon_cap", "The site's own cap (`max-epsilon`).",
                                labels=["dataset"])  # fmt: skip
        rounds = GaugeMetricFamily("fedtune_site_rounds_charged", "Rounds charged to the ledger.",
                                   labels=["dataset"])  # fmt: skip
        try:
            reports = ledger_report(self.state_dir) if self.state_dir.is_dir() else []
        except Exception as err:  # a scrape must not take the site down; say why in the log
            logger.warning("site metrics: cannot read the ledger in %s: %s", self.state_dir, err)
            reports = []
        for report in reports:
            eps.add_metric([report.dataset], report.epsilon)
            rounds.add_metric([report.dataset], report.rounds)
            if report.max_epsilon is not None:
                cap.add_metric([report.dataset], report.max_epsilon)
        yield from (eps, cap, rounds)


class SiteMetrics:
    """Counters the site-exec loop feeds (:meth:`started`, :meth:`ended`), served if asked."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.tasks = Counter("fedtune_site_tasks", "ClientApp tasks run, by outcome.",
                             ["outcome"], registry=r)  # fmt: skip
        self.running = Gauge("fedtune_site_tasks_running", "ClientApp tasks running now.",
                             registry=r)  # fmt: skip
        self.last_seconds = Gauge("fedtune_site_last_task_seconds", "Wall time of the last task.",
                                  registry=r)  # fmt: skip
        self.last_end = Gauge("fedtune_site_last_task_end_timestamp_seconds",
                              "When the last task ended (Unix time).", registry=r)  # fmt: skip
        for outcome in ("ok", "failed"):
            self.tasks.labels(outcome)
        if state_dir is not None:
            r.register(_LedgerCollector(state_dir))
        self._started: dict[int, float] = {}

    def started(self, pid: int) -> None:
        self._started[pid] = time.monotonic()
        self.running.inc()

    def ended(self, pid: int, exitcode: int | None) -> None:
        begun = self._started.pop(pid, None)
        self.running.dec()
        self.tasks.labels("failed" if exitcode else "ok").inc()
        if begun is not None:
            self.last_seconds.set(time.monotonic() - begun)
        self.last_end.set(time.time())

    def serve(self, host: str, port: int) -> Any:
        """Serve /metrics on ``host:port`` (a background thread); returns the server."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        logger.info("site metrics: http://%s:%d/metrics", host, server.server_address[1])
        return server
