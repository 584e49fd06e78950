"""`model.head_pooling = "mean"`: an encoder classifier's head reads the masked mean of the last
hidden states; a saved model says so in its config.json, and fedtune's loaders put it back."""

from __future__ import annotations

import json

import pytest
import torch
from opacus import GradSampleModule
from safetensors.torch import load_file

from common.core import headinput, pooling
from common.core.config import ModelConfig
from common.core.errors import ModelError
from common.core.models import load_base

LABELS = ["heart", "lung", "skin"]
TEXTS = ["chest pain at rest", "a cough for weeks", "a rash", "short of breath on stairs"]


def _load(pool: str = "mean", head_input: str = "as-is", source: str = "tiny:bert"):
    cfg = ModelConfig(source=source, task="seq-cls", head_pooling=pool, head_input=head_input)
    return load_base(cfg, LABELS)


def _head_input(model, batch):
    """What the head (`classifier`, or a decoder's `score`) reads, and the model's logits."""
    seen = []
    head = headinput.head_of(model)[1]
    hook = head.register_forward_hook(lambda _m, a, _o: seen.append(a[0].detach()))
    with torch.no_grad():
        logits = model(**batch).logits
    hook.remove()
    return seen[0], logits


def test_the_head_reads_the_mean_of_each_records_own_tokens():
    loaded = _load()
    model, tok = loaded.model.eval(), loaded.tokenizer
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # records of different lengths: padding is there to leave out
    x, _ = _head_input(model, batch)
    with torch.no_grad():
        hidden = model.bert(**batch).last_hidden_state
    for i in range(len(TEXTS)):
        torch.testing.assert_close(x[i], hidden[i][mask[i].bool()].mean(0))
        if (mask[i] == 0).any():  # its padding is left out
            assert not torch.allclose(x[i], hidden[i].mean(0), atol=1e-4)
    plain = _load("model").model.eval()  # the model's own pooler reads something else
    assert not torch.allclose(_head_input(plain, batch)[0], x, atol=1e-3)
    assert not any("pooler" in name for name, _ in model.named_parameters())


def test_opacus_trains_the_head_on_the_mean():
    """The pooling has no weights: per-record gradients are those of the head on the mean."""
    loaded = _load()
    model, tok = loaded.model.train(), loaded.tokenizer  # Opacus records in training mode
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the head's input is then exactly the pooling's output
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    seen, states = [], []
    model.classifier.register_forward_hook(lambda _m, a, _o: seen.append(a[0].detach()))
    model.bert.encoder.register_forward_hook(lambda _m, _a, o: states.append(o[0].detach()))
    gsm = GradSampleModule(model)
    labels = torch.tensor([0, 1, 2, 0])
    gsm(**batch, labels=labels).loss.backward()
    (x,), (hidden,) = seen, states
    keep = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(x, (hidden * keep).sum(1) / keep.sum(1))  # the masked mean
    with torch.no_grad():
        p = torch.softmax(model.classifier(x), -1) - torch.nn.functional.one_hot(labels, 3)
    # each record's gradient of its own loss (Opacus undoes the batch mean)
    expected = p[:, :, None] * x[:, None]
    torch.testing.assert_close(model.classifier.weight.grad_sample, expected)


def test_a_saved_model_keeps_its_pooling_and_has_no_pooler_weights(tmp_path):
    loaded = _load(head_input="whitened")
    model, tok = loaded.model.eval(), loaded.tokenizer
    headinput.set_whitening(model, torch.eye(model.classifier.in_features) * 0.5)
    with torch.no_grad():
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))  # trained
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    _, before = _head_input(model, batch)
    headinput.fold(model)  # what `publish` does before writing
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[pooling.CONFIG_KEY] == "mean"
    assert not [k for k in load_file(str(tmp_path / "model.safetensors")) if "pooler" in k]
    # through fedtune (a folder as a base model, whatever `head_pooling` says): as trained
    again = _load("model", source=str(tmp_path)).model.eval()
    torch.testing.assert_close(_head_input(again, batch)[1], before, atol=1e-4, rtol=1e-4)
    # a plain loader keeps a new pooler the head never read: other labels
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not torch.allclose(_head_input(plain, batch)[1], before, atol=1e-2)
    assert pooling.install_saved(plain)
    torch.testing.assert_close(_head_input(plain, batch)[1], before, atol=1e-4, rtol=1e-4)


