"""Shared fixtures: tiny configs and models, built from configs with fixed seeds (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "simulations" / "scenarios"


@pytest.fixture
def tiny_cfg():
    from common.core.config import load_config

    return load_config(SCENARIOS / "tiny.toml", ["data.labels=['red','green','blue']"])
