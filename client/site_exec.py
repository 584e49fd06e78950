"""`fedtune site-exec`: a site's SuperExec that pays the torch/transformers/peft imports once.

In Flower's Deployment Engine every ClientApp message runs in a new `flwr-clientapp` process,
which imports torch, transformers and peft again: about 6-9 s of CPU per message on a small
machine, more than a whole round of local training on small models. This is a drop-in for
`flower-superexec` next to a SuperNode started with ``--isolation process``: the same
task-acquisition loop against the SuperNode's Runtime API, but each task runs in a process forked
from a *forkserver* (Python's multiprocessing) that imported the heavy libraries once at start-up.
A task then starts in about 0.1 s.

What runs in the forked process is exactly what `flwr-clientapp` runs (`run_clientapp`: pull the
message and FAB, install the FAB, load the ClientApp from it, push the reply), so the app code is
the FAB's, as with Flower's own executor. The forkserver holds nothing but imported modules: no
sockets, no threads, no data; it is started before this process opens any connection. Its control
socket lives in a private (0700) temporary folder, so only the site's own user can reach it.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
import time
from collections.abc import Sequence
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from client.site_metrics import SiteMetrics
from common.core.errors import FedtuneError

logger = logging.getLogger(__name__)

#: Imported once in the forkserver; every task process starts with them loaded. A module that is
#: not installed is skipped by multiprocessing (e.g. opacus' optional parts).
PRELOAD: tuple[str, ...] = (
    "numpy",
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "peft",
    "peft.tuners.lora",
    "opacus",
    "safetensors.torch",
    "cryptography.hazmat.primitives.ciphers.aead",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)
DEFAULT_POLL_S = 0.2


def _run_task(
    runtime_api_address: str,
    token: str,
    insecure: bool,
    root_certificates_path: str | None,
    parent_pid: int | None,
) -> None:
    """In the forked task process: what `flwr-clientapp --token ...` does."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(
        runtime_api_address=runtime_api_address,
        token=token,
        insecure=insecure,
        certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def _ready() -> None:
    """Forked once at start-up so the forkserver (and its imports) is ready before any task."""


