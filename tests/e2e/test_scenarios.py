"""End to end: the two scenarios built from real records that ship in packages (CFPB complaints,
ICD-10-CM chapters) run through `fedtune simulate` at a tiny size: their own corpus, partition,
labels and prompt, a tiny random model in place of the packaged one, one round."""

from __future__ import annotations

import json
import tomllib

import pytest
from safetensors.numpy import load_file

from common.core.adapters import TRAINED_FILE
from common.core.config.simulation import default_site_state
from tests.conftest import SCENARIOS
from tests.e2e.conftest import fedtune

pytestmark = pytest.mark.slow
TINY = [
    "simulation.partition.max_train_records=400",
    "simulation.partition.max_test_records=40",
    "federation.rounds=1",
    "train.local_steps=2",
    "train.batch_size=8",
]


def _run(tmp_path, scenario: str, *overrides: str) -> dict:
    out = tmp_path / scenario
    args = [f"--set={o}" for o in [*TINY, *overrides]]
    proc = fedtune(
        "simulate", "--config", str(SCENARIOS / f"{scenario}.toml"), "--out", str(out), *args
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = {p.name for p in (out / "rounds" / "1").iterdir()}
    assert {"adapter_model.safetensors", "trained_weights.safetensors"} & saved, saved
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and 0.0 <= summary["final"]["accuracy"] <= 1.0
    return summary


def test_bank_complaints_five_banks_route_complaints_to_products(tmp_path):
    summary = _run(tmp_path, "bank-complaints", "model.source=tiny:bert")
    assert sorted(summary["sites"]) == [f"site-{i}" for i in range(5)]
    assert sum(s["records"] for s in summary["sites"].values()) == 400
    site = json.loads(
        (tmp_path / "bank-complaints" / "sites" / "site-0" / "records.jsonl").open().readline()
    )
    assert site["label"] in {
        "credit reporting",
        "debt collection",
        "mortgage",
        "credit card",
        "bank account",
        "consumer loan",
        "student loan",
        "money transfer",
    }
    # the recipe's frozen-layer cache ran in every bank, kept in its own state folder
    for i in range(5):
        folder = default_site_state() / "bank-complaints" / f"site-{i}" / "frozen-cache"
        assert list(folder.glob("*.safetensors")), folder


def test_bank_complaints_under_record_level_dp_trains_its_private_recipe(tmp_path):
    """With record-level DP on, the scenario's `[private]` table applies: the head alone trains
    (it alone crosses the wire), on the whitened mean of the last hidden states, with the map
    from 1,000 held-out complaints; the run's own config.toml holds the values it ran with."""
    summary = _run(
        tmp_path, "bank-complaints", "model.source=tiny:bert", "privacy.record.enabled=true",
        "privacy.record.target_epsilon=8",
    )  # fmt: skip
    assert 0 < max(summary["privacy"]["record_epsilon"].values()) <= 8.0
    out = tmp_path / "bank-complaints"
    sent = load_file(str(out / "rounds" / "1" / TRAINED_FILE))
    assert sorted(sent) == ["classifier.bias", "classifier.weight"]
    assert len((out / "reference" / "reference.jsonl").read_text().splitlines()) == 1000
    assert (out / "head-whitening.safetensors").is_file()
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["lora"]["method"] == "head" and config["model"]["head_input"] == "whitened"
    assert config["model"]["head_pooling"] == "mean"
    assert config["privacy"]["record"]["max_grad_norm"] == 3.0 and "private" not in config


def test_hospital_coding_names_the_chapter_under_record_level_dp(tmp_path):
    summary = _run(
        tmp_path, "hospital-coding", "model.source=tiny:llama", "model.keep_layers=1",
        "privacy.record.enabled=true", "privacy.record.target_epsilon=8",
    )  # fmt: skip
    assert sorted(summary["sites"]) == [f"site-{i}" for i in range(4)]
    assert 0 < max(summary["privacy"]["record_epsilon"].values()) <= 8.0
    config = (tmp_path / "hospital-coding" / "config.toml").read_text()
    assert "injury" in config and "special purposes" not in config  # 21 chapters kept
    model = tomllib.loads(config)["model"]  # the head reads the mean over the lowest layers
    assert model["keep_layers"] == 1 and model["head_pooling"] == "mean"
    # the head alone trains and crosses the wire (the head input's projection and whitening
    # map are not weights); the map came from 1,000 held-out descriptions, labels dropped
    sent = load_file(str(tmp_path / "hospital-coding" / "rounds" / "1" / TRAINED_FILE))
    assert sorted(sent) == ["score.weight"]
    out = tmp_path / "hospital-coding"
    reference = (out / "reference" / "reference.jsonl").read_text().splitlines()
    assert len(reference) == 1000 and all(set(json.loads(r)) == {"text"} for r in reference)
    (hidden,) = load_file(str(out / "head-whitening.safetensors")).values()
    assert hidden.shape == (64, 64)  # the tiny llama's hidden size
