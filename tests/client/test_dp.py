"""DP-SGD wiring on a tiny peft LoRA llama: #820 guard, clipping, accumulation, accounting."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from client.dp import DPTrainer, check_wiring, dp_backward, make_private, per_record_loss
from common.core.config import RecordDPConfig
from common.core.errors import ModelError
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


def test_accountant_steps_once_per_logical_step_and_on_empty_batches() -> None:
    model, acc = tiny_lora(), GaussianAccountant()
    p = plan(1.0, 1.0, 8)
    start = params(model, True)
    with DPTrainer(model, sgd(model), dp_cfg("hooks", 1.0), p, acc,
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


def test_make_private_gives_poisson_loader_and_external_accounting() -> None:
    model, acc = tiny_lora(), GaussianAccountant()
    loader = DataLoader(records(), batch_size=8, collate_fn=collate)  # type: ignore[arg-type]
    gsm, opt, dp_loader = make_private(
        model, sgd(model), loader, dp_cfg("ghost", 1.0), 1.0, acc, seed=0
    )
    batch = next(iter(dp_loader))
    dp_backward(gsm, opt, per_record_loss(gsm(input_ids=batch["input_ids"]).logits,
                                          batch["labels"]))  # fmt: skip
    opt.step()
    gsm.cleanup()
    assert acc.history == [(1.0, 8 / N, 1)]
