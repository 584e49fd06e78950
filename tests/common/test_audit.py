"""The audit's statistics on hand-checked cases: AUC, TPR at low FPR, exposure, the one-run
bound (Steinke, Nasr, Jagielski 2023) and which claim a run makes."""

import math

import numpy as np
import pytest
from scipy import stats

from common.privacy import audit


def test_auc_counts_pairs_and_ties_half():
    # members 1, 3 vs non-members 2, 0: pairs (1>2 no, 1>0 yes, 3>2 yes, 3>0 yes) = 3/4
    assert audit.auc([1, 3], [2, 0]) == 0.75
    assert audit.auc([1, 1], [1, 1]) == 0.5
    assert audit.auc([5, 6], [1, 2]) == 1.0
    assert audit.auc([0], [1]) == 0.0
    with pytest.raises(ValueError):
        audit.auc([], [1])


def test_tpr_at_fpr_keeps_the_false_positives_under_the_rate():
    nonmembers = list(range(100))  # 0..99: at 1% FPR one non-member (99) may pass
    assert audit.tpr_at_fpr([97.5, 98.5, 200], nonmembers, 0.01) == pytest.approx(2 / 3)
    assert audit.tpr_at_fpr([50, 60], nonmembers, 0.01) == 0.0
    assert audit.tpr_at_fpr([50, 60], nonmembers, 0.5) == 1.0  # threshold 49


def test_exposure_is_log_candidates_minus_log_rank():
    assert audit.exposure(10.0, [1, 2, 3]) == 2.0  # first of 4: log2 4 - log2 1
    assert audit.exposure(0.0, [1, 2, 3]) == 0.0  # last of 4
    assert audit.exposure(2.0, [1, 2, 3]) == pytest.approx(2 - math.log2(3))  # ties rank against


def test_p_value_is_the_binomial_tail_without_delta_and_grows_with_it():
    q = 1 / (1 + math.exp(-1.0))
    assert audit.p_value(100, 20, 15, 1.0, 0.0) == pytest.approx(stats.binom.sf(14, 20, q))
    assert audit.p_value(100, 20, 15, 1.0, 1e-3) > audit.p_value(100, 20, 15, 1.0, 0.0)
    with pytest.raises(ValueError):
        audit.p_value(10, 5, 6, 1.0, 0.0)


def test_the_bound_is_the_largest_refuted_epsilon():
    bound = audit.epsilon_lower_bound(1000, 100, 100, 0.0, 0.05)
    q = 1 / (1 + math.exp(-bound))
    assert q**100 == pytest.approx(0.05, rel=1e-4)  # all 100 right: P = q^100 at the bound
    assert audit.epsilon_lower_bound(1000, 100, 50, 0.0, 0.05) == 0.0  # a coin's score
    assert audit.epsilon_lower_bound(1000, 100, 90, 1e-5, 0.05) < bound


def test_one_run_audit_separates_perfect_from_chance():
    rng = np.random.default_rng(0)
    included = rng.random(200) < 0.5
    perfect = audit.one_run_audit(included + rng.normal(0, 0.01, 200), included, 1e-5)
    assert perfect.correct == perfect.guesses and perfect.epsilon_lower_bound > 2.5
    chance = audit.one_run_audit(rng.normal(0, 1, 200), included, 1e-5)
    assert chance.epsilon_lower_bound == 0.0
    assert perfect.guess_counts_tried == [4, 10, 20, 40, 60]  # fixed before the scores


def test_the_claim_is_the_smaller_of_the_weakest_site_and_the_institution_level():
    assert audit.claimed_epsilon(None) is None and audit.claimed_epsilon({}) is None
    privacy = {"record_epsilon": {"a": 2.0, "b": 3.0}, "record_delta": {"a": 1e-5, "b": 1e-6}}
    claim = audit.claimed_epsilon(privacy)
    assert claim["epsilon"] == 3.0 and claim["delta"] == 1e-6 and "b" in claim["from"]
    both = audit.claimed_epsilon({**privacy, "institution_epsilon": 1.5, "institution_delta": 1e-5})
    assert both["epsilon"] == 1.5 and "institution" in both["from"]
