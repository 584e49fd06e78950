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
from common.core.errors import DataError, ModelError
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


# -- `head_input = "whitened"`: the coordinator's map from public reference texts ---------------

REFERENCE = [
    "a fever and chills", "pain in the left knee", "itching of the scalp", "a broken wrist",
    "blurred vision at night", "a dry cough", "swelling of the ankle", "loss of appetite",
    "chest tightness on exertion", "a rash after a new drug", "numbness in two fingers",
    "ringing in both ears",
]  # fmt: skip


def _whitened(arch: str = "llama"):
    loaded = _load(arch, "whitened")
    model, tok = loaded.model.eval(), loaded.tokenizer
    feats = headinput.reference_features(model, tok, REFERENCE, max_length=32)
    a = headinput.whitening_map(feats)
    headinput.set_whitening(model, a)
    return model, tok, feats, a


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_the_map_whitens_the_reference_features(arch):
    model, tok, feats, a = _whitened(arch)
    size = headinput.head_of(model)[1].in_features
    assert feats.shape == (len(REFERENCE), size) and a.shape == (size, size)
    torch.testing.assert_close(a, a.T)
    moment = (feats.T @ feats / len(feats)).double()
    values = torch.linalg.eigvalsh(moment)
    ridge = headinput.SHRINKAGE * float(values.max())
    # A (M + rho I) A = I: every direction of the reference weighs alike after the map
    eye = a.double() @ (moment + ridge * torch.eye(size, dtype=torch.float64)) @ a.double()
    torch.testing.assert_close(eye, torch.eye(size, dtype=torch.float64), atol=2e-3, rtol=0)
    # the features are those the head reads after the label-mean projection
    u = getattr(headinput.head_of(model)[1], headinput.ATTR)
    assert (feats @ u).abs().max().item() < 1e-4
    # and the head now reads them through the map: the last token's input is A x
    x = _head_inputs(model, tok, REFERENCE[:1])
    last = x[0, -1] if x.dim() == 3 else x[0]
    torch.testing.assert_close(last, feats[0] @ a, atol=1e-4, rtol=1e-4)


def test_a_whitened_head_reads_its_input_without_dropout_in_training():
    """BERT drops out the head's input in training; whitened, that noise would be stretched
    most where the map stretches most. With the encoder's own dropout off (so only the head's
    can act), the whitened head computes the same in training as in evaluation; the plain head
    does not."""

    def encoder_dropout_off(model: torch.nn.Module) -> None:
        for name, layer in model.named_modules():
            if isinstance(layer, torch.nn.Dropout) and name != "dropout":
                layer.p = 0.0

    torch.manual_seed(0)
    plain = _load("bert").model
    model, tok, _, _ = _whitened("bert")
    assert plain.dropout.p > 0 and model.dropout.p == 0.0
    encoder_dropout_off(plain)
    encoder_dropout_off(model)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        evaluated = model.eval()(**batch).logits
        trained = model.train()(**batch).logits
        dropped = [plain.train()(**batch).logits for _ in range(2)]
    torch.testing.assert_close(trained, evaluated)
    assert not torch.equal(dropped[0], dropped[1])


def test_a_whitened_head_refuses_to_run_without_its_map():
    loaded = _load("llama", "whitened")
    batch = loaded.tokenizer(TEXTS[:1], return_tensors="pt")
    with pytest.raises(ModelError, match="whitening map is not set"):
        loaded.model(**batch)
    with pytest.raises(ModelError, match="expected 64x64"):
        headinput.set_whitening(loaded.model, torch.eye(3))
    with pytest.raises(ModelError, match="NaN or Inf"):
        headinput.set_whitening(loaded.model, torch.full((64, 64), float("nan")))
    with pytest.raises(ModelError, match="sent no whitening map"):
        headinput.receive(loaded.model, None)
    with pytest.raises(ModelError, match="expected 64x64 float32, got 12 bytes"):
        headinput.receive(loaded.model, b"\0" * 12)
    a = torch.randn(64, 64)
    headinput.receive(loaded.model, headinput.to_bytes(a))
    torch.testing.assert_close(headinput.whitening_of(loaded.model), a)


@pytest.mark.parametrize("symmetric", [True, False], ids=["computed", "crafted"])
def test_fold_writes_the_map_and_the_projection_into_the_head_exactly(tmp_path, symmetric):
    model, tok, _, a = _whitened()
    if not symmetric:  # a map as a coordinator might send it: folded as the hook applies it
        a = torch.randn_like(a) / 8
        headinput.set_whitening(model, a)
    with torch.no_grad():
        model.score.weight.add_(torch.randn_like(model.score.weight))  # a trained head
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hooked = model(**batch).logits
    headinput.save_whitening(tmp_path, a)
    torch.testing.assert_close(headinput.load_whitening(tmp_path), a)
    assert headinput.fold(model) == 1
    assert not model.score._forward_pre_hooks and headinput.whitening_of(model) is None
    with torch.no_grad():
        folded = model(**batch).logits
    torch.testing.assert_close(folded, hooked, atol=1e-4, rtol=1e-4)


