"""The distributed discrete Gaussian (common/privacy/ddg.py): its parameters, its encoding under
the real secure sum, and its bound recomputed independently."""

from __future__ import annotations

import dataclasses
import math
from decimal import Decimal, getcontext

import numpy as np
import pytest

from common.core.config import build_config
from common.core.errors import PrivacyError
from common.identity.certs import ephemeral_federation
from common.privacy.accounting import GaussianAccountant
from common.privacy.ddg import (
    MAX_INFLATION,
    DdgEncoding,
    DdgPlan,
    epsilon_from_rho,
    plan_ddg,
    plan_for,
    rotation_seed,
)
from common.privacy.discrete_gaussian import SecureRandom
from common.secagg import Credentials, Identity, SecAggParams, TrustAnchor
from common.secagg.simulate import simulate_round

Z, C, M = 1.2, 0.5, 3


def plan(dim: int = 20_000, bits: int = 32, sites: int = 4, z: float = Z) -> DdgPlan:
    return plan_ddg(noise_multiplier=z, clip_norm=C, min_sites=M, max_sites=sites, dim=dim,
                    modulus_bits=bits)  # fmt: skip


def unit_updates(n: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        v = rng.normal(size=dim)
        out.append(v / np.linalg.norm(v) * C * rng.uniform(0.5, 1.0))
    return out


def test_the_plan_carries_the_noise_the_config_asks_for_and_names_the_bits_it_needs() -> None:
    p = plan()
    cs = C * p.scale
    assert M * p.variance >= (Z * cs) ** 2  # any m shares: at least z C, in integer units
    assert cs <= p.sensitivity <= MAX_INFLATION * cs
    assert p.block & (p.block - 1) == 0 and p.padded >= p.dim and p.padded - p.dim < p.block
    assert 8 <= p.bits_needed <= 32
    assert plan(bits=p.bits_needed).bits_needed == p.bits_needed  # the figure is usable as is
    assert DdgPlan.from_dict(p.to_dict()) == p and len(p.digest()) == 64
    # 32 bits hold the sum of 4 sites even with a whole update in one coordinate: no rotation
    # needed (block 1, no padding); 16 bits do not: a rotation, padded to whole blocks
    assert (p.block, p.padded) == (1, p.dim)
    assert plan(bits=16).block == 32_768 and plan(bits=16).padded == 32_768
    # Too few bits for 2M coordinates: refused, naming the field and what would do.
    with pytest.raises(
        PrivacyError, match=r"`secagg.modulus_bits` = 12 .* use at least (\d+)"
    ) as e:
        plan(dim=2_000_000, bits=12)
    need = int(str(e.value).rsplit(" ", 1)[1])
    assert plan(dim=2_000_000, bits=need).bits_needed == need


def test_rotation_is_orthogonal_and_inverted_exactly() -> None:
    p = plan(dim=5000, bits=16)
    assert p.block > 1
    enc = DdgEncoding(p, rotation_seed("run", 3))
    x = unit_updates(1, 5000)[0]
    y = enc.rotate(x)
    assert y.shape == (p.padded,)
    assert float(np.linalg.norm(y)) == pytest.approx(float(np.linalg.norm(x)), rel=1e-12)
    np.testing.assert_allclose(enc.unrotate(y), x, atol=1e-12)
    # every party derives the same rotation from public values; another round another one
    assert np.array_equal(DdgEncoding(p, rotation_seed("run", 3)).signs, enc.signs)
    assert not np.array_equal(DdgEncoding(p, rotation_seed("run", 4)).signs, enc.signs)


def _credentials(sites: list[int]) -> dict[int, Credentials]:
    fed = ephemeral_federation([f"site-{s}" for s in sites])
    anchor = TrustAnchor.from_pem(fed.ca_cert)
    return {s: Credentials(Identity.from_pem(*fed.identities[f"site-{s}"]), anchor) for s in sites}


@pytest.mark.parametrize("bits", [32, 16])  # without and with the rotation
def test_a_secure_round_is_the_plain_sum_plus_noise_of_the_stated_variance(bits: int) -> None:
    """Four sites encode under one plan, the real SecAgg protocol sums them (one site drops out
    after advertising its keys: three contribute), the coordinator tops the sum up to
    four shares and decodes: the error is the noise of four shares, unbiased."""
    dim, sites = 40_000, [0, 1, 2, 3]
    p = plan(dim=dim, bits=bits)
    assert (p.block > 1) == (bits < 32)
    updates = unit_updates(4, dim, seed=1)
    enc = DdgEncoding(p, rotation_seed("simulated run", 0))
    encoded = {s: enc.encode(u) for s, u in zip(sites, updates, strict=True)}
    params = SecAggParams(threshold=3, modulus_bits=bits, encoding=p.digest())
    result = simulate_round(encoded, params, _credentials(sites), drop_after_stage={3: 1})
    assert result.contributors == [0, 1, 2]
    total = enc.decode_sum(result.total, top_up=1)
    error = total - sum(updates[:3])
    std = math.sqrt(4 * p.variance) / p.scale  # four shares (three sites, one top-up)
    assert std == pytest.approx(Z * C * math.sqrt(4 / M), rel=1e-6)
    # sample variance of 40k draws: relative sd sqrt(2/40k) = 0.7 %; 4 % is > 5 sd
    assert float(error.std()) == pytest.approx(std, rel=0.04)
    assert abs(float(error.mean())) < 5 * std / math.sqrt(dim)
    # without the top-up (a coordinator that skips it): three shares, never fewer than m
    bare = enc.decode_sum(result.total) - sum(updates[:3])
    assert float(bare.std()) == pytest.approx(math.sqrt(3 * p.variance) / p.scale, rel=0.04)


def test_encoding_holds_negative_sums_and_refuses_what_is_not_clipped() -> None:
    p = plan(dim=1000, bits=20)
    enc = DdgEncoding(p, rotation_seed("r", 1))
    x = -np.full(1000, C / math.sqrt(1000))  # norm C, every coordinate negative
    total = sum(enc.encode(x).astype(np.int64) for _ in range(3)) % (1 << 20)
    decoded = enc.decode_sum(total.astype(np.uint32))
    assert float(np.mean(decoded)) == pytest.approx(3 * x[0], abs=6 * Z * C / math.sqrt(1000))
    with pytest.raises(PrivacyError, match="exceeds the clip bound"):
        enc.encode(x * 1.2, SecureRandom(bytes(32)))
    with pytest.raises(PrivacyError, match="shape"):
        enc.encode(np.zeros(999))


def _independent_rho(sensitivity: float, variance: int, n: int, dim: int) -> Decimal:
    """Kairouz et al. 2021, Theorem 1, in 50-digit decimals, written out again from the paper."""
    getcontext().prec = 50
    s2, d = Decimal(variance), Decimal(dim)
    pi2 = Decimal(math.pi) ** 2
    tau = 10 * sum((-(2 * pi2 * s2 * k / (k + 1))).exp() for k in range(1, n))
    delta = Decimal(sensitivity)
    first = (delta**2 / (n * s2) + tau * d / 2).sqrt()
    second = delta / (Decimal(n) * s2).sqrt() + tau * d.sqrt()
    return min(first, second) ** 2 / 2


@pytest.mark.parametrize("bits", [32, 14])
def test_the_epsilon_matches_an_independent_computation_of_the_bound(bits: int) -> None:
    p = plan(dim=20_000, bits=bits)
    rho = p.round_rho()
    assert rho == pytest.approx(float(_independent_rho(p.sensitivity, p.variance, M, p.padded)),
                                rel=1e-9)  # fmt: skip
    rounds, delta = 10, 1e-5
    eps = epsilon_from_rho(rounds * rho, delta)
    # the classic zCDP conversion (Bun & Steinke 2016, Prop. 1.3) is looser, never tighter
    classic = rounds * rho + 2 * math.sqrt(rounds * rho * math.log(1 / delta))
    assert eps <= classic and eps >= 0.8 * classic
    # against a continuous Gaussian of the same planned z: the discrete one costs a little more
    # (rounding raises the sensitivity), within the inflation the plan allows
    gauss = GaussianAccountant("rdp").projected_epsilon(
        steps=rounds, sample_rate=1.0, noise_multiplier=Z, delta=delta
    )
    assert gauss <= eps <= gauss * MAX_INFLATION * 1.02
    # replace-one (against the coordinator) moves the sum by 2 Delta: rho four times larger
    assert p.round_rho(replace_one=True) == pytest.approx(4 * rho, rel=1e-9)


def test_a_site_refuses_a_plan_that_weakens_its_protection() -> None:
    tree = {
        "federation": {"min_sites": M},
        "privacy": {"institution": {"enabled": True, "noise_multiplier": Z, "clip_norm": C}},
        "secagg": {"enabled": True},
    }
    cfg = build_config(tree)
    honest = plan_for(cfg, 20_000, 4)
    assert honest.refusal(cfg, 20_000, honest.digest()) is None
    quieter = dataclasses.replace(honest, variance=honest.variance // 4)
    assert "noise is below" in str(quieter.refusal(cfg, 20_000, quieter.digest()))
    looser = dataclasses.replace(honest, sensitivity=honest.sensitivity * 2)
    assert "rounding bound" in str(looser.refusal(cfg, 20_000, looser.digest()))
    fewer = dataclasses.replace(honest, min_sites=1)
    assert "min_sites" in str(fewer.refusal(cfg, 20_000, fewer.digest()))
    assert "signed parameters" in str(honest.refusal(cfg, 20_000, quieter.digest()))
    assert "coordinates" in str(honest.refusal(cfg, 19_999, honest.digest()))
