"""Server optimizers (Reddi et al. 2021, Algorithm 2): each step equals a numpy reference written
from the paper's formulas, state survives a round trip, and a resume missing state is refused."""

import numpy as np
import pytest
from pydantic import ValidationError

from common.core.config import FederationConfig
from common.core.errors import FedtuneError
from common.protocol.server_optimizer import ServerOptimizer


def _rounds(seed: int = 0, n: int = 4):
    rng = np.random.default_rng(seed)
    x0 = {
        "a": rng.normal(size=(3, 2)).astype(np.float32),
        "b": rng.normal(size=5).astype(np.float32),
    }
    deltas = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in x0.items()} for _ in range(n)
    ]
    return x0, deltas


def _reference(kind: str, x0, deltas, lr=0.1, mom=0.9, b1=0.9, b2=0.99, tau=1e-3):
    x = {k: v.astype(np.float64) for k, v in x0.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(u) for k, u in x.items()}
    for d in deltas:
        for k in x:
            g = d[k].astype(np.float64)
            if kind == "fedavg":
                x[k] = x[k] + lr * g
            elif kind == "fedavgm":
                m[k] = mom * m[k] + g
                x[k] = x[k] + lr * m[k]
            else:
                m[k] = b1 * m[k] + (1 - b1) * g
                if kind == "fedadam":
                    v[k] = b2 * v[k] + (1 - b2) * g**2
                else:
                    v[k] = v[k] - (1 - b2) * g**2 * np.sign(v[k] - g**2)
                x[k] = x[k] + lr * m[k] / (np.sqrt(v[k]) + tau)
    return x


@pytest.mark.parametrize("kind", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_steps_equal_the_papers_formulas(kind):
    x0, deltas = _rounds()
    opt = ServerOptimizer(FederationConfig(server_optimizer=kind, server_lr=0.1))
    x = x0
    for d in deltas:
        x = opt.step(x, d)
        assert all(v.dtype == np.float32 for v in x.values())
    ref = _reference(kind, x0, deltas)
    for k in ref:
        np.testing.assert_allclose(x[k], ref[k], rtol=1e-6, atol=1e-6)
    assert opt.steps == len(deltas)


def test_adaptive_rules_differ_from_fedavg_and_from_each_other():
    x0, deltas = _rounds(1)
    outs = {}
    for kind in ("fedavg", "fedavgm", "fedadam", "fedyogi"):
        opt = ServerOptimizer(FederationConfig(server_optimizer=kind, server_lr=0.1))
        x = x0
        for d in deltas:
            x = opt.step(x, d)
        outs[kind] = np.concatenate([v.ravel() for v in x.values()])
    kinds = list(outs)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            assert np.abs(outs[a] - outs[b]).max() > 1e-3, (a, b)


def test_state_round_trip_continues_exactly():
    x0, deltas = _rounds(2)
    cfg = FederationConfig(server_optimizer="fedyogi", server_lr=0.05)
    straight = ServerOptimizer(cfg)
    x = x0
    for d in deltas:
        x = straight.step(x, d)
    first = ServerOptimizer(cfg)
    y = x0
    for d in deltas[:2]:
        y = first.step(y, d)
    second = ServerOptimizer(cfg)
    second.load_arrays(first.arrays(), first.steps, list(x0))
    for d in deltas[2:]:
        y = second.step(y, d)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert second.steps == straight.steps


def test_resume_without_the_state_is_refused():
    cfg = FederationConfig(server_optimizer="fedadam")
    opt = ServerOptimizer(cfg)
    x0, deltas = _rounds()
    opt.step(x0, deltas[0])
    partial = {n: a for n, a in opt.arrays().items() if not n.startswith("v/")}
    with pytest.raises(FedtuneError, match="`fedadam` state lacks"):
        ServerOptimizer(cfg).load_arrays(partial, 1, list(x0))


def test_betas_out_of_range_name_the_field():
    with pytest.raises(ValidationError, match="server_betas"):
        FederationConfig(server_betas=(0.9, 1.0))


def test_a_stateful_rule_without_the_runs_optimizer_is_refused():
    from common.core.config import Config
    from common.core.errors import RoundError
    from common.protocol.aggregate import RoundSum, SiteReport, apply_sum

    x0, deltas = _rounds()
    flat = np.concatenate([d.ravel() for d in deltas[0].values()]).astype(np.float64)
    summed = RoundSum(flat, 1.0, [SiteReport("s", 1, {})])
    cfg = Config(federation=FederationConfig(server_optimizer="fedadam"))
    with pytest.raises(RoundError, match="keeps state across rounds"):
        apply_sum(cfg, x0, summed, expected=1)
    stepped = apply_sum(cfg, x0, summed, expected=1, optimizer=ServerOptimizer(cfg.federation))
    assert set(stepped) == set(x0)


@pytest.mark.parametrize(
    ("schedule", "factors"),
    [
        ("constant", [1.0, 1.0, 1.0, 1.0]),
        ("linear", [1.0, 0.75, 0.5, 0.25]),
        ("cosine", [1.0, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2]),
    ],
)
def test_a_server_schedule_scales_each_step_and_survives_a_resume(schedule, factors):
    x0, deltas = _rounds(3)
    cfg = FederationConfig(server_optimizer="fedavg", server_lr=0.1, server_schedule=schedule,
                           rounds=4)  # fmt: skip
    x = {k: v.astype(np.float64) for k, v in x0.items()}
    for f, d in zip(factors, deltas, strict=True):  # fedavg: x += lr_s * delta, by hand
        x = {k: x[k] + 0.1 * f * d[k].astype(np.float64) for k in x}
    first = ServerOptimizer(cfg)
    y = x0
    for d in deltas[:2]:
        y = first.step(y, d)
    second = ServerOptimizer(cfg)  # a resumed run: the step count restored, as run.py does
    second.steps = first.steps
    for d in deltas[2:]:
        y = second.step(y, d)
    for k in x:
        np.testing.assert_allclose(y[k], x[k], rtol=1e-6, atol=1e-6)
    assert second.lr == pytest.approx(0.1 * factors[-1])


def test_an_adaptive_rule_under_a_decaying_schedule_steps_less_each_round():
    x0, deltas = _rounds(4, n=6)
    same = [deltas[0]] * 6  # the same average every round: only the schedule changes the step
    opt = ServerOptimizer(FederationConfig(server_optimizer="fedadam", server_lr=0.1,
                                           server_schedule="linear", rounds=6))  # fmt: skip
    sizes, x = [], x0
    for d in same:
        y = opt.step(x, d)
        sizes.append(max(np.abs(y[k] - x[k]).max() for k in x))
        x = y
    assert sizes[-1] < sizes[0] / 2
    assert opt.lr == pytest.approx(0.1 / 6)
