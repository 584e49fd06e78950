"""DP-SGD on a tiny peft LoRA llama: #820 guard, clipping, accumulation, accounting, and DP as
a step of the one training loop (same optimizer, schedule and weight decay as plain training)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from client.dp import DPStepper, DPTrainer, check_wiring, per_record_loss
from client.train import train_round
from common.core.config import RecordDPConfig, TrainConfig
from common.core.errors import ModelError, PrivacyError
from common.core.tasks import Encoded
from common.privacy.accounting import GaussianAccountant, RecordPlan

N, T, VOCAB, LR = 32, 12, 128, 0.5
MODES = ["hooks", "ghost"]


def tiny_lora() -> nn.Module:
    """A fresh copy of one seeded model (building it is the slow part)."""
    return copy.deepcopy(_tiny_lora())


@functools.cache
def _tiny_lora() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, vocab_size=VOCAB,
    )  # fmt: skip
    # init_lora_weights=False: B is random too, so A gets non-zero gradients on the first step.
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(cfg), lora)


def records() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(N):
        ids = torch.randint(0, VOCAB, (T,), generator=gen)
        labels = ids.clone()
        labels[: T // 3] = -100  # prompt tokens are not trained on
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(batch: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([r[k] for r in batch]) for k in batch[0]}


def plan(noise: float, clip: float, batch: int) -> RecordPlan:
    return RecordPlan(N, batch / N, batch, 1, 1, noise, clip, 1e-5, 0.0)


def dp_cfg(mode: str, clip: float) -> RecordDPConfig:
    return RecordDPConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=clip,
                          grad_sample_mode=mode)  # type: ignore[arg-type]  # fmt: skip


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


def dp_step(model: nn.Module, mode: str, chosen: list, *, noise: float, clip: float,
            physical: int, acc: GaussianAccountant | None = None) -> None:  # fmt: skip
    p = plan(noise, clip, len(chosen) or 1)
    cfg = dp_cfg(mode, clip)
    with DPTrainer(model, sgd(model), cfg, p, acc or GaussianAccountant(),
                   physical_batch_size=physical, seed=0) as dp:  # fmt: skip
        dp.step_on(chosen, collate)


def plain_step(model: nn.Module, chosen: list) -> None:
    opt = sgd(model)
    batch = collate(chosen)
    per_record_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).mean().backward()
    opt.step()


def params(model: nn.Module, lora: bool) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ("lora_" in n) == lora}


@pytest.mark.parametrize("mode", MODES)
def test_dp_step_without_noise_equals_plain_step_issue_820(mode: str) -> None:
    """Opacus #820 guard: noise 0 and a huge clip bound make DP-SGD plain SGD, also when the
    logical batch of 8 is split into physical batches of 3, 3 and 2."""
    dp_model, ref_model = tiny_lora(), tiny_lora()
    start, frozen = params(dp_model, True), params(dp_model, False)
    chosen = records()[:8]
    dp_step(dp_model, mode, chosen, noise=0.0, clip=1e6, physical=3)
    plain_step(ref_model, chosen)
    got, want = params(dp_model, True), params(ref_model, True)
    assert any(not torch.equal(got[k], start[k]) for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    for k, v in params(dp_model, False).items():
        assert torch.equal(v, frozen[k]), k
    # the adapter read from the original peft model is the trained one
    adapter = get_peft_model_state_dict(dp_model)
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())


@pytest.mark.parametrize("mode", MODES)
def test_noisy_step_moves_lora_weights_keeps_them_finite_and_frozen_fixed(mode: str) -> None:
    model = tiny_lora()
    start, frozen = params(model, True), params(model, False)
    dp_step(model, mode, records()[:4], noise=1.0, clip=1.0, physical=4)
    after = params(model, True)
    assert all(not torch.equal(after[k], start[k]) for k in after)  # noise reaches every weight
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.equal(v, frozen[k]) for k, v in params(model, False).items())


@pytest.mark.parametrize("mode", MODES)
def test_each_clipped_per_record_gradient_is_within_max_grad_norm(mode: str) -> None:
    """With noise 0 and a logical batch of one record, the step is exactly that record's clipped
    gradient; clip = 0.01 is far below the raw norms, so clipping is active."""
    clip = 0.01
    for rec in records()[:4]:
        model, raw = tiny_lora(), tiny_lora()
        start = params(model, True)
        dp_step(model, mode, [rec], noise=0.0, clip=clip, physical=1)
        plain_step(raw, [rec])
        grad = torch.cat([(start[k] - v).flatten() / LR for k, v in params(model, True).items()])
        raw_grad = torch.cat([(start[k] - v).flatten() / LR for k, v in params(raw, True).items()])
        assert raw_grad.norm() > 10 * clip
        assert grad.norm() <= clip * (1 + 1e-4)
        assert grad.norm() == pytest.approx(clip, rel=1e-3)  # clipped, not zeroed


@pytest.mark.parametrize("mode", MODES)
def test_batch_step_is_mean_of_clipped_per_record_gradients(mode: str) -> None:
    clip, chosen = 0.01, records()[:6]
    start = params(tiny_lora(), True)
    clipped = []
    for rec in chosen:  # reference: per-record autograd, clipped one by one
        ref = tiny_lora()
        plain_step(ref, [rec])
        g = torch.cat([(start[k] - v).flatten() / LR for k, v in params(ref, True).items()])
        clipped.append(g * min(1.0, clip / float(g.norm())))
    model = tiny_lora()
    dp_step(model, mode, chosen, noise=0.0, clip=clip, physical=4)
    got = torch.cat([(start[k] - v).flatten() / LR for k, v in params(model, True).items()])
    torch.testing.assert_close(got, torch.stack(clipped).mean(0), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_under_a_sample_rate_the_step_is_the_clipped_sum_over_the_public_batch(mode: str) -> None:
    """`privacy.record.sample_rate`: the noisy sum is divided by the plan's normalizer (the
    public `train.batch_size`), not by the site's own expected batch, so twice the records drawn
    make twice the step (records weighting without a count)."""
    clip, normalizer = 0.01, 5
    start = params(tiny_lora(), True)
    steps = []
    for chosen in (records()[:3], records()[:3] * 2):
        model = tiny_lora()
        p = RecordPlan(N, 0.5, N // 2, 1, 1, 0.0, clip, 1e-5, 0.0, normalizer)
        with DPTrainer(model, sgd(model), dp_cfg(mode, clip), p, GaussianAccountant(),
                       physical_batch_size=4, seed=0) as dp:  # fmt: skip
            dp.step_on(chosen, collate)
        steps.append(
            torch.cat([(start[k] - v).flatten() / LR for k, v in params(model, True).items()])
        )
    clipped = []
    for rec in records()[:3]:
        ref = tiny_lora()
        plain_step(ref, [rec])
        g = torch.cat([(start[k] - v).flatten() / LR for k, v in params(ref, True).items()])
        clipped.append(g * min(1.0, clip / float(g.norm())))
    torch.testing.assert_close(
        steps[0], torch.stack(clipped).sum(0) / normalizer, rtol=1e-3, atol=1e-7
    )
    torch.testing.assert_close(steps[1], 2 * steps[0], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_a_record_with_a_non_finite_gradient_contributes_nothing(mode: str) -> None:
    """A record whose forward overflows (one of its tokens embeds to Inf, as under a model a
    coordinator crafted) adds nothing: the step is the other records' clipped sum exactly, and
    finite with noise too. Before, that one record made the whole step NaN, so whether a site
    could reply at all depended on which records it held."""
    poison = VOCAB - 1
    good = [r for r in records() if poison not in r["input_ids"]][:5]
    bad = {k: v.clone() for k, v in good[0].items()}
    bad["input_ids"][T // 2] = poison

    def crafted() -> nn.Module:
        model = tiny_lora()
        with torch.no_grad():
            model.get_input_embeddings().weight[poison] = float("inf")
        return model

    def summed(model: nn.Module, chosen: list, noise: float) -> Tensor:
        start = params(model, True)
        dp_step(model, mode, chosen, noise=noise, clip=0.01, physical=3)
        after = params(model, True)
        return torch.cat([(start[k] - v).flatten() / LR for k, v in after.items()]) * len(chosen)

    with_bad = summed(crafted(), [*good[:2], bad, *good[2:]], 0.0)  # bad in the first chunk
    without = summed(crafted(), good, 0.0)
    assert torch.isfinite(with_bad).all() and without.norm() > 0
    torch.testing.assert_close(with_bad, without, rtol=1e-3, atol=1e-6)
    later = summed(crafted(), [*good[:3], bad, *good[3:]], 0.0)  # in the second chunk
    torch.testing.assert_close(later, without, rtol=1e-3, atol=1e-6)
    noisy = summed(crafted(), [bad, *good], 1.0)
    assert torch.isfinite(noisy).all() and noisy.norm() > without.norm()
    alone = summed(crafted(), [bad], 0.0)  # nothing left: a zero step, not a NaN one
    assert torch.equal(alone, torch.zeros_like(alone))


@pytest.mark.parametrize("mode", MODES)
def test_a_records_contribution_never_depends_on_another_records_length(mode: str) -> None:
    """A coordinator crafts the model so that padding overflows (the pad token embeds to Inf:
    every padded record's forward is NaN, so it drops). Padded to the longest of its batch, a
    short record then counts when drawn alone and drops beside a longer one: its removal or
    addition would change the sum by more than the clip bound. The site pads to
    `model.max_length` (DPStepper's ``width``): the step is the sum of each record's own part."""
    from common.core.batches import collate as pad_collate

    gen = torch.Generator().manual_seed(2)
    short, long_ = ([int(t) for t in torch.randint(1, VOCAB, (n,), generator=gen)] for n in (6, T))
    a, b = Encoded(short, [-100, *short[1:]]), Encoded(long_, [-100, *long_[1:]])

    def summed(chosen: list[Encoded], width: int) -> Tensor:
        model = tiny_lora()
        with torch.no_grad():
            model.get_input_embeddings().weight[0] = float("inf")  # the pad id
        start = params(model, True)
        with DPTrainer(model, sgd(model), dp_cfg(mode, 0.01), plan(0.0, 0.01, len(chosen)),
                       GaussianAccountant(), physical_batch_size=4, seed=0) as dp:  # fmt: skip
            dp.step_on(chosen, functools.partial(pad_collate, pad_id=0, width=width))
        after = params(model, True)
        return torch.cat([(start[k] - v).flatten() / LR for k, v in after.items()]) * len(chosen)

    # to the longest: `a` counts alone, drops beside `b` (the attack works on that padding)
    assert summed([a], 0).norm() > 0
    torch.testing.assert_close(summed([a, b], 0), summed([b], 0), rtol=1e-3, atol=1e-7)
    # to a fixed width: every record's part is its own, whatever else is drawn
    both = summed([a, b], T)
    torch.testing.assert_close(both, summed([a], T) + summed([b], T), rtol=1e-3, atol=1e-7)
    assert both.norm() > 0
    with pytest.raises(ValueError, match="longer than the padding width"):
        pad_collate([b], pad_id=0, width=T - 1)


@pytest.mark.parametrize("mode", MODES)
def test_accountant_steps_once_per_logical_step_and_on_empty_batches(mode: str) -> None:
    model, acc = tiny_lora(), GaussianAccountant()
    p = plan(1.0, 1.0, 8)
    start = params(model, True)
    with DPTrainer(model, sgd(model), dp_cfg(mode, 1.0), p, acc,
                   physical_batch_size=3, seed=0) as dp:  # fmt: skip
        losses = [dp.step(records(), collate) for _ in range(3)]
        dp.step_on([], collate)  # an empty Poisson batch: noise only, still accounted
    assert acc.history == [(1.0, 8 / N, 4)]
    assert all(loss == loss for loss in losses)  # no nan for non-empty batches
    assert any(not torch.equal(v, start[k]) for k, v in params(model, True).items())


def test_hooks_are_removed_and_a_second_round_wraps_again() -> None:
    model, acc = tiny_lora(), GaussianAccountant()
    for _ in range(2):  # the base model is loaded once per process and reused every round
        dp_step(model, "hooks", records()[:4], noise=1.0, clip=1.0, physical=4, acc=acc)
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())
        assert not model._forward_hooks and not model.base_model.model._forward_hooks
    assert acc.steps == 2


def test_wiring_guard_refuses_optimizer_on_stale_parameters() -> None:
    model = tiny_lora()
    stale = sgd(copy.deepcopy(model))  # e.g. built before the model was moved / re-created
    with pytest.raises(ModelError, match="#820"):
        check_wiring(model, stale)


def encoded() -> list[Encoded]:
    """The records as the loop gets them; every record has as many targets as the others, so the
    plain loss (token mean over the batch) equals DP-SGD's mean of per-record losses."""
    return [Encoded(r["input_ids"].tolist(), r["labels"].tolist()) for r in records()]


def loop_cfg(**update: object) -> TrainConfig:
    """Three steps on every record (batch N, two micro-batches), with warmup and cosine decay."""
    base = TrainConfig(local_steps=3, batch_size=N, grad_accum=2, lr=1e-2, warmup_steps=2,
                       schedule="cosine", weight_decay=0.5)  # fmt: skip
    return base.model_copy(update=update)


def loop(model: nn.Module, cfg: TrainConfig, stepper: DPStepper | None = None) -> None:
    train_round(model, encoded(), cfg, pad_id=0, round_idx=1, total_rounds=2, seed=3,
                stepper=stepper)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_dp_round_without_noise_equals_plain_round_with_weight_decay_issue_820(mode: str) -> None:
    """The one loop with the DP stepper (noise 0, a huge clip bound, sample rate 1 so that both
    train on every record) equals the loop with plain steps: the same AdamW with its decay groups,
    the same schedule. Weight decay is large enough to see, so it acts the same way under DP."""
    dp_model, plain_model, undecayed = tiny_lora(), tiny_lora(), tiny_lora()
    every = RecordPlan(N, 1.0, N, 3, 2, 0.0, 1e6, 1e-5, 0.0)
    acc = GaussianAccountant()
    loop(dp_model, loop_cfg(), DPStepper(dp_cfg(mode, 1e6), every, acc, width=T))
    loop(plain_model, loop_cfg(max_grad_norm=1e6))  # the plain step's clipping off as well
    loop(undecayed, loop_cfg(max_grad_norm=1e6, weight_decay=0.0))
    got, want, no_decay = params(dp_model, True), params(plain_model, True), params(undecayed, True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    assert max(float((want[k] - no_decay[k]).abs().max()) for k in want) > 1e-3  # decay is seen
    assert acc.steps == 3
    assert not any(hasattr(p, "grad_sample") for p in dp_model.parameters())  # hooks removed


def test_dp_round_through_the_loop_samples_accounts_and_reports_losses() -> None:
    model, acc = tiny_lora(), GaussianAccountant()
    start = params(model, True)
    stepper = DPStepper(dp_cfg("hooks", 1.0), plan(1.0, 1.0, 8), acc, width=T)
    result = train_round(model, encoded(), loop_cfg(batch_size=8), pad_id=0, round_idx=0,
                         total_rounds=1, seed=0, stepper=stepper)  # fmt: skip
    assert acc.history == [(1.0, 8 / N, 3)]
    assert result.steps == 3 and result.examples == N and math.isfinite(result.loss)
    assert all(not torch.equal(v, start[k]) for k, v in params(model, True).items())
    assert not model._forward_hooks and not model.base_model.model._forward_hooks


def test_the_dp_stepper_pads_every_batch_to_its_width() -> None:
    """What a site's DP steps run on: every physical batch `width` tokens wide (the site passes
    `model.max_length`), whatever its records' lengths; no width is refused."""
    stepper = DPStepper(dp_cfg("hooks", 1.0), plan(1.0, 1.0, 8), GaussianAccountant(), width=T + 5)
    model = tiny_lora()
    short = [Encoded(list(range(1, n + 1)), [-100] * n) for n in (3, 7)]
    stepper.open(model, sgd(model), short, loop_cfg(batch_size=2), pad_id=0, seed=0)
    try:
        batch = stepper.collate(short)
    finally:
        stepper.close()
    assert batch["input_ids"].shape == (2, T + 5) and int(batch["attention_mask"].sum()) == 10
    with pytest.raises(PrivacyError, match="fixed width"):
        DPStepper(dp_cfg("hooks", 1.0), plan(1.0, 1.0, 8), GaussianAccountant(), width=0)


def test_dp_stepper_removes_hooks_when_a_step_fails() -> None:
    model = tiny_lora()
    wrong = RecordPlan(N + 1, 8 / (N + 1), 8, 3, 1, 1.0, 1.0, 1e-5, 0.0)  # planned for N+1 records
    with pytest.raises(PrivacyError, match="plan is for"):
        loop(model, loop_cfg(batch_size=8), DPStepper(dp_cfg("hooks", 1.0), wrong,
                                                      GaussianAccountant(), width=T))  # fmt: skip
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not model._forward_hooks and not model.base_model.model._forward_hooks


def test_fedprox_acts_the_same_under_dp_as_without() -> None:
    """FedProx's pull is added to the privatized gradient: a DP round (noise 0, every record,
    clip bound off) with `proximal_mu` equals the plain round with it, and differs without."""
    dp_model, plain_model, no_prox = tiny_lora(), tiny_lora(), tiny_lora()
    every = RecordPlan(N, 1.0, N, 3, 2, 0.0, 1e6, 1e-5, 0.0)
    prox = loop_cfg(proximal_mu=5.0, weight_decay=0.0)
    loop(dp_model, prox, DPStepper(dp_cfg("hooks", 1e6), every, GaussianAccountant(), width=T))
    loop(plain_model, prox.model_copy(update={"max_grad_norm": 1e6}))
    loop(no_prox, loop_cfg(max_grad_norm=1e6, weight_decay=0.0))
    got, want, free = params(dp_model, True), params(plain_model, True), params(no_prox, True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    assert max(float((want[k] - free[k]).abs().max()) for k in want) > 1e-4  # the pull is seen
