import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.core.config import (
    Config,
    apply_overrides,
    build_config,
    from_run_config,
    load_config,
    to_toml,
)
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
    with pytest.raises(ConfigError, match="federation.evaluate_every"):
        load_config(None, ["federation.early_stop.patience=3", "federation.evaluate_every=0"])


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


# -- derived values are computed, and every config survives dump -> load -> dump -------------


@st.composite
def config_trees(draw: st.DrawFn) -> dict:
    """Random trees over the fields that interact (privacy, secure aggregation, weighting)."""
    sites = draw(st.integers(1, 6))
    tree: dict = {
        "federation": {
            "min_sites": sites,
            "sites_per_round": draw(st.sampled_from([0, sites, sites + 1])),
            "weighting": draw(st.sampled_from(["auto", "records", "uniform"])),
            "rounds": draw(st.integers(1, 50)),
        },
        "train": {
            "lr": draw(st.floats(1e-6, 1.0)),
            "weight_decay": draw(st.sampled_from([0.0, 0.01])),
            "max_grad_norm": draw(st.sampled_from([None, 0.5])),
        },
        "secagg": {
            "enabled": draw(st.booleans()),
            "neighbours": draw(st.sampled_from([0, 2])),
            "clip_range": draw(st.sampled_from(["auto", 1.0, 8.0, 50.0])),
        },
        "data": {"prompt": draw(st.sampled_from([None, "Q: {text}\nA:"]))},
        "privacy": {"enabled": draw(st.booleans())},
    }
    if draw(st.booleans()):
        tree["privacy"]["institution"] = {
            "enabled": draw(st.booleans()),
            "noise_multiplier": draw(st.floats(0.0, 5.0)),
            "clip_norm": draw(st.floats(0.01, 10.0)),
            "noise_at": draw(st.sampled_from(["auto", "sites", "server"])),
        }
    if draw(st.booleans()):
        eps = draw(st.sampled_from([None, 1.0, 8.0]))
        tree["privacy"]["record"] = {
            "enabled": draw(st.booleans()),
            **({"target_epsilon": eps} if eps else {"noise_multiplier": 1.1}),
        }
    return _drop_none(tree)


def _drop_none(tree: dict) -> dict:
    return {
        k: _drop_none(v) if isinstance(v, dict) else v for k, v in tree.items() if v is not None
    }


@settings(max_examples=300, deadline=None)
@given(config_trees())
def test_any_valid_config_survives_dump_load_dump(tree: dict) -> None:
    try:
        cfg = build_config(tree)
    except ConfigError:
        assume(False)
        return
    dumped = cfg.model_dump(mode="json")
    again = build_config(json.loads(json.dumps(dumped)), "round trip")
    assert again.model_dump(mode="json") == dumped
    assert build_config(tomllib.loads(to_toml(again))).model_dump(mode="json") == dumped
    # The derived values follow from the fields alone.
    assert (again.site_weighting, again.institution_noise_at, again.quantizer_range) == (
        cfg.site_weighting,
        cfg.institution_noise_at,
        cfg.quantizer_range,
    )


def test_issue_repro_auto_clip_range_survives_the_run_config_bridge() -> None:
    # Before: clip_range was written back as round(8.6208, 3) = 8.621 and then rejected as
    # "must be at least 8.62" by the run-config bridge.
    cfg = load_config(
        SCENARIOS / "tiny.toml",
        [
            "privacy.institution.enabled=true",
            "privacy.institution.noise_multiplier=2.2",
            "federation.min_sites=3",
            "secagg.enabled=true",
            'federation.weighting="uniform"',
        ],
    )
    assert cfg.secagg.clip_range == "auto"  # nothing written back into the field
    assert cfg.quantizer_range == 8.622  # 1 + 6 * 2.2 / sqrt(3) = 8.6210..., rounded up
    assert cfg.quantizer_range >= 1 + 6 * 2.2 / 3**0.5
    bridged = from_run_config({"fedtune-config": json.dumps(cfg.model_dump(mode="json"))})
    assert bridged.model_dump() == cfg.model_dump()


def test_explicit_clip_range_too_small_for_site_noise_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"`secagg\.clip_range` \(2\.0\) must be at least"):
        load_config(
            None,
            ["privacy.institution.enabled=true", "secagg.enabled=true", "secagg.clip_range=2.0"],
        )


def test_derived_values() -> None:
    plain = load_config(None)
    assert (plain.site_weighting, plain.institution_noise_at, plain.quantizer_range) == (
        "records",
        None,
        8.0,
    )
    inst = load_config(None, ["privacy.institution.enabled=true"])
    assert (inst.site_weighting, inst.institution_noise_at) == ("uniform", "server")
    secure = load_config(None, ["privacy.institution.enabled=true", "secagg.enabled=true"])
    assert secure.institution_noise_at == "sites"
    assert load_config(None, ["data.prompt='Q: {text}'"]).data.prompt_template == "Q: {text}"
    assert "{text}" in plain.data.prompt_template


def test_train_max_grad_norm_is_refused_under_record_dp() -> None:
    with pytest.raises(ConfigError, match=r"`train\.max_grad_norm`.*`privacy\.record\.max_grad"):
        load_config(None, ["privacy.record.enabled=true", "privacy.record.noise_multiplier=1.0",
                           "train.max_grad_norm=0.5"])  # fmt: skip