def test_the_reference_texts_are_read_with_file_and_line_of_a_bad_row(tmp_path):
    good = tmp_path / "ref.jsonl"
    good.write_text("".join(f'{{"text": "{t}"}}\n' for t in REFERENCE[:3]))
    assert headinput.read_reference(good) == REFERENCE[:3]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.csv").write_text("text\nfirst text\nsecond text\n")
    assert headinput.read_reference(folder) == ["first text", "second text"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"note": "no text here"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: no `text`"):
        headinput.read_reference(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl:2"):
        headinput.read_reference(broken)
    with pytest.raises(DataError, match="does not exist"):
        headinput.read_reference(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is not set"):
        headinput.read_reference("")


def test_only_a_whitened_head_takes_a_reference():
    with pytest.raises(ValueError, match='used only with `head_input = "whitened"`'):
        ModelConfig(source="tiny:llama", head_reference="/tmp/ref.jsonl")


def test_a_peft_copy_of_a_whitened_head_gets_the_map_too():
    loaded = _load("llama", "whitened")
    model = attach_lora(loaded.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                        ModelConfig(source="tiny:llama", task="seq-cls"))  # fmt: skip
    a = torch.randn(64, 64)
    headinput.receive(model, headinput.to_bytes(a))
    heads = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and getattr(m, headinput.WHITEN, None) is not None
    ]
    assert len(heads) == 2  # PEFT's frozen original and the trained copy
    batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_the_coordinators_map_is_cached_by_everything_it_depends_on(tmp_path, caplog):
    loaded = _load("llama", "whitened")
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(f'{{"text": "{t}"}}\n' for t in REFERENCE))
    first = headinput.reference_whitening(
        loaded.model, loaded.tokenizer, str(ref), 32, str(tmp_path)
    )
    kept = list((tmp_path / "head-whitening").glob(f"*/{headinput.WHITENING_FILE}"))
    assert len(kept) == 1
    with caplog.at_level("INFO"):
        again = headinput.reference_whitening(
            loaded.model, loaded.tokenizer, str(ref), 32, str(tmp_path)
        )
    assert "cached" in caplog.text
    torch.testing.assert_close(again, first)
    feats = headinput.reference_features(loaded.model, loaded.tokenizer, REFERENCE, 32)
    torch.testing.assert_close(first, headinput.whitening_map(feats))
    ref.write_text("".join(f'{{"text": "{t}"}}\n' for t in REFERENCE[1:]))  # other texts
    other = headinput.reference_whitening(
        loaded.model, loaded.tokenizer, str(ref), 32, str(tmp_path)
    )
    assert len(list((tmp_path / "head-whitening").iterdir())) == 2
    assert (other - first).abs().max().item() > 1e-3


def test_a_decoders_reference_features_are_the_mean_its_head_reads():
    """With `model.head_pooling = "mean"` the coordinator's features are the mean over each
    text's tokens, as the head reads it (not the last token's): the map whitens what it reads."""
    cfg = ModelConfig(
        source="tiny:llama", task="seq-cls", head_input="whitened", head_pooling="mean"
    )
    loaded = load_base(cfg, LABELS)
    model, tok = loaded.model.eval(), loaded.tokenizer
    feats = headinput.reference_features(model, tok, REFERENCE, max_length=32)
    headinput.set_whitening(model, torch.eye(feats.size(1)))
    for i in (0, 5, 11):  # texts of different lengths, each alone
        x = _head_inputs(model, tok, REFERENCE[i : i + 1])
        torch.testing.assert_close(x[0, -1], feats[i], atol=1e-5, rtol=1e-5)
    last = _load("llama", "whitened")  # the last token's features are others
    last_feats = headinput.reference_features(last.model, last.tokenizer, REFERENCE, 32)
    assert not torch.allclose(last_feats, feats, atol=1e-3)


def test_a_decoders_mean_is_projected_and_whitened_as_each_position_would_be():
    """The maps run once per record on a decoder's mean (it reaches the head expanded over the
    positions): what the head reads at every position is the record's mean, projected, mapped."""
    cfg = ModelConfig(
        source="tiny:llama", task="seq-cls", head_input="whitened", head_pooling="mean"
    )
    loaded = load_base(cfg, LABELS)
    model, tok = loaded.model.eval(), loaded.tokenizer
    size = model.score.in_features
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    headinput.set_whitening(model, a)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    x = _head_inputs(model, tok, TEXTS)
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
    u = getattr(model.score, headinput.ATTR)
    for i in range(len(TEXTS)):
        mean = hidden[i][batch["attention_mask"][i].bool()].mean(0)
        want = (mean - (mean @ u) * u) @ a
        for position in range(x.size(1)):
            torch.testing.assert_close(x[i, position], want, atol=1e-4, rtol=1e-4)
