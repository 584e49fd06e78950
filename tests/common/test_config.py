from pathlib import Path

import pytest

from common.core.config import Config, apply_overrides, from_run_config, load_config, to_toml
from common.core.errors import ConfigError
from tests.conftest import SCENARIOS


def test_shipped_scenarios_load():
    for name in ("tiny", "hospitals", "banks"):
        cfg = load_config(SCENARIOS / f"{name}.toml")
        assert cfg.name == name


def test_overrides_parse_toml_values_and_strings():
    cfg = load_config(
        SCENARIOS / "tiny.toml",
        [
            "federation.rounds=5",
            "train.lr=0.01",
            "model.source=tiny:qwen2",
            "lora.target_modules=['q_proj']",
        ],
    )
    assert cfg.federation.rounds == 5
    assert cfg.train.lr == 0.01
    assert cfg.model.source == "tiny:qwen2"
    assert cfg.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("federation.rounds=0", "federation.rounds"),
        ("train.lr=-1", "train.lr"),
        ("lora.aggregation='mean'", "lora.aggregation"),
        ("model.task='vision'", "model.task"),
        ("train.bogus=1", "train.bogus"),
        ("data.eval_fraction=1.5", "data.eval_fraction"),
    ],
)
def test_each_bad_field_is_named(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(SCENARIOS / "tiny.toml", [override])
    assert f"`{field}`" in str(err.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["federation.rounds=0", "train.lr=-1", "lora.r=0"])
    msg = str(err.value)
    assert "3 invalid field(s)" in msg
    for field in ("federation.rounds", "train.lr", "lora.r"):
        assert f"`{field}`" in msg


def test_cross_field_rule():
    with pytest.raises(ConfigError, match="min_sites"):
        load_config(None, ["federation.sites_per_round=2", "federation.min_sites=3"])
    with pytest.raises(ConfigError, match="data.labels"):
        load_config(None, ["model.task='seq-cls'"])


def test_bad_files_are_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nsource=1")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides({}, ["no-equals-sign"])


def test_toml_round_trip_and_run_config_bridge(tmp_path: Path):
    cfg = load_config(SCENARIOS / "hospitals.toml", ["federation.rounds=7"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert (
        from_run_config(
            {
                "scenario": str(SCENARIOS / "tiny.toml"),
                "overrides": "federation.rounds=4;train.lr=0.5",
            }
        ).federation.rounds
        == 4
    )
    assert (
        from_run_config({"scenario": str(SCENARIOS / "tiny.toml"), "train.lr": 0.25}).train.lr
        == 0.25
    )
    import json

    assert from_run_config({"fedtune-config": json.dumps(cfg.model_dump(mode="json"))}) == cfg
    assert cfg.digest() != Config().digest()
