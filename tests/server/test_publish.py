"""`publish`: merged HF folder, adapter, card, manifest; the evaluation gate; atomic writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.identity.signing import KeyFileError, generate_keys, verify_folder
from server.publishing import publish as publish_mod
from server.publishing.publish import EvaluationGateError, PublishError, check_gate, publish
from tests.server.conftest import PRIVACY, TEST_TEXTS, base_model, tiny_config


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    batch = tokenizer(TEST_TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_folder_has_the_standard_layout(
    published: Path, tiny_run: Path, keys: tuple[Path, Path]
) -> None:
    names = {p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file()}
    expected = {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "MODEL_CARD.md",
        "manifest.json",
        "model.sig",
    }
    assert expected <= names
    tok = AutoTokenizer.from_pretrained(published)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert json.loads((published / "config.json").read_text())["use_cache"] is True
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["round"] == 2 and manifest["run_id"] == "run-good"
    assert manifest["config_hash"] == tiny_config().digest()
    assert manifest["privacy"] == PRIVACY["statement"]  # the run's own words, signed
    assert verify_folder(published, keys[1]).files == sorted(names - {"model.sig"})
    assert not [p for p in published.parent.iterdir() if p.name.startswith(".")]


def test_published_logits_match_in_memory_merge(published: Path, tiny_run: Path) -> None:
    cfg = tiny_config()
    base, tok = base_model(cfg)
    base_logits = _logits(base, tok)
    merged = PeftModel.from_pretrained(base, str(tiny_run / "rounds" / "2")).merge_and_unload()
    expected = _logits(merged, tok)
    loaded = AutoModelForCausalLM.from_pretrained(published).eval()
    got = _logits(loaded, AutoTokenizer.from_pretrained(published))
    assert (got - expected).abs().max().item() < 1e-4
    assert (expected - base_logits).abs().max().item() > 1e-3  # the adapter is not a no-op


def test_adapter_folder_loads_with_peft(published: Path) -> None:
    base, tok = base_model(tiny_config())
    peft_model = PeftModel.from_pretrained(base, str(published / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(published).eval()
    diff = (_logits(peft_model, tok) - _logits(merged, tok)).abs().max().item()
    assert diff < 1e-4


def test_verify_passes_and_card_tells_the_story(published: Path, keys: tuple[Path, Path]) -> None:
    manifest = verify_folder(published, keys[1]).manifest
    assert manifest["evaluation"]["published"]["loss"] > 0
    card = (published / "MODEL_CARD.md").read_text()
    needles = ["`tiny:llama`", "| site-0 | 120 |", "| site-2 | 5 |", "(3.50, 1.0e-05)-DP"]
    needles += [
        "Each institution's entire dataset: (8.00, 1.0e-05)-DP for holders of the published"
    ]
    needles += ["add/remove adjacency", "fixed denominator (3 sites per round)"]
    needles += ["Against the coordinator itself", "(20.00, 1.0e-05)-DP, replace-one adjacency"]
    needles += ["distributed discrete Gaussian", "published from round 2"]
    for needle in [*needles, "## Limitations"]:
        assert needle in card, needle
    privacy = card[card.index("## Privacy guarantee") : card.index("## Limitations")]
    # Plain words only: no raw dict, JSON or key names from the summary.
    for raw in ("{", "}", '"', "record_epsilon", "institution_noise_at", "`"):
        assert raw not in privacy, raw


def test_gate_refuses_a_model_made_worse(
    bad_run: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "bad-model"
    with pytest.raises(EvaluationGateError, match=r"loss rose from .* --force"):
        publish(bad_run, out, keys[0])
    assert list(tmp_path.iterdir()) == []  # nothing half-written, not even a temp folder
    publish(bad_run, out, keys[0], force=True)
    card = (out / "MODEL_CARD.md").read_text()
    assert "No differential privacy guarantee" in card


def test_gate_on_accuracy() -> None:
    check_gate({"accuracy": 0.80}, {"accuracy": 0.795}, 0.01, 0.05, force=False)
    with pytest.raises(EvaluationGateError, match=r"accuracy fell from 0.8000 to 0.7000"):
        check_gate({"accuracy": 0.80}, {"accuracy": 0.70}, 0.01, 0.05, force=False)
    check_gate({"accuracy": 0.80}, {"accuracy": 0.70}, 0.01, 0.05, force=True)


def test_round_choice_and_bad_inputs(
    tiny_run: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest = publish(tiny_run, tmp_path / "r1", keys[0], round=1)
    assert manifest["round"] == 1
    with pytest.raises(PublishError, match=r"`round` 7 was not saved; available .* \[1, 2\]"):
        publish(tiny_run, tmp_path / "r7", keys[0], round=7)
    with pytest.raises(PublishError, match=r"already exists"):
        publish(tiny_run, tmp_path / "r1", keys[0])
    with pytest.raises(PublishError, match=r"not a finished run: `config.toml` is missing"):
        publish(tmp_path, tmp_path / "x", keys[0])


def test_wrong_passphrase_fails_before_any_work(tiny_run: Path, tmp_path: Path) -> None:
    priv, _ = generate_keys(tmp_path / "k", passphrase="right")
    with pytest.raises(KeyFileError):
        publish(tiny_run, tmp_path / "m", priv, passphrase="wrong")
    assert not (tmp_path / "m").exists()


def test_crash_while_writing_leaves_nothing(
    tiny_run: Path, keys: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(publish_mod, "sign_folder", boom)
    out_parent = tmp_path / "pub"
    out_parent.mkdir()
    with pytest.raises(OSError, match=r"disk full"):
        publish(tiny_run, out_parent / "m", keys[0])
    assert list(out_parent.iterdir()) == []