def test_mean_pooling_is_for_a_classifier_whose_head_reads_a_pooler_or_every_token():
    causal = load_base(ModelConfig(source="tiny:llama"), LABELS).model  # `lm_head`, no `score`
    with pytest.raises(ModelError, match="head_pooling.*`llama`.*nor a decoder's `score` head"):
        pooling.install(causal)
    with pytest.raises(ValueError, match='head_pooling = "mean"` needs `model.task = "seq-cls"'):
        ModelConfig(source="tiny:bert", head_pooling="mean")  # named when the config loads
    # a pooler given one token per record (ALBERT's, BigBird's) cannot become a mean
    pool = pooling.MeanPool()
    with pytest.raises(ModelError, match="2-D input"):
        pool(torch.zeros(2, 8))
    pool.mask = torch.ones(2, 5)
    with pytest.raises(ModelError, match="attention mask of"):
        pool(torch.zeros(2, 6, 8))


def _decoder(head_input: str = "as-is", pool: str = "mean", source: str = "tiny:llama"):
    return _load(pool, head_input, source)


def test_a_decoders_head_reads_the_mean_of_each_records_own_tokens():
    """A decoder classifier (`score` on every position, the last real token's logits kept): with
    mean pooling its head reads the mean over the record's own tokens, whatever the padding."""
    loaded = _decoder()
    model, tok = loaded.model.eval(), loaded.tokenizer
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    assert (mask == 0).any()
    x, logits = _head_input(model, batch)
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
    for i, text in enumerate(TEXTS):
        mean = hidden[i][mask[i].bool()].mean(0)
        torch.testing.assert_close(x[i, -1], mean)
        alone = tok([text], return_tensors="pt")
        with torch.no_grad():  # the same logits alone as in a padded batch
            torch.testing.assert_close(model(**alone).logits[0], logits[i], atol=1e-5, rtol=1e-5)
    plain = _decoder(pool="model").model.eval()  # the last token's state: other logits
    assert not torch.allclose(_head_input(plain, batch)[1], logits, atol=1e-3)


def test_opacus_trains_a_decoders_head_on_the_mean():
    loaded = _decoder()
    model, tok = loaded.model.train(), loaded.tokenizer
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("score."))
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
    gsm = GradSampleModule(model)
    labels = torch.tensor([0, 1, 2, 0])
    gsm(**batch, labels=labels).loss.backward()
    keep = batch["attention_mask"].unsqueeze(-1).float()
    x = (hidden * keep).sum(1) / keep.sum(1)
    with torch.no_grad():
        p = torch.softmax(x @ model.score.weight.T, -1) - torch.nn.functional.one_hot(labels, 3)
    torch.testing.assert_close(model.score.weight.grad_sample, p[:, :, None] * x[:, None])


def test_a_decoders_mean_survives_peft_copies_of_the_head():
    """PEFT trains a copy of the head (`modules_to_save`): the copy reads the mean over the
    record's own tokens too (the mask reaches it), not over the padding."""
    from common.core.adapters import attach_lora
    from common.core.config import LoraConfig

    cfg = ModelConfig(source="tiny:llama", task="seq-cls", head_pooling="mean")
    loaded = load_base(cfg, LABELS)
    model = attach_lora(loaded.model, LoraConfig(r=2), cfg).eval()
    tok = loaded.tokenizer
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = model(**batch).logits
        for i, text in enumerate(TEXTS):
            alone = model(**tok([text], return_tensors="pt")).logits[0]
            torch.testing.assert_close(alone, together[i], atol=1e-5, rtol=1e-5)


def test_a_saved_decoder_keeps_its_pooling(tmp_path):
    loaded = _decoder(head_input="whitened")
    model, tok = loaded.model.eval(), loaded.tokenizer
    headinput.set_whitening(model, torch.eye(model.score.in_features) * 0.5)
    with torch.no_grad():
        model.score.weight.add_(torch.randn_like(model.score.weight))
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    _, before = _head_input(model, batch)
    headinput.fold(model)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[pooling.CONFIG_KEY] == "mean"
    again = _load("model", source=str(tmp_path)).model.eval()
    torch.testing.assert_close(_head_input(again, batch)[1], before, atol=1e-4, rtol=1e-4)
