"""Shared end-to-end fixtures: the CLI as a subprocess and one plaintext tiny run per session.

Each CLI call carries a mark in its environment, which every process it starts inherits (Flower's
detached SuperLink, SuperExec and flwr-simulation, Ray's processes): :func:`marked` lists those
still alive, so a test can check that a command left nothing running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, SCENARIOS

MARK_ENV = "FEDTUNE_E2E_MARK"
TINY_MARK = uuid.uuid4().hex


def cli_env(mark: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), MARK_ENV: mark}


def fedtune(
    *args: str, cwd: Path = ROOT, mark: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cli.main", *args]
    env = cli_env(mark or uuid.uuid4().hex)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def left_running(mark: str, grace_s: float = 60.0) -> list[str]:
    """:func:`marked` once every process started under ``mark`` has exited, or after ``grace_s``
    (Ray's agents notice their raylet's death a moment after it: a clean-clone run saw them
    outlive it by more than 15 s, and exit later on their own)."""
    deadline = time.monotonic() + grace_s
    while (found := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def marked(mark: str) -> list[str]:
    """Live processes (zombies aside) started under ``mark``: "pid command line" each."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if needle in environ and state != "Z":
            found.append(f"{entry.name} {cmdline}")
    return found


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    proc = fedtune(
        "simulate", "--config", str(SCENARIOS / "tiny.toml"), "--out", str(out), mark=TINY_MARK
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc
