"""Privacy math: accountants, calibration, institution-level clipping and noise, ledger, report."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.core.config import build_config
from common.core.errors import ConfigError, PrivacyError
from common.privacy.accounting import (
    GaussianAccountant,
    InstitutionAccountant,
    add_server_noise,
    calibrate_noise,
    clip_update,
    decline_reason,
    default_delta,
    institution_epsilon_planned,
    record_plan,
)
from common.privacy.discrete_gaussian import SecureRandom
from common.privacy.report import PrivacyLedger, PrivacySummary, noise_outlook, plan, report_text

SIGMA, Q, STEPS, DELTA = 1.1, 0.05, 20, 1e-5


def _rounds(acc: GaussianAccountant, rounds: int) -> list[float]:
    eps = []
    for _ in range(rounds):
        acc.step(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
        eps.append(acc.epsilon(DELTA))
    return eps


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_grows_monotonically_over_rounds(mechanism: str) -> None:
    eps = _rounds(GaussianAccountant(mechanism), 4)  # type: ignore[arg-type]
    assert eps[0] > 0
    assert all(b > a for a, b in itertools.pairwise(eps))


@pytest.mark.parametrize(("mechanism", "cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_matches_opacus_accountant_stepped_one_by_one(mechanism: str, cls: type) -> None:
    ours = GaussianAccountant(mechanism)  # type: ignore[arg-type]
    _rounds(ours, 3)
    theirs = cls()
    for _ in range(3 * STEPS):  # what DPOptimizer's step hook does, one call per step
        theirs.step(noise_multiplier=SIGMA, sample_rate=Q)
    assert ours.epsilon(DELTA) == pytest.approx(theirs.get_epsilon(delta=DELTA), rel=1e-9)


def test_state_round_trips_and_a_restarted_site_continues() -> None:
    site = GaussianAccountant("rdp")
    _rounds(site, 2)
    saved = site.to_bytes()
    assert json.loads(json.dumps(site.state_dict())) == site.state_dict()  # JSON-able
    restarted = GaussianAccountant.from_bytes(saved)  # e.g. a new ClientApp process
    assert restarted.epsilon(DELTA) == site.epsilon(DELTA)
    _rounds(restarted, 1)
    uninterrupted = GaussianAccountant("rdp")
    _rounds(uninterrupted, 3)
    assert restarted.epsilon(DELTA) == pytest.approx(uninterrupted.epsilon(DELTA), rel=1e-12)
    assert restarted.steps == 3 * STEPS


def test_state_of_other_mechanism_is_refused() -> None:
    with pytest.raises(PrivacyError, match="rdp"):
        GaussianAccountant("prv").load_state_dict(GaussianAccountant("rdp").state_dict())


def test_no_noise_means_infinite_epsilon() -> None:
    acc = GaussianAccountant()
    acc.step(noise_multiplier=0.0, sample_rate=Q)
    assert math.isinf(acc.epsilon(DELTA))


def test_would_exceed_declines_past_budget() -> None:
    acc = GaussianAccountant()
    _rounds(acc, 1)
    spent = acc.epsilon(DELTA)
    args = {"steps": STEPS, "sample_rate": Q, "noise_multiplier": SIGMA, "delta": DELTA}
    assert acc.would_exceed(spent * 1.01, **args)
    assert not acc.would_exceed(spent * 3, **args)
    assert acc.epsilon(DELTA) == spent  # asking does not spend


def test_site_with_tiny_budget_declines_with_message() -> None:
    cfg = build_config(
        {"privacy": {"record": {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 0.05}}}
    )
    p = record_plan(cfg, 200)
    reason = decline_reason(GaussianAccountant(), p, cfg.privacy.record.budget_epsilon)
    assert reason is not None and "declining" in reason and "0.050" in reason
    assert decline_reason(GaussianAccountant(), p, 1e6) is None
    assert decline_reason(GaussianAccountant(), p, None) is None


def test_calibrated_noise_meets_target() -> None:
    sigma = calibrate_noise(target_epsilon=4.0, delta=DELTA, sample_rate=Q, steps=300)
    acc = GaussianAccountant()
    eps = acc.projected_epsilon(steps=300, sample_rate=Q, noise_multiplier=sigma, delta=DELTA)
    assert 3.95 <= eps <= 4.0


def test_record_plan_with_target_epsilon_spends_at_most_target() -> None:
    cfg = build_config(
        {
            "federation": {"rounds": 5},
            "train": {"local_steps": 4, "batch_size": 4, "grad_accum": 2},
            "privacy": {"record": {"enabled": True, "target_epsilon": 3.0}},
        }
    )
    p = record_plan(cfg, 400)
    # `batch_size` is the records per step with or without DP; `grad_accum` only splits it.
    assert p.sample_rate == 4 / 400 and p.expected_batch_size == 4
    assert p.delta == default_delta(400) and p.delta < 1 / 400
    assert 2.9 <= p.epsilon <= 3.0


def test_record_plan_with_a_sample_rate_samples_alike_and_divides_by_the_public_batch() -> None:
    """`privacy.record.sample_rate`: every site samples at that rate and divides each noisy sum
    by `train.batch_size`, so a larger site's update is larger, as records weighting would make
    it, and no site's count enters anything it sends. Its epsilon is Opacus' RDP of the plan."""
    cfg = build_config(
        {
            "federation": {"rounds": 6},
            "train": {"local_steps": 2, "batch_size": 500},
            "privacy": {"record": {"enabled": True, "target_epsilon": 4.0, "sample_rate": 0.6}},
        }
    )
    small, large = record_plan(cfg, 300), record_plan(cfg, 3000)
    for p, n in ((small, 300), (large, 3000)):
        assert p.sample_rate == 0.6 and p.expected_batch_size == round(0.6 * n)
        assert p.step_divisor == 500 and p.normalizer == 500
        ref = RDPAccountant()
        ref.history = [(p.noise_multiplier, 0.6, 12)]
        assert ref.get_epsilon(p.delta) == pytest.approx(p.epsilon, rel=1e-9)
        assert 3.9 <= p.epsilon <= 4.0
    # a batch of 500 above the small site's 300 records is no error here: the rate is below 1
    # without it, the expected batch divides (the plan of every earlier version)
    plain = build_config({"train": {"batch_size": 50}, "privacy": {"enabled": True}})
    assert record_plan(plain, 300).step_divisor == 50 and record_plan(plain, 300).normalizer is None


@pytest.mark.parametrize("rate", [0.0, 1.0, 1.5])
def test_a_sample_rate_outside_zero_to_one_is_refused_by_name(rate: float) -> None:
    with pytest.raises(ConfigError, match=r"privacy\.record\.sample_rate"):
        build_config({"privacy": {"record": {"enabled": True, "sample_rate": rate}}})


def test_record_plan_refuses_batch_larger_than_site() -> None:
    cfg = build_config({"train": {"batch_size": 16}, "privacy": {"enabled": True}})
    with pytest.raises(PrivacyError, match=r"`train\.batch_size`"):
        record_plan(cfg, 10)


def test_clip_update_bounds_norm_and_reports_original() -> None:
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 1e3):
        vec = (rng.normal(size=1000) * scale).astype(np.float32)
        clipped, norm = clip_update(vec, 0.5)
        assert norm == pytest.approx(float(np.linalg.norm(vec.astype(np.float64))), rel=1e-6)
        assert np.linalg.norm(clipped) <= 0.5 * (1 + 1e-6)
        assert clipped.dtype == np.float32
        if norm <= 0.5:
            np.testing.assert_array_equal(clipped, vec)
        else:
            np.testing.assert_allclose(clipped * norm / 0.5, vec, rtol=1e-5)


def test_server_noise_has_configured_std() -> None:
    n, sigma, clip = 400_000, 0.8, 2.5
    noise = add_server_noise(
        np.zeros(n), noise_multiplier=sigma, clip_norm=clip, rng=SecureRandom(bytes(32))
    )
    # Sample std of n Gaussians has relative sd 1/sqrt(2n) ~ 0.0011: 2% is ~18 sd away.
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.02)
    assert abs(float(noise.mean())) < 6 * sigma * clip / math.sqrt(n)


def test_institution_accountant_claims_no_amplification_by_the_coordinators_sample() -> None:
    # The coordinator draws the sample and sees it: every round is a full Gaussian step (q = 1),
    # whatever `sites_per_round` is. banks.toml (4 of 5 sites, 4 rounds) was 9.59 at q = 0.8.
    tree = {
        "federation": {"sites_per_round": 4, "rounds": 4, "min_sites": 2},
        "privacy": {"institution": {"enabled": True, "noise_multiplier": 1.5}},
    }
    cfg = build_config(tree)
    inst = InstitutionAccountant(cfg.privacy.institution)
    eps = [inst.step_round() for _ in range(4)]
    ref = RDPAccountant()
    for _ in range(4):
        ref.step(noise_multiplier=1.5, sample_rate=1.0)
    assert eps[-1] == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    assert eps[0] < eps[1] < eps[2] < eps[3]
    subsampled = RDPAccountant()
    for _ in range(4):
        subsampled.step(noise_multiplier=1.5, sample_rate=0.8)
    assert eps[-1] > subsampled.get_epsilon(delta=1e-5)  # the old, amplified claim was lower
    assert institution_epsilon_planned(cfg, 5) == pytest.approx(eps[-1], rel=1e-9)
    assert inst.epsilon_with("prv") <= eps[-1] * 1.05  # PRV beside RDP: close, usually tighter


def test_plan_and_report_state_both_levels() -> None:
    cfg = build_config({"federation": {"weighting": "uniform"}, "privacy": {"enabled": True}})
    summary = plan(cfg, {"a": 400, "b": 900})
    assert summary.planned and set(summary.record_epsilon) == {"a", "b"}
    assert max(summary.record_epsilon.values()) <= 8.0
    assert summary.institution_epsilon is not None and summary.institution_epsilon > 0
    text = report_text(summary.to_dict())
    assert "Each record: (" in text and "Each institution's entire dataset: (" in text


def test_institution_dp_weights_sites_equally() -> None:
    # Left unset, weighting follows the privacy setting; set to records, it is refused.
    assert build_config({"privacy": {"enabled": True}}).site_weighting == "uniform"
    with pytest.raises(ConfigError, match=r"`federation\.weighting` must be `uniform`"):
        build_config({"privacy": {"enabled": True}, "federation": {"weighting": "records"}})
    cfg = build_config({"privacy": {"enabled": True}})
    cfg.federation.weighting = "records"  # assigned after validation: plan() still refuses
    with pytest.raises(PrivacyError, match=r"`federation\.weighting`"):
        plan(cfg, {"a": 400})


def test_ledger_round_trips_and_summarises() -> None:
    ledger = PrivacyLedger(institution_delta=1e-5)
    ledger.add(1, {"a": 0.5, "b": 0.7}, 0.2, record_delta={"a": 1e-5, "b": 1e-6})
    ledger.add(2, {"a": 0.9}, 0.3, declined=["b"])
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again == ledger
    s = again.summary()
    assert s == PrivacySummary(2, False, {"a": 0.9, "b": 0.7}, {"a": 1e-5, "b": 1e-6}, 0.3, 1e-5)
    text = report_text(s)
    assert "(0.90, 1.0e-05)-DP" in text and "(0.30, 1.0e-05)-DP" in text
    assert "no record-level DP" in report_text(PrivacySummary(1, False))


@pytest.mark.parametrize(
    ("tree", "field"),
    [
        (
            {"record": {"enabled": True, "noise_multiplier": -1.0}},
            "privacy.record.noise_multiplier",
        ),
        ({"institution": {"noise_multiplier": -0.5}}, "privacy.institution.noise_multiplier"),
        (
            {"record": {"enabled": True, "noise_multiplier": 1, "delta": 1.0}},
            "privacy.record.delta",
        ),
        ({"institution": {"delta": 1.5}}, "privacy.institution.delta"),
        ({"record": {"enabled": True}}, "`noise_multiplier` and `target_epsilon` (got neither)"),
        (
            {"record": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 2.0}},
            "`noise_multiplier` and `target_epsilon` (got both)",
        ),
        (
            {"record": {"enabled": True, "target_epsilon": 9.0, "budget_epsilon": 2.0}},
            "`target_epsilon` (9.0) exceeds `budget_epsilon`",
        ),
    ],
)
def test_invalid_privacy_configs_name_the_field(tree: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"privacy": tree})
    assert field in str(err.value)


def test_privacy_enabled_turns_on_both_levels_with_defaults() -> None:
    p = build_config({"privacy": {"enabled": True}}).privacy
    assert p.record.enabled and p.institution.enabled
    assert p.record.target_epsilon == 8.0 and p.record.noise_multiplier is None
    only_inst = build_config({"privacy": {"enabled": True, "record": {"enabled": False}}}).privacy
    assert not only_inst.record.enabled and only_inst.institution.enabled
    own_noise = build_config({"privacy": {"enabled": True, "record": {"noise_multiplier": 0.9}}})
    assert own_noise.privacy.record.target_epsilon is None


def test_noise_outlook_is_loudest_at_the_smallest_site() -> None:
    cfg = build_config(
        {
            "federation": {"rounds": 4},
            "train": {"local_steps": 8, "batch_size": 4},
            "privacy": {"record": {"enabled": True, "target_epsilon": 8.0}},
        }
    )
    text = noise_outlook(cfg, {"small": 18, "large": 124})
    noise = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"site (\w+): .* noise ([0-9.]+) C", text)
    }
    assert set(noise) == {"small", "large"}
    # sigma / B: the same batch, but the small site samples at a higher rate and needs more noise
    assert noise["small"] > noise["large"] > 0
    assert noise["small"] == pytest.approx(record_plan(cfg, 18).noise_multiplier / 4, abs=1e-3)
    off = build_config({"privacy": {"record": {"enabled": False}}})
    assert noise_outlook(off, {"a": 100}) == ""
