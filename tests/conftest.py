"""Shared fixtures: tiny configs and models, built from configs with fixed seeds (no network)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Sites' privacy ledgers (client/policy.py) go to a folder of this test session, never to the
# user's own ~/.local/state: tests must neither read nor spend a real site's budget.
# Under pytest-xdist each worker gets its share of the cores (torch and the simulation's
# subprocesses read OMP_NUM_THREADS), so workers do not fight over them.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="fedtune-test-state-")

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "simulations" / "scenarios"


@pytest.fixture
def tiny_cfg():
    from common.core.config import load_config

    return load_config(SCENARIOS / "tiny.toml", ["data.labels=['red','green','blue']"])


# Under pytest-xdist (`make test`: `--dist loadgroup`) each test file stays on one worker, so its
# module and session fixtures are built once, except the files below: each of their tests builds
# its own federation (function-scoped fixtures) and share nothing expensive, so their tests
# spread over the workers.
SPREAD_FILES = {"test_deploy_faults.py", "test_methods.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name not in SPREAD_FILES:
            # the file's own path: files of the same name in two folders are two groups, and
            # a module fixture is never torn down by another file's tests in between
            group = item.path.relative_to(config.rootpath).with_suffix("").as_posix()
            item.add_marker(pytest.mark.xdist_group(group.replace("/", ".")))
