"""Adapter state round trips, and FFA aggregation is exactly the average of the sites' B·A."""

import numpy as np
import pytest
import torch

from common.core.adapters import (
    attach_lora,
    exchanged_keys,
    flatten,
    frozen_fingerprint,
    get_state,
    set_state,
    unflatten,
)
from common.core.config import Config, FederationConfig
from common.core.errors import ModelError
from common.core.models import build_tiny
from common.protocol.aggregate import RoundSum, SiteReport, apply_sum, site_weights
from common.protocol.wire import from_record, to_record


def peft_model(cfg):
    model, _ = build_tiny("llama", cfg.model.tiny)
    return attach_lora(model, cfg.lora, cfg.model)


def test_round_trip_through_array_record(tiny_cfg):
    model = peft_model(tiny_cfg)
    keys = exchanged_keys(model, tiny_cfg.lora)
    state = get_state(model, keys)
    rng = np.random.default_rng(0)
    changed = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in state.items()}
    back = from_record(to_record(changed), expected=state)
    set_state(model, back)
    again = get_state(model, keys)
    for k in keys:
        np.testing.assert_array_equal(again[k], changed[k])
    np.testing.assert_array_equal(flatten(unflatten(flatten(changed), state)), flatten(changed))


def test_ffa_exchanges_only_b_and_shares_a_across_parties(tiny_cfg):
    a, b = peft_model(tiny_cfg), peft_model(tiny_cfg)
    keys = exchanged_keys(a, tiny_cfg.lora)
    assert keys and all("lora_B" in k for k in keys)
    assert frozen_fingerprint(a, tiny_cfg.lora) == frozen_fingerprint(b, tiny_cfg.lora)
    other = tiny_cfg.lora.model_copy(update={"init_seed": 99})
    c = attach_lora(build_tiny("llama", tiny_cfg.model.tiny)[0], other, tiny_cfg.model)
    assert frozen_fingerprint(c, other) != frozen_fingerprint(a, tiny_cfg.lora)
    assert not any(p.requires_grad for n, p in a.named_parameters() if "lora_A" in n)


def test_fedavg_mode_exchanges_a_and_b(tiny_cfg):
    lora = tiny_cfg.lora.model_copy(update={"aggregation": "fedavg"})
    model = attach_lora(build_tiny("llama", tiny_cfg.model.tiny)[0], lora, tiny_cfg.model)
    keys = exchanged_keys(model, lora)
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)


def test_bad_state_is_rejected_with_the_key(tiny_cfg):
    model = peft_model(tiny_cfg)
    state = get_state(model, exchanged_keys(model, tiny_cfg.lora))
    key = next(iter(state))
    with pytest.raises(ModelError, match="expected shape"):
        set_state(model, {key: np.zeros((1, 1), np.float32)})
    bad = dict(state)
    bad[key] = np.full_like(state[key], np.nan)
    with pytest.raises(ModelError, match="NaN"):
        from_record(to_record(bad), expected=state)
    with pytest.raises(ModelError, match="wrong keys"):
        from_record(to_record({"x": np.zeros(3, np.float32)}), expected=state)


def _plain_sum(cfg, deltas, records):
    """The plain path's sum, as server/plain_round.py builds it from the public weights."""
    weights = site_weights(cfg, dict(enumerate(records)))
    total = sum(weights[i] * flatten(d).astype(np.float64) for i, d in enumerate(deltas))
    reports = [SiteReport(f"s{i}", n, {}) for i, n in enumerate(records)]
    return RoundSum(total, sum(weights.values()), reports)


def test_weighted_fedavg_matches_numpy_reference():
    rng = np.random.default_rng(1)
    glob = {
        "w": rng.normal(size=(4, 3)).astype(np.float32),
        "b": rng.normal(size=5).astype(np.float32),
    }
    deltas = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in glob.items()} for _ in range(3)
    ]
    cfg = Config(federation=FederationConfig(server_lr=0.5))
    new = apply_sum(cfg, glob, _plain_sum(cfg, deltas, [10, 30, 60]), expected=3)
    w = np.array([10, 30, 60]) / 100
    for k in glob:
        ref = glob[k] + 0.5 * sum(wi * d[k] for wi, d in zip(w, deltas, strict=True))
        np.testing.assert_allclose(new[k], ref, rtol=1e-6, atol=1e-6)
    uniform = Config(federation=FederationConfig(weighting="uniform"))
    new = apply_sum(uniform, glob, _plain_sum(uniform, deltas, [10, 30, 60]), expected=3)
    np.testing.assert_allclose(
        new["b"] - glob["b"], np.mean([d["b"] for d in deltas], axis=0), rtol=1e-5, atol=1e-6
    )


