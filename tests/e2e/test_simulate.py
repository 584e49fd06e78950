"""End to end: `fedtune simulate` on tiny.toml through Flower's real simulation engine (Ray)."""

import json

import pytest

from common.core.config import load_config
from tests.conftest import SCENARIOS
from tests.e2e.conftest import fedtune

pytestmark = pytest.mark.slow


def test_every_output_file_is_written(tiny_run):
    out, proc = tiny_run
    cfg = load_config(out / "config.toml")
    assert cfg.name == "tiny" and sorted(cfg.data.labels) == ["blue", "green", "red"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert {
            "round",
            "sites",
            "train_loss",
            "eval_loss",
            "eval_accuracy",
            "bytes_up",
            "bytes_down",
        } <= set(row)
        assert row["sites"] == ["site-0", "site-1", "site-2"]
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and set(summary["sites"]) == {"site-0", "site-1", "site-2"}
    assert sum(s["records"] for s in summary["sites"].values()) == 240
    assert {"accuracy", "loss"} <= set(summary["base"]) and summary["wall_time_s"] > 0
    for n in (1, 2):
        assert (out / "rounds" / str(n) / "adapter_model.safetensors").is_file()
        assert (out / "rounds" / str(n) / "adapter_config.json").is_file()
    for plot in ("train_loss.png", "eval_loss.png", "eval_accuracy.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    assert "federated model" in proc.stdout


def test_loss_falls_and_the_model_improves(tiny_run):
    out, _ = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_loss"][-1] < summary["train_loss"][0]
    assert summary["final"]["loss"] < summary["base"]["loss"] - 0.3
    assert summary["final"]["accuracy"] > summary["base"]["accuracy"]


def test_round_adapter_loads_with_peft(tiny_run):
    from peft import PeftModel

    from common.core.models import load_base

    out, _ = tiny_run
    cfg = load_config(out / "config.toml")
    base = load_base(cfg.model, cfg.data.labels).model
    model = PeftModel.from_pretrained(base, str(out / "rounds" / "2"))
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_bad_config_exits_with_the_field_named(tmp_path):
    proc = fedtune(
        "simulate",
        "--config",
        str(SCENARIOS / "tiny.toml"),
        "--out",
        str(tmp_path),
        "--set",
        "federation.rounds=-1",
    )
    assert proc.returncode == 2
    assert "`federation.rounds`" in proc.stderr and "Traceback" not in proc.stderr


def test_publish_then_verify_through_the_cli(tiny_run, tmp_path):
    out, _ = tiny_run
    keys = tmp_path / "keys"
    proc = fedtune("keys", "generate", "--out", str(keys))
    assert proc.returncode == 0, proc.stderr
    key = next(keys.glob("*key.pem"))
    pub = next(keys.glob("*.pub.pem"))
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    model_dir = tmp_path / "model"
    proc = fedtune("publish", str(out), "--out", str(model_dir), "--signing-key", str(key))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"manifest.json", "manifest.sig", "MODEL_CARD.md", "config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    proc = fedtune("verify", str(model_dir), "--public-key", str(pub))
    assert proc.returncode == 0 and "OK" in proc.stdout
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = fedtune("verify", str(model_dir), "--public-key", str(pub))
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr


def test_privacy_report_says_when_there_is_no_guarantee(tiny_run):
    out, _ = tiny_run
    proc = fedtune("privacy-report", str(out))
    assert proc.returncode == 2 and "without differential privacy" in proc.stderr


def test_privacy_report_plans_a_config():
    proc = fedtune(
        "privacy-report", "--plan", str(SCENARIOS / "tiny.toml"), "--set", "privacy.enabled=true"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import re

    worst = float(re.search(r"Each patient record: \(([0-9.]+),", proc.stdout).group(1))
    assert 7.5 <= worst <= 8.0  # calibrated to the target epsilon of the shortcut
    assert "Each institution's entire dataset" in proc.stdout
    assert "Record-level noise per optimizer step" in proc.stdout
    assert len(re.findall(r"site site-\d: \d+ records, sample rate", proc.stdout)) == 3
