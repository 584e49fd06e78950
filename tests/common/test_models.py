"""Model sources: tiny builders for every family, local folders, and the packaged SmolLM2."""

from pathlib import Path

import pytest
import torch

from common.core.adapters import attach_lora, exchanged_keys
from common.core.config import LoraConfig, ModelConfig, TinyModelConfig
from common.core.errors import ModelError
from common.core.models import build_tiny, load_base, resolve_source
from common.core.tiny import ARCHS, byte_tokenizer


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_model_of_each_family_trains_with_lora(arch):
    task = "seq-cls" if arch == "bert" else "causal-lm"
    cfg = ModelConfig(source=f"tiny:{arch}", task=task)
    loaded = load_base(cfg, ["a", "b"])
    model = attach_lora(loaded.model, LoraConfig(r=2), cfg)
    keys = exchanged_keys(model, LoraConfig(r=2))
    assert keys, arch
    ids = loaded.tokenizer(["hello there"], return_tensors="pt")
    out = model(**ids)
    loss = out.logits.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_tiny_models_are_deterministic_per_seed():
    a, _ = build_tiny("llama", TinyModelConfig(seed=3))
    b, _ = build_tiny("llama", TinyModelConfig(seed=3))
    c, _ = build_tiny("llama", TinyModelConfig(seed=4))
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Ünïcødé, emoji 🙂 and <|im_end|>"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_local_folder_source(tmp_path: Path):
    model, tok = build_tiny("qwen2", TinyModelConfig())
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_base(ModelConfig(source=str(tmp_path)))
    assert loaded.model.config.model_type == "qwen2"
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)


def test_a_new_classification_head_is_the_same_in_every_load(tmp_path: Path):
    """A base model read as a classifier gets a new head: drawn from a fixed seed, so every
    process (the coordinator's base evaluation, each bench arm) starts from the same one, and
    the caller's random stream is left as it was."""
    model, tok = build_tiny("llama", TinyModelConfig())
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = ModelConfig(source=str(tmp_path), task="seq-cls")
    torch.manual_seed(1)
    first = load_base(cfg, ["a", "b", "c"]).model.score.weight
    after_first = torch.rand(1)
    torch.manual_seed(2)
    second = load_base(cfg, ["a", "b", "c"]).model.score.weight
    assert torch.equal(first, second) and first.abs().sum() > 0
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first)  # loading drew nothing from the caller's stream


def test_unknown_sources_are_named(tmp_path: Path):
    with pytest.raises(ModelError, match="never fetched from a hub"):
        resolve_source("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(ModelError, match="unknown tiny arch"):
        resolve_source("tiny:resnet")
    with pytest.raises(ModelError, match="unknown packaged model"):
        resolve_source("packaged:gpt5")
    with pytest.raises(ModelError, match="no config.json"):
        load_base(ModelConfig(source=str(tmp_path)))


@pytest.mark.slow
def test_packaged_smollm2_loads_and_generates(tmp_path: Path):
    cfg = ModelConfig(
        source="packaged:smollm2", cache_dir=str(Path.home() / ".cache/fedtune/models")
    )
    loaded = load_base(cfg)
    tok, model = loaded.tokenizer, loaded.model
    assert sum(p.numel() for p in model.parameters()) > 130e6
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_does_not_change_a_rows_logits(arch):
    """Left padding with position ids (causal) leaves each row's logits as if unpadded."""
    from common.core.tasks import Encoded, _forward, collate

    model, _ = build_tiny(arch, TinyModelConfig())
    model.eval()
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    batch = collate([Encoded(short, [-100] * 3), Encoded(long, [-100] * 6)], pad_id=0)
    alone = collate([Encoded(short, [-100] * 3)], pad_id=0)
    with torch.no_grad():
        padded = _forward(model, batch, 0)[0, -3:]
        single = _forward(model, alone, 0)[0]
    torch.testing.assert_close(padded, single, rtol=1e-4, atol=1e-4)


def test_classifier_batches_are_padded_on_the_right():
    from common.core.tasks import Encoded, collate

    batch = collate([Encoded([1, 2], 0), Encoded([3, 4, 5, 6], 1)], pad_id=0)
    assert batch["input_ids"][0].tolist() == [1, 2, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 0, 0]
    assert "position_ids" not in batch


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_keep_layers_keeps_the_lowest_layers_and_saves_the_shorter_model(arch, tmp_path: Path):
    """`model.keep_layers`: the model is the full one's lowest layers (its output is the full
    model's hidden state after that layer), and it saves and loads as the shorter model."""
    tiny = TinyModelConfig(num_layers=4)
    full = load_base(ModelConfig(source=f"tiny:{arch}", task="seq-cls", tiny=tiny), ["a", "b"])
    cfg = ModelConfig(source=f"tiny:{arch}", task="seq-cls", tiny=tiny, keep_layers=2)
    short = load_base(cfg, ["a", "b"])
    model, tok = short.model.eval(), short.tokenizer
    layers = next(m for n, m in model.named_modules() if n.endswith(("layers", "layer")))
    assert len(layers) == 2 and model.config.num_hidden_layers == 2
    batch = tok(["chest pain at rest"], return_tensors="pt")
    with torch.no_grad():
        hidden = full.model.eval().base_model(**batch, output_hidden_states=True).hidden_states
        mine = model.base_model(**batch).last_hidden_state
    # Llama's final norm reads layer 2's output, not layer 4's; BERT's layers end with their norm
    expected = full.model.model.norm(hidden[2]) if arch == "llama" else hidden[2]
    torch.testing.assert_close(mine, expected)
    assert not torch.allclose(mine, full.model.base_model(**batch).last_hidden_state, atol=1e-3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = load_base(ModelConfig(source=str(tmp_path), task="seq-cls"), ["a", "b"]).model.eval()
    assert again.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits)


def test_keep_layers_beyond_the_model_is_named():
    cfg = ModelConfig(source="tiny:llama", task="seq-cls", keep_layers=3)  # tiny: 2 layers
    with pytest.raises(ModelError, match=r"`model.keep_layers` = 3: the model has 2 layers"):
        load_base(cfg, ["a", "b"])
    with pytest.raises(ValueError, match="keep_layers"):
        ModelConfig(source="tiny:llama", keep_layers=0)
