"""`privacy-report --plan`'s noise outlook warns where a step's noise is too loud to learn."""

from __future__ import annotations

import re

import pytest

from common.core.config import load_config
from common.privacy.report import NOISE_TOO_LOUD, noise_outlook
from tests.conftest import SCENARIOS


def _noise(text: str, site: str) -> float:
    return float(re.search(rf"site {site}: .* noise ([0-9.]+) C", text).group(1))


@pytest.mark.slow  # calibrates the noise of a few batch sizes (seconds each)
def test_small_sites_are_warned_and_told_what_would_help():
    cfg = load_config(SCENARIOS / "hospitals.toml", ["privacy.enabled=true"])
    text = noise_outlook(cfg, {"small": 18, "mid": 124})
    assert _noise(text, "small") > NOISE_TOO_LOUD and _noise(text, "mid") > NOISE_TOO_LOUD
    assert "WARNING: site small's noise per step" in text
    assert "no `train.batch_size` below its 18 records" in text
    batch = int(re.search(r"`train.batch_size` = (\d+)", text).group(1))
    assert cfg.train.batch_size < batch < 124
    trial = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch})})
    assert _noise(noise_outlook(trial, {"mid": 124}), "mid") <= NOISE_TOO_LOUD


def test_the_shipped_dp_recipes_are_not_too_loud_at_their_site_sizes():
    for name, records in (("bank-complaints", 700), ("hospital-coding", 1500)):
        cfg = load_config(SCENARIOS / f"{name}.toml", ["privacy.enabled=true"])
        text = noise_outlook(cfg, {"site-0": records})
        assert _noise(text, "site-0") <= NOISE_TOO_LOUD and "WARNING" not in text, name


def test_no_outlook_without_record_level_dp():
    cfg = load_config(SCENARIOS / "hospitals.toml")
    assert noise_outlook(cfg, {"a": 100}) == ""
