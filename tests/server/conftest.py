"""Shared fixtures: a tiny finished run on disk, a signing key pair, and its published folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from common.core.config import Config, build_config, to_toml
from common.core.models import load_base
from common.identity.signing import generate_keys
from common.privacy.report import PrivacySummary, report_text
from server.publishing.publish import publish

TEST_TEXTS = [
    "the patient was given two tablets a day",
    "the bank approved the loan after review",
    "a short note about the weather today",
    "records never leave the site that holds them",
]


def tiny_config() -> Config:
    return build_config(
        {
            "name": "tiny-publish",
            "model": {"source": "tiny:llama", "tiny": {"seed": 0}},
            "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
        }
    )


def base_model(cfg: Config) -> tuple[Any, Any]:
    loaded = load_base(cfg.model)
    return loaded.model.eval(), loaded.tokenizer


def save_adapter(cfg: Config, out: Path, seed: int, b_scale: float, targets: list[str]) -> None:
    """A LoRA adapter with random (non-zero) B, scaled: small = harmless, huge = destructive."""
    model, _ = base_model(cfg)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        target_modules=targets,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(b_scale)
    peft_model.save_pretrained(str(out))


def make_run(
    root: Path, b_scales: list[float], privacy: dict[str, Any] | None, targets: list[str]
) -> Path:
    cfg = tiny_config()
    root.mkdir(parents=True)
    (root / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    for i, scale in enumerate(b_scales, 1):
        save_adapter(cfg, root / "rounds" / str(i), 100 + i, scale, targets)
    summary: dict[str, Any] = {
        "base": {"accuracy": 0.01, "loss": 6.2},
        "final": {"accuracy": 0.02, "loss": 6.1},
        "rounds": len(b_scales),
        "sites": {"site-0": {"records": 120}, "site-1": {"records": 80}, "site-2": {"records": 5}},
        "wall_time_s": 1.5,
        "run_id": f"run-{root.name}",
    }
    if privacy is not None:
        summary["privacy"] = privacy
    (root / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (root / "metrics.jsonl").write_text("", encoding="utf-8")
    (root / "test").mkdir()
    lines = [json.dumps({"instruction": f"Repeat: {t}", "output": t}) for t in TEST_TEXTS]
    (root / "test" / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


QV = ["q_proj", "v_proj"]
_TOTALS = PrivacySummary(
    rounds=2, planned=False,
    record_epsilon={"site-0": 3.5, "site-1": 2.0}, record_delta={"site-0": 1e-5, "site-1": 1e-5},
    institution_epsilon=8.0, institution_delta=1e-5, institution_noise_at="sites",
    denominator=3, institution_epsilon_vs_coordinator=20.0,
    ddg_plan={"min_sites": 2, "modulus_bits": 32, "bits_needed": 14},
)  # fmt: skip
PRIVACY = {**_TOTALS.to_dict(), "statement": report_text(_TOTALS)}  # as server/privacy_round.py


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "good", [0.05, 0.1], PRIVACY, QV)


@pytest.fixture(scope="session")
def bad_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A random tiny model predicts near-uniformly whatever q/v do; a huge LoRA on the output
    # head makes it confidently wrong, which the held-out loss shows.
    return make_run(tmp_path_factory.mktemp("runs") / "bad", [50.0], None, ["lm_head"])


@pytest.fixture(scope="session")
def published(
    tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, keys: tuple[Path, Path]
) -> Path:
    out = tmp_path_factory.mktemp("published") / "tiny-model"
    publish(tiny_run, out, keys[0])
    return out
