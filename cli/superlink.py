"""A private Flower SuperLink in simulation mode, started for one run and stopped after it.

`flower-superlink --simulation` on 127.0.0.1, on a port free at start, with an in-memory state and
its own FLWR_HOME (a temporary folder holding the connection file and the app Flower installs);
`flwr` commands reach it through that connection. The SuperLink starts a SuperExec, which starts
`flwr-simulation`, which starts Ray: Flower detaches them from us, so every process started here
carries a tag in its environment and :meth:`LocalSuperLink.close` stops all of them by PID
(terminate, wait, kill). It runs on exit from the ``with`` block: normal end, error, Ctrl-C. If
this process dies without closing, the kernel sends the SuperLink SIGTERM (Linux
PR_SET_PDEATHSIG) and Flower's parent monitors stop the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from common.core.errors import RoundError

logger = logging.getLogger(__name__)
TAG_ENV = "FEDTUNE_SUPERLINK_TAG"
CONNECTION = "fedtune-simulation"
START_TIMEOUT_S = 90.0
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it: no fixed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tagged_pids(tag: str, env: str = TAG_ENV) -> list[int]:
    """Live processes (not zombies) whose environment carries ``env=tag`` (Linux /proc)."""
    needle = f"{env}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def _die_with_parent() -> Any:
    """A ``preexec_fn``: the child gets SIGTERM when its parent dies (Linux; elsewhere none)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: nothing to load after it
    return lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class LocalSuperLink:
    """``with LocalSuperLink(logs) as link: link.flwr("run", ...)``; everything stops on exit."""

    logs: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = 0
    home: Path | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """Its FLWR_HOME, removed on close: also for files a run needs while it lasts."""
        if self.home is None:
            raise RuntimeError("the SuperLink is not started")
        return self.home

    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)  # flwr's commands sit beside this Python
        return {
            **os.environ,
            **self.extra_env,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.folder),
            "FLWR_TELEMETRY_ENABLED": "0",  # no network
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            TAG_ENV: self.tag,
        }

    def spawn(self, cmd: list[str], stdout: IO[Any] | int, cwd: Path | None = None) -> Any:
        """Start ``cmd`` tagged, in its own session (a terminal's Ctrl-C reaches only us: we
        stop everything in order), and stopped with us if we die."""
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=self.env(), stdout=stdout, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent(),
        )  # fmt: skip
        self.started.append(proc)
        return proc

    def start(self) -> LocalSuperLink:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = Path(tempfile.mkdtemp(prefix="fedtune-flwr-"))
        log = self.logs / "superlink.log"
        for _ in range(3):  # another process may take the free port before the SuperLink does
            self.port = free_port()
            cmd = ["flower-superlink", "--simulation", "--insecure", "--host", "127.0.0.1"]
            cmd += ["--port", str(self.port), "--disable-runtime-dependency-installation"]
            with log.open("wb") as fh:
                if self._ready(self.spawn(cmd, fh)):
                    self._write_connection(self.home)
                    logger.debug("SuperLink on 127.0.0.1:%d, FLWR_HOME %s", self.port, self.home)
                    return self
        raise RoundError(f"the local Flower SuperLink did not start; see its log, {log}")

    def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """Its HTTP API answers /health; False if it exited first (e.g. the port was taken)."""
        url = f"http://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=1.0) as res,
            ):
                if res.status == 200:
                    return True
            time.sleep(0.2)
        return False

    def _write_connection(self, home: Path) -> None:
        text = (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        (home / "config.toml").write_text(text, encoding="utf-8")

    def flwr(self, args: list[str], stdout: IO[Any] | int, cwd: Path | None = None) -> Any:
        """A `flwr` CLI command against this SuperLink (its connection is the default)."""
        return self.spawn(["flwr", *args], stdout, cwd)

    def close(self, grace: float = 5.0) -> None:
        """Stop what was started here and what that started: terminate, wait, kill.

        After a finished run only the SuperLink and its SuperExec are left, and stop at once. An
        interrupted `flwr-simulation` waits for its ServerApp thread (up to Flower's force-exit
        timeout): it is killed after ``grace``, which loses nothing (rounds are checkpointed).
        """
        self._signal(signal.SIGTERM)
        if not self._gone(grace):
            logger.debug("still running %.0f s after SIGTERM: %s", grace, self._names())
            self._signal(signal.SIGKILL)
            self._gone(5.0)
        for proc in self.started:
            proc.wait()
        # A process spawned while the others stopped (Ray's dashboard and runtime-env agents
        # start late) is caught here: done only once no tagged process has been seen for a
        # whole second (one empty scan was not enough: an agent appeared after it, in CI).
        quiet_since: float | None = None
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            if tagged_pids(self.tag):
                quiet_since = None
                logger.debug("started during shutdown, killing: %s", self._names())
                self._signal(signal.SIGKILL)
                self._gone(2.0)
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 1.0:
                break
            time.sleep(0.1)
        for pid in tagged_pids(self.tag):
            logger.warning("process %d is still alive after SIGKILL", pid)
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
        logger.debug("SuperLink on port %d and what it started: stopped", self.port)

    def _signal(self, sig: signal.Signals) -> None:
        pids = {p.pid for p in self.started if p.poll() is None} | set(tagged_pids(self.tag))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _names(self) -> list[str]:
        names = []
        for pid in tagged_pids(self.tag):
            with contextlib.suppress(OSError):
                names.append(f"{pid} {(Path('/proc') / str(pid) / 'cmdline').read_bytes()[:60]!r}")
        return names

    def _gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.started) or tagged_pids(self.tag):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def __enter__(self) -> LocalSuperLink:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
