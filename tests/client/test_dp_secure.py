"""DP-SGD's randomness comes from the CSPRNG: noise (Opacus secure_mode recipe) and sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from scipy import stats

from client.dp import DPTrainer, secure_gaussian, secure_optimizer_class
from common.privacy.accounting import GaussianAccountant
from common.privacy.discrete_gaussian import SecureRandom
from tests.client.test_dp import collate, dp_cfg, plan, records, sgd, tiny_lora


def test_secure_random_is_uniform_normal_and_unpredictable_across_instances() -> None:
    rng = SecureRandom()
    u = rng.uniform(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    z = rng.normal(200_001)
    assert z.shape == (200_001,) and stats.kstest(z, "norm").pvalue > 1e-4
    assert not np.array_equal(SecureRandom().words(4), SecureRandom().words(4))
    same = SecureRandom(bytes(32)).words(4), SecureRandom(bytes(32)).words(4)  # tests only
    assert np.array_equal(*same)


def test_secure_gaussian_has_the_std_it_is_asked_for() -> None:
    ref = torch.zeros(50_000, dtype=torch.float32)
    noise = secure_gaussian(0.3, ref, SecureRandom())
    assert noise.dtype == torch.float32 and noise.shape == ref.shape
    assert stats.kstest(noise.numpy() / 0.3, "norm").pvalue > 1e-4
    assert torch.equal(secure_gaussian(0.0, ref, SecureRandom()), ref)


def test_the_optimizers_noise_is_the_csprngs_and_has_the_planned_std() -> None:
    param = torch.nn.Parameter(torch.zeros(40_000))
    cls = secure_optimizer_class(DPOptimizer)
    opt = cls(torch.optim.SGD([param], lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5,
              expected_batch_size=1)  # fmt: skip
    opt.secure_rng = SecureRandom()
    param.summed_grad = torch.zeros(40_000)
    opt.add_noise()
    assert param.grad is not None
    assert stats.kstest(param.grad.numpy() / 1.0, "norm").pvalue > 1e-4  # std = 2 * 0.5


def test_dp_steps_never_draw_from_torchs_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a privacy draw came from torch's (Mersenne Twister) generator")

    model = tiny_lora()
    with DPTrainer(model, sgd(model), dp_cfg("hooks", 1.0), plan(1.0, 1.0, 8),
                   GaussianAccountant(), physical_batch_size=4) as dp:  # fmt: skip
        monkeypatch.setattr(torch, "normal", refuse)
        monkeypatch.setattr(torch, "rand", refuse)
        monkeypatch.setattr(torch, "randn", refuse)
        dp.step(records(), collate)
        dp.step_on([], collate)  # noise-only step


def test_poisson_sampling_draws_each_record_at_the_sample_rate() -> None:
    model = tiny_lora()
    with DPTrainer(model, sgd(model), dp_cfg("hooks", 1.0), plan(1.0, 1.0, 8),
                   GaussianAccountant(), physical_batch_size=4) as dp:  # fmt: skip
        counts = np.zeros(4000)
        draws = 50
        for _ in range(draws):
            counts[dp.sample(4000)] += 1
    q = dp.plan.sample_rate
    assert abs(counts.mean() / draws - q) < 0.01
