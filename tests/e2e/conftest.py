"""Shared end-to-end fixtures: the CLI as a subprocess and one plaintext tiny run per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SCENARIOS


def fedtune(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cli.main", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    proc = fedtune("simulate", "--config", str(SCENARIOS / "tiny.toml"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc
