"""Adapter methods (`lora.method`): each one round-trips through a federated round, plain and
under secure aggregation, exchanging exactly its own tensors, and trains under record-level DP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from client.app import app as client_app
from common.core.config import build_config
from common.core.errors import ConfigError
from server.run import FederatedRun
from tests.server.inprocess import InProcessGrid
from tests.server.test_run import setup_run
from tests.server.test_secagg_round import give_identities

# What each method trains and sends (a suffix of every exchanged key).
SENT = {
    "lora": ("lora_B.weight",),
    "dora": ("lora_B.weight", "lora_magnitude_vector"),
    "ia3": ("ia3_l",),
    "prompt": ("prompt_embeddings",),
}


def _with(cfg, **sections):
    data = cfg.model_dump(mode="json", exclude_none=True)
    for section, fields in sections.items():
        node = data
        for part in section.split("."):
            node = node.setdefault(part, {})
        node.update(fields)
    return build_config(data)


def _round(
    cfg, root: Path, secure: bool, file: str = "adapter_model.safetensors"
) -> tuple[dict, dict[str, np.ndarray]]:
    if secure:
        cfg = _with(cfg, secagg={"enabled": True})
    cfg, nodes = setup_run(cfg, root, {"rounds": 1})
    grid = InProcessGrid(client_app, nodes)
    if secure:
        give_identities(grid, nodes)
    summary = FederatedRun(cfg, root / "run", grid).execute()
    return summary, load_file(str(root / "run" / "rounds" / "1" / file))


# `lora` plain vs secure: tests/server/test_secagg_round.py (against a numpy reference).
@pytest.mark.parametrize("method", ["dora", "ia3", "prompt"])
def test_each_method_round_trips_plain_and_under_secure_aggregation(tiny_cfg, tmp_path, method):
    cfg = _with(tiny_cfg, lora={"method": method, "target_modules": "auto"})
    plain_summary, plain = _round(cfg, tmp_path / "plain", secure=False)
    _, secure = _round(cfg, tmp_path / "secure", secure=True)
    sent = sorted(k for k in plain if not k.endswith("lora_A.weight"))
    assert sent and all(k.endswith(SENT[method]) for k in sent), sent
    assert all(any(k.endswith(s) for k in sent) for s in SENT[method])
    if method == "prompt":  # the virtual tokens start at a seeded random init: they moved
        from common.core.adapters import attach_lora, exchanged_keys, get_state
        from common.core.models import load_base

        fresh = attach_lora(load_base(cfg.model, cfg.data.labels).model, cfg.lora, cfg.model)
        init = get_state(fresh, exchanged_keys(fresh, cfg.lora))
        assert sorted(init) == sent
        assert all(np.abs(plain[k] - init[k]).max() > 1e-4 for k in sent)
    else:  # B starts at 0, DoRA's magnitudes at |W|, IA3 at 1
        start = 1.0 if method == "ia3" else 0.0
        assert any(np.abs(plain[k] - start).max() > 1e-4 for k in sent if "magnitude" not in k)
    for k in sent:  # the same sites' updates, summed in the clear or masked and quantized
        np.testing.assert_allclose(secure[k], plain[k], atol=1e-4, err_msg=k)
    size = sum(plain[k].size for k in sent)
    # 3 sites, float32: the method's bytes and no more (a few KB of names and config each)
    assert 3 * 4 * size <= plain_summary["bytes_up"][0] <= 3 * (4 * size + 16_384)


@pytest.mark.parametrize("method", ["dora", "ia3", "prompt"])
def test_methods_without_per_record_gradients_are_refused_under_record_level_dp(tiny_cfg, method):
    """Opacus has no per-record gradients for PEFT's DoRA and IA3 layers (a round fails in the
    hooks), and wrong ones for prompt tuning's shared virtual tokens (tests/client/
    test_dp_methods.py): the config is refused before anything runs, naming both fields."""
    refused = rf'`lora.method` = "{method}" is not supported with record-level DP'
    with pytest.raises(ConfigError, match=refused):
        _with(
            tiny_cfg,
            lora={"method": method},
            **{"privacy.record": {"enabled": True, "target_epsilon": 8.0}},
        )


# `partial`, `head` and `full` train the model's own weights: what is sent is those weights by
# name (`head` on a classifier: its score layer alone).
WEIGHTS = {
    "partial": lambda k: k.startswith(("model.layers.1.", "model.norm.", "lm_head.")),
    "head": lambda k: k.startswith("score."),
    "full": lambda k: True,
}


@pytest.mark.parametrize("method", ["partial", "head", "full"])
def test_weight_methods_round_trip_plain_and_under_secure_aggregation(tiny_cfg, tmp_path, method):
    """The sites train the chosen weights in place; the coordinator averages them (exactly: the
    frozen rest is the same everywhere) and saves only them; secure aggregation sums the same."""
    from common.core.adapters import TRAINED_FILE, TRAINED_META, attach_lora
    from common.core.models import load_base

    cfg = _with(tiny_cfg, lora={"method": method, "layers": [-1] if method == "partial" else []})
    if method == "head":  # a classifier's head
        cfg = _with(cfg, model={"task": "seq-cls"})
    plain_summary, plain = _round(cfg, tmp_path / "plain", secure=False, file=TRAINED_FILE)
    _, secure = _round(cfg, tmp_path / "secure", secure=True, file=TRAINED_FILE)
    assert (tmp_path / "plain" / "run" / "rounds" / "1" / TRAINED_META).is_file()
    base = dict(load_base(cfg.model, cfg.data.labels).model.named_parameters())
    expected = sorted(k for k in base if WEIGHTS[method](k))
    assert sorted(plain) == expected  # exactly the method's weights, nothing else
    assert any(np.abs(plain[k] - base[k].detach().numpy()).max() > 1e-4 for k in expected)
    for k in expected:
        np.testing.assert_allclose(secure[k], plain[k], atol=1e-4, err_msg=k)
    size = sum(plain[k].size for k in expected)
    assert 3 * 4 * size <= plain_summary["bytes_up"][0] <= 3 * (4 * size + 16_384)
    if method == "partial":  # half the tiny model's layers: well under all of its weights
        model = attach_lora(load_base(cfg.model, cfg.data.labels).model, cfg.lora, cfg.model)
        assert size < 0.6 * sum(p.numel() for p in model.parameters())


def test_partial_run_publishes_whole_weights_and_is_not_served_as_an_adapter(tiny_cfg, tmp_path):
    """Publishing a `partial` run loads its trained weights over the base (the published model
    computes what the run's model computes, and differs from the base); there is no adapter to
    serve beside a base, and `serve --adapter` says so."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.core.adapters import apply_round
    from common.core.errors import ModelError
    from common.core.models import load_base
    from common.identity.signing import generate_keys, verify_folder
    from server.publishing.publish import publish
    from server.serving.loading import adapter_dir

    cfg = _with(tiny_cfg, lora={"method": "partial", "layers": [-1]})
    _round(cfg, tmp_path, secure=False, file="trained_weights.safetensors")
    private_key, public_key = generate_keys(tmp_path / "keys")
    out = tmp_path / "published"
    publish(tmp_path / "run", out, private_key, force=True)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in names and not any(n.startswith("adapter/") for n in names)
    assert verify_folder(out, public_key).files == sorted(names - {"model.sig"})
    card = (out / "MODEL_CARD.md").read_text()
    assert "federated partial fine-tune" in card and "`partial` (layers [-1]" in card
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    base = load_base(cfg.model, cfg.data.labels)
    with torch.no_grad():
        before = base.model(input_ids=ids).logits
        want = apply_round(base.model, tmp_path / "run" / "rounds" / "1")(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - before).abs().max() > 1e-3
    with pytest.raises(ModelError, match="not an adapter: publish it"):
        adapter_dir(tmp_path / "run", None)
    with pytest.raises(ModelError, match="without an adapter"):
        adapter_dir(out, public_key)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_trains_adapters_and_publishes_into_the_full_precision_base(
    tiny_cfg, tmp_path, quantization
):
    """`model.quantization`: the frozen base's linear layers are bitsandbytes' (Linear8bitLt,
    Linear4bit), LoRA trains and is exchanged in float32, and `publish` folds the adapter into
    the full-precision base (its logits are the float32 base + adapter's, not the quantized)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.core.models import load_base
    from common.identity.signing import generate_keys
    from server.publishing.publish import publish

    cfg = _with(tiny_cfg, model={"quantization": quantization})
    quantized = load_base(cfg.model, cfg.data.labels).model
    kind = type(quantized.model.layers[0].self_attn.q_proj).__name__
    assert kind == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[quantization]
    _, sent = _round(cfg, tmp_path, secure=False)
    assert sent and all(v.dtype == np.float32 for v in sent.values())
    private_key, _ = generate_keys(tmp_path / "keys")
    publish(tmp_path / "run", tmp_path / "published", private_key, force=True)
    config = (tmp_path / "published" / "config.json").read_text()
    assert "quantization_config" not in config
    full = load_base(cfg.model.model_copy(update={"quantization": "none"})).model
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(full, str(tmp_path / "run" / "rounds" / "1"))
        want = want.merge_and_unload()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "published")(input_ids=ids).logits
        on_quantized = PeftModel.from_pretrained(quantized, str(tmp_path / "run" / "rounds" / "1"))
        q_logits = on_quantized(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (q_logits - want).abs().max() > 1e-4  # the quantized base is a different model


def test_quantization_with_weight_methods_is_refused_naming_the_fields(tiny_cfg):
    with pytest.raises(ConfigError, match=r'`model.quantization` = "4bit" leaves nothing to train'):
        _with(tiny_cfg, model={"quantization": "4bit"}, lora={"method": "full"})


@pytest.mark.parametrize("method", ["partial", "full"])
def test_weight_methods_train_under_both_dp_levels_and_secure_aggregation(
    tiny_cfg, tmp_path, method
):
    """`partial` / `full` with record- and institution-level DP under secure aggregation: the
    round is accounted at both levels and the published weights moved (noise included)."""
    from common.core.adapters import TRAINED_FILE
    from common.core.models import load_base
    from tests.server.test_privacy_run import private_cfg

    cfg = private_cfg(tiny_cfg, **{"train.local_steps": 2})
    cfg = _with(cfg, lora={"method": method, "layers": [-1] if method == "partial" else []})
    summary, sent = _round(cfg, tmp_path, secure=True, file=TRAINED_FILE)
    privacy = summary["privacy"]
    assert privacy["institution_epsilon"] and max(privacy["record_epsilon"].values()) <= 8 + 1e-6
    base = dict(load_base(cfg.model, cfg.data.labels).model.named_parameters())
    assert sorted(sent) == sorted(k for k in base if WEIGHTS[method](k))
    assert all(np.abs(sent[k] - base[k].detach().numpy()).max() > 0 for k in sent)


def test_a_head_run_under_dp_with_the_head_input_projection_publishes_a_plain_classifier(
    tiny_cfg, tmp_path
):
    """`lora.method = "head"` on a classifier with `model.head_input = "without-label-mean"`,
    under record-level DP: the sites send the head alone; `publish` folds the
    projection into the head, so the published folder is a plain classifier (loaded with no
    fedtune code) that computes what the run's model computes, and its head has nothing along
    the removed direction."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from common.core import headinput
    from common.core.adapters import TRAINED_FILE, apply_round
    from common.core.models import load_base
    from common.identity.signing import generate_keys
    from server.publishing.publish import publish

    cfg = _with(
        tiny_cfg,
        model={"task": "seq-cls", "head_input": "without-label-mean"},
        lora={"method": "head", "layers": []},
        train={"batch_size": 8},
        **{"privacy.record": {"enabled": True, "target_epsilon": 8.0, "max_grad_norm": 1.0}},
    )
    summary, sent = _round(cfg, tmp_path, secure=False, file=TRAINED_FILE)
    assert sorted(sent) == ["score.weight"]
    assert max(summary["privacy"]["record_epsilon"].values()) <= 8 + 1e-6
    private_key, _ = generate_keys(tmp_path / "keys")
    out = tmp_path / "published"
    publish(tmp_path / "run", out, private_key, force=True)
    assert "`head` (the classification head trained" in (out / "MODEL_CARD.md").read_text()

    ids = torch.tensor([[1, 5, 9, 13, 17], [2, 4, 6, 8, 10]])
    run_model = apply_round(
        load_base(cfg.model, cfg.data.labels).model, tmp_path / "run" / "rounds" / "1"
    )
    u = getattr(run_model.score, headinput.ATTR)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        want, got = run_model(input_ids=ids).logits, plain(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not plain.score._forward_pre_hooks  # nothing of fedtune's in the published model
    assert (plain.score.weight @ u).abs().max().item() < 1e-5
    assert (
        torch.as_tensor(sent["score.weight"]) @ u
    ).abs().max().item() > 1e-4  # folded at publish


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_mean_pooled_head_run_publishes_a_folder_that_says_how_its_head_reads(
    tiny_cfg, tmp_path, arch
):
    """`model.head_pooling = "mean"` under record-level DP, a BERT classifier or a decoder's
    (the latter shortened to its lowest layer, `model.keep_layers`): the published folder
    records the pooling (config.json, model card), has no pooler weights and only the layers
    kept; fedtune's loaders (a folder as `model.source`, `fedtune evaluate`'s) compute what the
    run's model computes, and a plain loader (a fresh pooler; a decoder's last token) does
    not."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification

    from cli.main import _model_to_evaluate
    from common.core.adapters import TRAINED_FILE, apply_round
    from common.core.config import ModelConfig
    from common.core.models import load_base
    from common.identity.signing import generate_keys
    from server.publishing.publish import publish

    model = {"source": f"tiny:{arch}", "task": "seq-cls", "head_pooling": "mean"}
    if arch == "llama":
        model["keep_layers"] = 1  # of 2
    cfg = _with(
        tiny_cfg,
        model=model,
        lora={"method": "head", "layers": []},
        train={"batch_size": 8},
        **{"privacy.record": {"enabled": True, "target_epsilon": 8.0, "max_grad_norm": 1.0}},
    )
    summary, sent = _round(cfg, tmp_path, secure=False, file=TRAINED_FILE)
    head = ["classifier.bias", "classifier.weight"] if arch == "bert" else ["score.weight"]
    assert sorted(sent) == head
    assert max(summary["privacy"]["record_epsilon"].values()) <= 8 + 1e-6
    private_key, public_key = generate_keys(tmp_path / "keys")
    out = tmp_path / "published"
    publish(tmp_path / "run", out, private_key, force=True)
    card = (out / "MODEL_CARD.md").read_text()
    assert "Head pooling: the mean of the last hidden states" in card
    saved = json.loads((out / "config.json").read_text())
    assert saved["fedtune_head_pooling"] == "mean"
    if arch == "llama":
        assert saved["num_hidden_layers"] == 1 and "its lowest 1 layer (`model.keep" in card
        assert not [k for k in load_file(str(out / "model.safetensors")) if "layers.1." in k]

    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [0, 0, 2, 4, 6, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    run_model = apply_round(
        load_base(cfg.model, cfg.data.labels).model, tmp_path / "run" / "rounds" / "1"
    ).eval()
    folder = load_base(ModelConfig(source=str(out), task="seq-cls"), cfg.data.labels).model
    _, evaluated, _, _ = _model_to_evaluate(out, None, public_key, tmp_path / "run" / "config.toml")
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        want = run_model(input_ids=ids, attention_mask=mask).logits
        for model in (folder.eval(), evaluated.eval()):
            got = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (plain(input_ids=ids, attention_mask=mask).logits - want).abs().max() > 1e-3


def test_the_card_names_a_pooling_the_base_folder_brought(tiny_cfg):
    """A run on a mean-pooled folder fedtune published (`model.source`), with `head_pooling`
    left at `model`, publishes a model that pools by the mean: its card says so."""
    from server.publishing.model_card import render_model_card

    cfg = _with(tiny_cfg, model={"task": "seq-cls"})
    assert "Head pooling" not in render_model_card(cfg, {}, 1, {}, {})
    assert "Head pooling: the mean" in render_model_card(cfg, {}, 1, {}, {}, pooling="mean")
