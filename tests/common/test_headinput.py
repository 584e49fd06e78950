"""`model.head_input = "without-label-mean"`: the head reads its input off one public direction,
Opacus clips and noises the gradients of what the head computes, and the projection folds into
the head exactly."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from common.core import headinput
from common.core.adapters import attach_lora
from common.core.config import LoraConfig, ModelConfig
from common.core.errors import ModelError
from common.core.models import load_base

LABELS = ["heart", "lung", "skin"]
TEXTS = ["chest pain at rest", "a cough for weeks", "a rash on the arm", "short of breath"]


def _load(arch: str = "llama", head_input: str = "without-label-mean"):
    cfg = ModelConfig(source=f"tiny:{arch}", task="seq-cls", head_input=head_input)
    return load_base(cfg, LABELS)


def _head_inputs(model, tok, texts, head=None):
    head = head if head is not None else headinput.head_of(model)[1]
    seen = []
    handle = head.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    with torch.no_grad():
        model(**tok(texts, return_tensors="pt", padding=True))
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_the_head_reads_its_input_without_the_label_names_mean(arch):
    loaded = _load(arch)
    model, tok = loaded.model.eval(), loaded.tokenizer
    _, head = headinput.head_of(model)
    u = getattr(head, headinput.ATTR)
    assert abs(float(u.norm()) - 1.0) < 1e-5
    # the direction is the label names' mean head input, from the base model alone
    raw = _load(arch, "as-is")
    feats = []
    for label in LABELS:
        x = _head_inputs(raw.model.eval(), raw.tokenizer, [label])
        feats.append(x[0, -1] if x.dim() == 3 else x[0])
    mean = torch.stack(feats).mean(0)
    torch.testing.assert_close(u, mean / mean.norm())
    # what the head computes with has nothing along it, and was something along it before
    x = _head_inputs(model, tok, TEXTS)
    assert (x @ u).abs().max().item() < 1e-4
    assert (_head_inputs(raw.model.eval(), raw.tokenizer, TEXTS) @ u).abs().max().item() > 1e-2


def test_opacus_per_record_gradients_are_those_of_the_projected_head():
    """DP-SGD clips what the head's weight really gets: each record's gradient has no
    component along the removed direction (so it is shorter, and the clip bound can be)."""
    loaded = _load()
    model, tok = loaded.model, loaded.tokenizer
    _, head = headinput.head_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    head.weight.requires_grad_(True)
    gsm = GradSampleModule(model)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    out = gsm(**batch, labels=torch.tensor([0, 1, 2, 1]))
    out.loss.backward()
    per_record = head.weight.grad_sample  # (records, labels, hidden)
    u = getattr(head, headinput.ATTR)
    assert per_record.shape[0] == len(TEXTS) and per_record.abs().max().item() > 1e-6
    assert (per_record @ u).abs().max().item() < 1e-6


def test_a_peft_copy_of_the_head_keeps_the_projection():
    loaded = _load()
    model = attach_lora(loaded.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                        ModelConfig(source="tiny:llama", task="seq-cls"))  # fmt: skip
    copies = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and getattr(m, headinput.ATTR, None) is not None
    ]
    assert len(copies) == 2  # PEFT's frozen original and the trained copy
    x = _head_inputs(model, loaded.tokenizer, TEXTS, head=copies[-1])
    assert (x @ getattr(copies[-1], headinput.ATTR)).abs().max().item() < 1e-4


def test_fold_writes_the_projection_into_the_head_exactly():
    loaded = _load()
    model, tok = loaded.model.eval(), loaded.tokenizer
    with torch.no_grad():
        model.score.weight.add_(torch.randn_like(model.score.weight))  # a trained head
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hooked = model(**batch).logits
    before = model.score.weight.clone()
    assert headinput.fold(model) == 1
    assert not model.score._forward_pre_hooks and not hasattr(model.score, headinput.ATTR)
    with torch.no_grad():
        folded = model(**batch).logits
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-5)
    assert (model.score.weight - before).abs().max().item() > 1e-4  # the fold did something
    assert headinput.fold(model) == 0  # nothing left to fold


def test_only_a_classifier_has_a_head_input():
    with pytest.raises(ModelError, match="model.task"):
        load_base(ModelConfig(source="tiny:llama", head_input="without-label-mean"), LABELS)
    with pytest.raises(ModelError, match="data.labels"):
        load_base(ModelConfig(source="tiny:llama", task="seq-cls", head_input="without-label-mean"))