def test_ffa_average_of_b_equals_average_of_b_times_a(tiny_cfg):
    """With A shared and frozen, mean_i(B_i)·A == mean_i(B_i·A): aggregation is exact."""
    model = peft_model(tiny_cfg)
    keys = exchanged_keys(model, tiny_cfg.lora)
    glob = get_state(model, keys)
    rng = np.random.default_rng(2)
    deltas = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in glob.items()} for _ in range(3)
    ]
    new = apply_sum(tiny_cfg, glob, _plain_sum(tiny_cfg, deltas, [5, 7, 11]), expected=3)
    weights = np.array([5, 7, 11]) / 23
    module = model.base_model.model.model.layers[0].self_attn.q_proj
    a = module.lora_A["default"].weight.detach().numpy().astype(np.float64)
    key = next(k for k in keys if "layers.0.self_attn.q_proj.lora_B" in k)
    site_products = [(glob[key] + d[key]).astype(np.float64) @ a for d in deltas]
    expected = sum(w * p for w, p in zip(weights, site_products, strict=True))
    np.testing.assert_allclose(new[key].astype(np.float64) @ a, expected, rtol=1e-5, atol=1e-6)
    # ...while averaging A and B separately is not exact (the reason ffa is the default).
    a_sites = [a + rng.normal(size=a.shape) for _ in deltas]
    b_sites = [glob[key] + d[key] for d in deltas]
    separate = sum(w * b for w, b in zip(weights, b_sites, strict=True)) @ sum(
        w * x for w, x in zip(weights, a_sites, strict=True)
    )
    exact = sum(w * (b @ x) for w, b, x in zip(weights, b_sites, a_sites, strict=True))
    assert np.abs(separate - exact).max() > 1e-3
    torch.manual_seed(0)


def test_lora_layers_adapt_only_the_chosen_layers_counting_from_the_top(tiny_cfg):
    def keys(layers):
        model, _ = build_tiny("llama", tiny_cfg.model.tiny)
        lora = tiny_cfg.lora.model_copy(update={"layers": layers})
        return model.config.num_hidden_layers, exchanged_keys(
            attach_lora(model, lora, tiny_cfg.model), lora
        )

    n, every = keys([])
    _, top = keys([-1])
    assert n >= 2
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in top} == {n - 1}
    assert top == [k for k in every if f".layers.{n - 1}." in k]  # same modules, one layer
    assert keys([0])[1] == [k for k in every if ".layers.0." in k]


def test_lora_layers_out_of_range_name_the_field(tiny_cfg):
    model, _ = build_tiny("llama", tiny_cfg.model.tiny)
    n = model.config.num_hidden_layers
    lora = tiny_cfg.lora.model_copy(update={"layers": [n]})
    with pytest.raises(ModelError, match=rf"`lora.layers`: \[{n}\] out of range"):
        attach_lora(model, lora, tiny_cfg.model)


def test_train_final_norm_trains_and_sends_the_norm_after_the_last_layer_only(tiny_cfg):
    cfg = tiny_cfg.model_copy(
        update={"lora": tiny_cfg.lora.model_copy(update={"train_final_norm": True})}
    )
    model = peft_model(cfg)
    keys = exchanged_keys(model, cfg.lora)
    norms = [k for k in keys if "lora_" not in k]
    assert norms == ["base_model.model.model.norm.weight"]  # no layer's own norms
    plain = peft_model(tiny_cfg)
    assert all("lora_" in k for k in exchanged_keys(plain, tiny_cfg.lora))
    # it round-trips like the adapter, and a changed norm changes the model's output
    state = get_state(model, keys)
    ids = torch.tensor([[5, 6, 7]])
    before = model(input_ids=ids).logits
    state[norms[0]] = state[norms[0]] * 2.0
    set_state(model, state)
    np.testing.assert_array_equal(get_state(model, keys)[norms[0]], state[norms[0]])
    assert not torch.allclose(model(input_ids=ids).logits, before)


def test_train_final_norm_on_a_post_norm_model_names_the_field(tiny_cfg):
    cfg = tiny_cfg.model_copy(
        update={"lora": tiny_cfg.lora.model_copy(update={"train_final_norm": True})}
    )
    bert, _ = build_tiny("bert", cfg.model.tiny)
    with pytest.raises(ModelError, match=r"`lora.train_final_norm`: a bert model has no norm"):
        attach_lora(bert, cfg.lora, cfg.model)


def test_a_max_length_past_the_models_positions_is_refused_naming_the_field(tiny_cfg):
    """Under DP every batch is padded to `model.max_length`: one that does not fit the model's
    positions (1,024 in the tiny models) would fail every step, so it is refused up front."""
    model, _ = build_tiny("llama", tiny_cfg.model.tiny)
    prompt = tiny_cfg.lora.model_copy(update={"method": "prompt", "layers": []})
    fits = tiny_cfg.model.model_copy(update={"max_length": 1004})
    attach_lora(model, prompt, fits)  # 1,004 + 20 virtual tokens: exactly the 1,024
    model, _ = build_tiny("llama", tiny_cfg.model.tiny)
    past = tiny_cfg.model.model_copy(update={"max_length": 1005})
    with pytest.raises(
        ModelError, match=r"`model.max_length` = 1005 \+ 20 virtual tokens.*at most 1004"
    ):
        attach_lora(model, prompt, past)
    model, _ = build_tiny("llama", tiny_cfg.model.tiny)
    with pytest.raises(ModelError, match=r"`model.max_length` = 1025 is more than the 1024"):
        attach_lora(model, tiny_cfg.lora, tiny_cfg.model.model_copy(update={"max_length": 1025}))
