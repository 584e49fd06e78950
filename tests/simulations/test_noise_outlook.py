"""`privacy-report --plan`'s noise outlook warns where a step's noise is too loud to learn."""

from __future__ import annotations

import re

import pytest

from common.core.config import load_config
from common.privacy.report import NOISE_TOO_LOUD, clip_outlook, noise_outlook
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
    # bank-complaints' smallest bank holds 999 complaints (all 10,000, Dirichlet 0.5 over 5 banks)
    for name, records in (("bank-complaints", 999), ("hospital-coding", 6716)):
        cfg = load_config(SCENARIOS / f"{name}.toml", ["privacy.enabled=true"])
        text = noise_outlook(cfg, {"site-0": records})
        assert _noise(text, "site-0") <= NOISE_TOO_LOUD and "WARNING" not in text, name
    # bank-complaints trains 4,616 parameters (top-layer rank-2 B of query and value, the head):
    # in norm too, its smallest bank is under the limit
    cfg = load_config(SCENARIOS / "bank-complaints.toml", ["privacy.enabled=true"])
    assert "WARNING" not in noise_outlook(cfg, {"site-0": 999}, 4616)
    # hospital-coding trains 12,096 (the 21-way head on SmolLM2's 576 features):
    # its smallest hospital (6,716 of all 42,189 descriptions) is under the limit in norm with the
    # scenario's batches of 4,000; at 666 (of 3,200, an earlier size) with the recipe's 256 the
    # noise is too loud, and the report says so
    cfg = load_config(SCENARIOS / "hospital-coding.toml", ["privacy.enabled=true"])
    assert "WARNING" not in noise_outlook(cfg, {"site-0": 6716}, 12096)
    earlier = load_config(
        SCENARIOS / "hospital-coding.toml", ["privacy.enabled=true", "train.batch_size=256"]
    )
    text = noise_outlook(earlier, {"site-0": 666}, 12096)
    assert "WARNING: site site-0's noise per step" in text and "in norm" in text


def test_no_outlook_without_record_level_dp():
    cfg = load_config(SCENARIOS / "hospitals.toml")
    assert noise_outlook(cfg, {"a": 100}) == ""


def test_with_the_trained_parameter_count_the_noise_is_judged_by_its_norm():
    from common.core.config import build_config
    from common.privacy.accounting import record_plan
    from common.privacy.report import NOISE_NORM_TOO_LOUD

    cfg = build_config(
        {
            "federation": {"rounds": 10},
            "train": {"local_steps": 1, "batch_size": 64},
            "privacy": {"record": {"enabled": True, "target_epsilon": 8.0}},
        }
    )
    trained = 12_000
    text = noise_outlook(cfg, {"a": 2000}, trained)
    sigma = record_plan(cfg, 2000).noise_multiplier
    norm = float(re.search(r"site a: .*, ([0-9.]+) C in norm", text).group(1))
    assert norm == pytest.approx(sigma * trained**0.5 / 64, abs=0.006)
    # per coordinate this plan passes the old rule; in norm it is too loud, and the warning says so
    assert _noise(text, "a") <= NOISE_TOO_LOUD < 1 and norm > NOISE_NORM_TOO_LOUD
    assert "WARNING: site a's noise per step" in text and "in norm" in text
    assert "`--set recipe=dp`" in text  # the recipe is named where it is not in use
    batch = int(re.search(r"`train.batch_size` = (\d+)", text).group(1))
    trial = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch})})
    quiet = noise_outlook(trial, {"a": 2000}, trained)
    assert "WARNING" not in quiet
    assert float(re.search(r", ([0-9.]+) C in norm", quiet).group(1)) <= NOISE_NORM_TOO_LOUD


def test_a_clip_bound_below_nearly_every_gradient_is_warned():
    cfg = load_config(SCENARIOS / "bank-complaints.toml", ["privacy.enabled=true"])
    norms = [1.0 + 0.01 * i for i in range(100)]  # 1.00 .. 1.99
    low = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={
        "record": cfg.privacy.record.model_copy(update={"max_grad_norm": 0.1})})})  # fmt: skip
    text = clip_outlook(low, norms)
    assert "clips 100% of them" in text and "WARNING" in text and "about 1.9" in text
    high = low.model_copy(update={"privacy": low.privacy.model_copy(update={
        "record": low.privacy.record.model_copy(update={"max_grad_norm": 1.9})})})  # fmt: skip
    text = clip_outlook(high, norms)
    assert "clips 9% of them" in text and "WARNING" not in text
    assert clip_outlook(load_config(SCENARIOS / "hospitals.toml"), norms) == ""


def test_per_record_gradient_norms_are_each_records_own(tiny_cfg):
    import torch

    from common.core.adapters import attach_lora
    from common.core.models import load_base
    from common.core.records import Record
    from common.core.tasks import batch_loss, collate, encode, record_grad_norms

    loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
    model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
    tok = loaded.tokenizer
    records = [Record([{"role": "user", "content": t}], lab, lab, f"r:{i}")
               for i, (t, lab) in enumerate([("a red apple", "red"), ("the sky", "blue"),
                                             ("grass", "green")])]  # fmt: skip
    norms = record_grad_norms(model, tok, records, tiny_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for e, norm in zip(encode(records, tok, tiny_cfg), norms, strict=True):
        model.eval()  # no dropout: the same figure however it is computed
        loss, _ = batch_loss(model, collate([e], tok.pad_token_id))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        expected = torch.sqrt(sum((g**2).sum() for g in grads if g is not None))
        assert norm == pytest.approx(float(expected), rel=1e-4) and norm > 0
    assert len({round(n, 6) for n in norms}) == 3  # three records, three norms


def test_under_a_fixed_sample_rate_the_warning_names_a_rate_that_quiets_the_site():
    from common.core.config import build_config
    from common.privacy.report import NOISE_NORM_TOO_LOUD

    cfg = build_config(
        {
            "federation": {"rounds": 10},
            "train": {"local_steps": 1, "batch_size": 64},
            "privacy": {"record": {"enabled": True, "target_epsilon": 8.0, "sample_rate": 0.1}},
        }
    )
    text = noise_outlook(cfg, {"a": 500}, 12_000)
    assert "WARNING: site a's noise per step" in text
    assert "`train.batch_size` =" not in text  # the batch size does not set the rate here
    rate = float(re.search(r"`privacy.record.sample_rate` = ([0-9.]+)", text).group(1))
    assert 0.1 < rate < 1
    rec = cfg.privacy.record.model_copy(update={"sample_rate": rate})
    trial = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"record": rec})})
    quiet = noise_outlook(trial, {"a": 500}, 12_000)
    norm = float(re.search(r"site a: .*, ([0-9.]+) C in norm", quiet).group(1))
    assert norm <= NOISE_NORM_TOO_LOUD and "WARNING" not in quiet
    # a site too small for any rate is told so
    tiny = noise_outlook(cfg, {"b": 20}, 12_000)
    assert "no `privacy.record.sample_rate` below 1" in tiny
