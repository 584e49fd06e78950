"""Record-level DP for the methods that train the model's own weights (`lora.method` = partial,
full), and for LoRA over a 4-bit quantized base: Opacus' per-record gradients of their weights
(linear layers, embeddings, and RMSNorm through functorch) are each record's own, so each
record's clipped contribution is bounded as the guarantee assumes. Checked as in
tests/client/test_dp.py, against per-record autograd.

Prompt tuning is refused under record-level DP (tests/server/test_methods.py): this same check
failed for it (PEFT computes the virtual tokens once and repeats them over the batch, so
Opacus sees one "record" holding the whole batch's gradient)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from client.dp import DPTrainer, per_record_loss
from common.core.adapters import attach_lora
from common.core.config import LoraConfig, ModelConfig
from common.core.tasks import input_logits
from tests.client.test_dp import LR, collate, dp_cfg, plan, records

METHODS = {
    "partial": {"method": "partial", "layers": [-1]},
    "full": {"method": "full"},
    "lora-4bit": {"method": "lora"},  # LoRA over a 4-bit frozen base (`model.quantization`)
}


@functools.cache
def _model(method: str) -> nn.Module:
    if method == "lora-4bit":
        from common.core.config import TinyModelConfig
        from common.core.models import load_base

        # bitsandbytes' CPU 4-bit kernels need inner sizes of 64 or more
        tiny = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                               vocab_size=128)  # fmt: skip
        mcfg = ModelConfig(source="tiny:llama", quantization="4bit", tiny=tiny)
        lora = LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"])
        return attach_lora(load_base(mcfg).model, lora, mcfg)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, vocab_size=128,
    )  # fmt: skip
    lora = LoraConfig.model_validate(METHODS[method])
    return attach_lora(LlamaForCausalLM(cfg), lora, ModelConfig(source="tiny:llama"))


def model_of(method: str) -> nn.Module:
    return copy.deepcopy(_model(method))


def trained(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen(model: nn.Module) -> dict[str, Tensor]:
    """The frozen float weights (bitsandbytes re-lays its packed uint8 weights out for the CPU
    kernels on the first forward pass: the same values, another layout)."""
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not p.requires_grad and p.is_floating_point()
    }


def step_direction(model: nn.Module, start: dict[str, Tensor]) -> Tensor:
    return torch.cat([(start[k] - v).flatten() / LR for k, v in trained(model).items()])


def plain_step(model: nn.Module, chosen: list) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch = collate(chosen)
    logits = input_logits(model(input_ids=batch["input_ids"]).logits, batch["input_ids"])
    per_record_loss(logits, batch["labels"]).mean().backward()
    opt.step()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("method", list(METHODS))
def test_dp_step_is_mean_of_each_records_clipped_gradient(method: str, mode: str) -> None:
    chosen = records()[:5]
    start = trained(model_of(method))
    assert start, "the method trains something"
    raw = []
    for rec in chosen:  # reference: each record's own gradient by autograd
        ref = model_of(method)
        plain_step(ref, [rec])
        raw.append(step_direction(ref, start))
    clip = min(float(g.norm()) for g in raw) / 10  # clipping active for every record
    clipped = [g * min(1.0, clip / float(g.norm())) for g in raw]
    model = model_of(method)
    before = frozen(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    with DPTrainer(model, opt, dp_cfg(mode, clip), plan(0.0, clip, len(chosen)),
                   _accountant(), physical_batch_size=3, seed=0) as dp:  # fmt: skip
        dp.step_on(chosen, collate)
    got = step_direction(model, start)
    # float32 round-off of thousands of summed terms, against entries of about clip / 100
    torch.testing.assert_close(got, torch.stack(clipped).mean(0), rtol=1e-3, atol=clip * 5e-5)
    assert all(torch.equal(v, before[k]) for k, v in frozen(model).items())  # the rest stays


def _accountant():
    from common.privacy.accounting import GaussianAccountant

    return GaussianAccountant()