class ForkserverExecutor:
    """Flower's SuperExec executor protocol, launching ClientApp tasks from a warm forkserver.

    multiprocessing keeps one forkserver per process: the first executor's ``preload`` holds.
    """

    def __init__(
        self, preload: Sequence[str] = PRELOAD, metrics: SiteMetrics | None = None
    ) -> None:
        from flwr.supercore.constant import TaskType

        self.metrics = metrics
        self._task_type = TaskType.CLIENT_APP
        self._ctx: ForkServerContext = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))
        self._children: dict[int, BaseProcess] = {}
        t0 = time.monotonic()
        warm = self._ctx.Process(target=_ready, name="fedtune-preload")
        warm.start()
        warm.join()
        if warm.exitcode != 0:
            raise FedtuneError(f"the preloading forkserver failed (exit code {warm.exitcode})")
        self.preload_s = time.monotonic() - t0
        logger.info(
            "site-exec: %s imported once in %.1f s; ClientApp tasks fork from there",
            ", ".join(p for p in preload if "." not in p),
            self.preload_s,
        )

    # -- Flower's executor protocol ----------------------------------------------------------
    def get_eligible_capacity(
        self,
        supported_task_types: set[Any],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[Any], set[str]]:
        del insecure, root_certificates_path
        return supported_task_types & {self._task_type}, set()

    def wait_for_capacity(self, task_type: Any = None, **_: Any) -> None:
        """Forks have no capacity gate."""

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != self._task_type:
            return LaunchResult.failed(f"site-exec runs ClientApp tasks only, not {spec.task_type}")
        proc = self._ctx.Process(
            target=_run_task,
            args=(
                spec.runtime_api_address,
                spec.token,
                spec.insecure,
                spec.root_certificates_path,
                spec.parent_pid,
            ),
            name=f"clientapp-task-{spec.task_id}",
        )
        proc.start()
        assert proc.pid is not None
        self._children[proc.pid] = proc
        if self.metrics is not None:
            self.metrics.started(proc.pid)
        logger.info("task %s: ClientApp process %d started", spec.task_id, proc.pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished task processes and log the ones that failed."""
        for pid, proc in list(self._children.items()):
            if proc.is_alive():
                continue
            del self._children[pid]
            if self.metrics is not None:
                self.metrics.ended(pid, proc.exitcode)
            if proc.exitcode:
                logger.warning("ClientApp process %d (%s) exited %s", pid, proc.name, proc.exitcode)

    def close(self) -> None:
        """Stop running task processes (they would stop anyway: they watch this process)."""
        for proc in self._children.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self._children.values():
            proc.join(timeout=5)
        self._children.clear()

    @property
    def running(self) -> list[int]:
        return [pid for pid, p in self._children.items() if p.is_alive()]


def run_site_exec(
    runtime_api_address: str,
    insecure: bool,
    root_certificates: Path | None = None,
    auth_secret_file: Path | None = None,
    poll_s: float = DEFAULT_POLL_S,
    preload: Sequence[str] = PRELOAD,
    metrics: tuple[str, int, Path | None] | None = None,
) -> None:
    """Acquire ClientApp tasks from the SuperNode's Runtime API and run each in a warm fork,
    until stopped (SIGTERM or SIGINT: running tasks are terminated, the forkserver exits).
    ``metrics``: (host, port, ledger folder) of the site's own Prometheus metrics."""
    if insecure and root_certificates is not None:
        raise FedtuneError("`--insecure` and `--root-certificates` exclude each other")
    if not 0.01 <= poll_s <= 60:
        raise FedtuneError(f"`--poll-interval` must be between 0.01 and 60 s, got {poll_s}")
    if insecure and not is_loopback(runtime_api_address):
        logger.warning(
            "\n%s\n!!  --insecure to %s: the Runtime API is not on this machine's loopback, so "
            "tasks, global\n!!  adapters and site updates cross the network in clear text. Keep "
            "the SuperNode's\n!!  Runtime API on 127.0.0.1, or use TLS (--root-certificates).\n%s",
            "!" * 78, runtime_api_address, "!" * 78,
        )  # fmt: skip
    secret = _read_secret(auth_secret_file)
    site_metrics = SiteMetrics(metrics[2]) if metrics is not None else None
    # The forkserver starts before any connection or thread exists in this process.
    executor = ForkserverExecutor(preload, site_metrics)
    if site_metrics is not None and metrics is not None:
        site_metrics.serve(metrics[0], metrics[1])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the cleanup below
    try:
        _loop(executor, runtime_api_address, insecure, root_certificates, secret, poll_s)
    except KeyboardInterrupt:
        logger.info("site-exec: stopped")
    finally:
        executor.close()


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` (IPv6 in brackets) names this machine's loopback interface."""
    import ipaddress

    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_secret(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        secret = path.read_bytes()
    except OSError as err:
        raise FedtuneError(f"cannot read the SuperExec auth secret {path}: {err.strerror}") from err
    if not secret:
        raise FedtuneError(f"the SuperExec auth secret file {path} is empty")
    return secret


def _loop(
    executor: ForkserverExecutor,
    address: str,
    insecure: bool,
    root_certificates: Path | None,
    secret: bytes | None,
    poll_s: float,
) -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.plugin import AutoExecPlugin
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    certs_path = str(root_certificates) if root_certificates else None
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=secret,
                protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
            )
        )
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(certs_path, insecure),
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )
    plugin = AutoExecPlugin(
        runtime_api_address=address,
        insecure=insecure,
        root_certificates_path=certs_path,
        runtime_dependency_install=False,
        executor=executor,
    )
    logger.info("site-exec: taking ClientApp tasks from the SuperNode at %s", address)
    try:
        while True:
            executor.reconcile()
            types, hashes = executor.get_eligible_capacity(set(plugin.supported_task_types))
            res = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=types, agentapp_fab_hashes=hashes)
            )
            if res.HasField("task") and res.token:
                result = plugin.launch_task(token=res.token, task=res.task)
                if result.status != "accepted":
                    logger.error("task %s not launched: %s", res.task.task_id, result.message)
            time.sleep(poll_s)
    finally:
        client.close()