def test_record_weighting_is_refused_under_either_dp_level() -> None:
    # Record counts are not covered by the guarantee, so private sites do not send them.
    record_dp = ["privacy.record.enabled=true", "privacy.record.noise_multiplier=1.0"]
    assert load_config(None, record_dp).site_weighting == "uniform"
    with pytest.raises(ConfigError, match=r"`federation\.weighting` must be .* record-level DP"):
        load_config(None, [*record_dp, "federation.weighting='records'"])
    assert load_config(None).site_weighting == "records"


def test_the_dp_recipe_fills_the_groups_a_config_leaves_unset() -> None:
    """`recipe = "dp"`: every group the config does not touch gets the recipe's values; a group
    with any field set stays the user's, whole (the rest of it keeps its defaults)."""
    default = load_config(None)
    cfg = load_config(None, ["recipe='dp'"])
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.local_steps, cfg.train.batch_size) == (
        "sgd",
        1.0,
        1,
        256,
    )
    assert cfg.train.schedule == "constant"
    assert (cfg.federation.server_optimizer, cfg.federation.server_lr) == ("fedadam", 0.12)
    assert cfg.federation.server_schedule == "linear"
    assert (cfg.lora.r, cfg.lora.layers) == (2, [-1])
    assert cfg.train.cache_frozen and not default.train.cache_frozen
    # the accountant stays the one the sites' ledgers charge with (RDP): calibrating the noise
    # with a tighter one would have the ledgers record more than the target
    assert cfg.privacy.record.accountant == default.privacy.record.accountant == "rdp"

    mine = load_config(None, ["recipe='dp'", "train.lr=0.5", "federation.server_lr=0.3"])
    # a touched group is the user's, whole: their rate with the default optimizer and schedule
    assert (mine.train.lr, mine.train.optimizer, mine.train.schedule) == (
        0.5,
        default.train.optimizer,
        default.train.schedule,
    )
    assert mine.federation.server_lr == 0.3
    assert mine.federation.server_optimizer == default.federation.server_optimizer
    # untouched groups: the recipe's
    assert (mine.train.local_steps, mine.train.batch_size, mine.lora.r) == (1, 256, 2)

    raw = {"recipe": "dp"}
    build_config(raw)
    assert raw == {"recipe": "dp"}  # the caller's tree is not filled in
    # The resolved config holds every value: it loads back as itself, recipe and all.
    again = build_config(tomllib.loads(to_toml(mine)))
    assert again.model_dump(mode="json") == mine.model_dump(mode="json")
    with pytest.raises(ConfigError, match="`recipe`"):
        load_config(None, ["recipe='fast'"])


def test_record_level_prv_is_refused_as_the_ledgers_charge_rdp() -> None:
    """A site's ledger charges rounds with RDP: noise calibrated to epsilon 8 by PRV would be
    recorded above 8 (9.15 on bank-complaints), so the run could not keep the target it states."""
    with pytest.raises(ConfigError, match=r'`privacy.record.accountant` = "prv" is not supported'):
        load_config(None, ["privacy.enabled=true", "privacy.record.accountant='prv'"])
    assert load_config(None, ["privacy.record.accountant='prv'"]).privacy.record.accountant == "prv"


def test_the_dp_recipe_gives_layers_only_to_the_methods_that_take_them() -> None:
    """`lora.method = "head"` trains no layer: the recipe's adapted layers are not filled in
    (they would contradict it); its other groups are."""
    head = load_config(None, ["recipe='dp'", "lora.method='head'"])
    assert head.lora.layers == [] and (head.lora.r, head.train.batch_size) == (2, 256)
    assert load_config(None, ["recipe='dp'", "lora.method='partial'"]).lora.layers == [-1]


def test_a_scenarios_private_table_applies_when_record_dp_is_on(tmp_path: Path) -> None:
    """`[private]`: the scenario's settings for record-level DP, over its own when DP is on
    (by either switch), never otherwise; `--set` wins over both; a bad key is named."""
    bank = SCENARIOS / "bank-complaints.toml"
    plain = load_config(bank)
    assert plain.lora.method == "lora" and plain.model.head_input == "as-is"
    for on in ("privacy.enabled=true", "privacy.record.enabled=true"):
        cfg = load_config(bank, [on, "privacy.record.target_epsilon=8"])
        assert cfg.lora.method == "head" and cfg.model.head_input == "whitened"
        assert cfg.simulation.partition.reference_records == 1000
        assert cfg.privacy.record.max_grad_norm == 3.0
        assert (cfg.federation.server_optimizer, cfg.federation.server_lr) == ("fedadam", 0.03)
        assert cfg.lora.aggregation == "ffa"  # what the table leaves alone stays the file's
    spelt = load_config(bank, ["privacy.record.enabled=True", "privacy.record.target_epsilon=8"])
    assert spelt.privacy.record.enabled and spelt.lora.method == "head"  # a string switch too
    off = load_config(bank, ["privacy.enabled=true", "privacy.record.enabled=false"])
    assert off.lora.method == "lora" and off.privacy.institution.enabled
    mine = load_config(bank, ["privacy.enabled=true", "privacy.record.max_grad_norm=2.5"])
    assert mine.privacy.record.max_grad_norm == 2.5 and mine.lora.method == "head"

    bad = tmp_path / "bad.toml"
    bad.write_text('[private]\nlora.methd = "head"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: `\[private\]`: `lora.methd` is not a"):
        load_config(bad)  # named even with DP off
    for switch in ("privacy.record.enabled", "privacy.institution.enabled"):
        bad.write_text(f"[private]\n{switch} = false\n")
        with pytest.raises(ConfigError, match=f"cannot set `{switch}`"):
            load_config(bad)
    bad.write_text('private = "head"\n')
    with pytest.raises(ConfigError, match="must be a table"):
        load_config(bad)
