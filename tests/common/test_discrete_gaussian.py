"""The exact discrete Gaussian (Canonne, Kamath, Steinke 2020): distribution, tails, speed."""

from __future__ import annotations

import hashlib
import math
import time
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from common.core.errors import PrivacyError
from common.privacy import discrete_gaussian as dg
from common.privacy.discrete_gaussian import (
    DiscreteGaussian,
    SecureRandom,
    bernoulli_exp,
    discrete_gaussian_variance,
)

P_MIN = 1e-4  # each goodness-of-fit test fails an exact sampler this rarely


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> SecureRandom:
    """The same CSPRNG, keyed by the test's own name: a statistical test that passes once passes
    every run (unkeyed, the file's dozen tests at P_MIN would fail about one run in a thousand)."""
    return SecureRandom(hashlib.sha256(request.node.nodeid.encode()).digest())


def pmf(s2: float, reach: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(-reach, reach + 1)
    w = np.exp(-(x.astype(np.float64) ** 2) / (2 * s2))
    z = np.exp(-(np.arange(-50 * reach, 50 * reach + 1) ** 2) / (2 * s2)).sum()
    return x, w / z


def chi_square(samples: np.ndarray, s2: float) -> float:
    """p-value of the samples against N_Z(0, s2), bins with >= 5 expected, both tails pooled."""
    n = samples.size
    reach = int(12 * math.sqrt(s2)) + 12
    x, p = pmf(s2, reach)
    keep = p * n >= 5
    lo, hi = x[keep].min(), x[keep].max()
    inside = (x >= lo) & (x <= hi)
    observed = [np.count_nonzero(samples == v) for v in x[inside]]
    observed += [np.count_nonzero(samples < lo), np.count_nonzero(samples > hi)]
    tail = (1 - p[inside].sum()) / 2
    expected = np.concatenate([p[inside], [tail, tail]]) * n
    observed_arr, expected = np.array(observed, dtype=np.float64), expected
    if expected[-1] < 5:  # tails too thin to test alone: merge them into the end bins
        observed_arr[0] += observed_arr[-2]
        observed_arr[-3] += observed_arr[-1]
        expected[0] += expected[-2]
        expected[-3] += expected[-1]
        observed_arr, expected = observed_arr[:-2], expected[:-2]
    expected *= observed_arr.sum() / expected.sum()
    return float(stats.chisquare(observed_arr, expected).pvalue)


@pytest.mark.parametrize("s2", [Fraction(1, 4), 2, Fraction(7, 3), 50, 900])
def test_samples_follow_the_pmf(s2: Fraction | int, rng: SecureRandom) -> None:
    samples = DiscreteGaussian(s2, rng).sample(120_000)
    assert samples.dtype == np.int64
    assert chi_square(samples, float(s2)) > P_MIN


def test_the_scalar_reference_follows_the_pmf_and_agrees_with_the_vectorised_sampler(
    rng: SecureRandom,
) -> None:
    g = DiscreteGaussian(Fraction(9, 2), rng)
    reference, vectorised = g.sample_reference(4000), g.sample(40_000)
    assert chi_square(reference, 4.5) > P_MIN
    assert stats.ks_2samp(reference, vectorised).pvalue > P_MIN


def test_the_far_tail_path_in_python_integers_is_exact_too(
    monkeypatch: pytest.MonkeyPatch, rng: SecureRandom
) -> None:
    g = DiscreteGaussian(16, rng)
    monkeypatch.setattr(g, "_y_max", 3)  # send every |Y| > 3 through the exact scalar path
    assert chi_square(g.sample(30_000), 16.0) > P_MIN


@pytest.mark.parametrize("gamma", [Fraction(0), Fraction(1, 3), Fraction(1), Fraction(5, 2), 7])
def test_bernoulli_exp_has_probability_exp_minus_gamma(
    gamma: Fraction | int, rng: SecureRandom
) -> None:
    gamma = Fraction(gamma)
    n = 200_000
    num = np.full(n, gamma.numerator, dtype=np.int64)
    hits = int(bernoulli_exp(rng, num, gamma.denominator).sum())
    assert stats.binomtest(hits, n, math.exp(-gamma)).pvalue > P_MIN


def test_discrete_laplace_follows_its_pmf(rng: SecureRandom) -> None:
    t, n = 3, 100_000
    samples = dg._laplace(rng, t, n)
    x = np.arange(-25, 26)
    p = np.exp(-np.abs(x) / t) * (1 - math.exp(-1 / t)) / (1 + math.exp(-1 / t))
    observed = np.array([np.count_nonzero(samples == v) for v in x], dtype=np.float64)
    observed = np.append(observed, n - observed.sum())
    expected = np.append(p, 1 - p.sum()) * n
    assert stats.chisquare(observed, expected).pvalue > P_MIN


@pytest.mark.parametrize("k", [2, 3, 4])
def test_tails_beyond_k_sigma_have_the_exact_probability(k: int, rng: SecureRandom) -> None:
    s2, n = 100, 400_000
    samples = DiscreteGaussian(s2, rng).sample(n)
    x, p = pmf(s2, 400)
    want = float(p[np.abs(x) >= k * 10].sum())
    got = int(np.count_nonzero(np.abs(samples) >= k * 10))
    assert stats.binomtest(got, n, want).pvalue > P_MIN
    assert np.abs(samples).max() < 10 * 10  # P(|X| >= 10 sigma) ~ 1e-22 per draw


def test_the_sum_of_n_sites_noise_has_the_variance_the_accountant_assumes(
    rng: SecureRandom,
) -> None:
    # Distributed DP (Kairouz, Liu, Steinke 2021): n sites each add N_Z(0, s2); the accountant
    # charges the sum as n independent discrete Gaussians, of variance n Var[N_Z(0, s2)] <= n s2.
    n_sites, s2, coords = 8, 9, 200_000
    total = sum(DiscreteGaussian(s2, rng).sample(coords) for _ in range(n_sites))
    var = n_sites * discrete_gaussian_variance(s2)
    assert var <= n_sites * s2 * (1 + 1e-12)
    assert abs(var - n_sites * s2) / (n_sites * s2) < 1e-6  # s2 = 9: the sum is ~ N_Z(0, 72)
    # chi-square test of the sample variance: (N - 1) S^2 / var ~ chi2(N - 1) (near-normal sum)
    stat = (coords - 1) * total.var(ddof=1) / var
    assert stats.chi2.sf(stat, coords - 1) > P_MIN and stats.chi2.cdf(stat, coords - 1) > P_MIN
    assert abs(total.mean()) < 6 * math.sqrt(var / coords)


def test_two_million_coordinates_in_seconds() -> None:
    start = time.process_time()
    samples = DiscreteGaussian(400).sample(2_000_000)
    seconds = time.process_time() - start
    print(f"\n2M discrete Gaussian draws (sigma = 20): {seconds:.2f} s CPU")
    assert samples.shape == (2_000_000,) and seconds < 60
    assert abs(samples.var() / discrete_gaussian_variance(400) - 1) < 0.01


def test_variances_that_are_not_positive_or_too_large_are_refused() -> None:
    with pytest.raises(PrivacyError, match="> 0"):
        DiscreteGaussian(0)
    with pytest.raises(PrivacyError, match="too large"):
        DiscreteGaussian(Fraction(10**12, 7))
