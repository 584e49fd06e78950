"""End to end: `fedtune simulate` on tiny.toml through Flower's real simulation runtime (a local
SuperLink, `flwr run`, Ray): outputs, user errors, Ctrl-C, resume, and nothing left running."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.core.config import load_config
from tests.conftest import ROOT, SCENARIOS
from tests.e2e.conftest import TINY_MARK, cli_env, fedtune, left_running, marked

pytestmark = pytest.mark.slow


def third_party_warnings(text: str) -> list[str]:
    """Deprecations and warnings of Flower, Ray or Python (fedtune's read `WARNING  message`)."""
    flower_format = re.compile(r"^(\(\w+ pid=\d+\) )?WARNING\s*:")
    return [
        line
        for line in text.splitlines()
        if "DEPRECATED" in line or "Warning:" in line or flower_format.match(line)
    ]


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
    assert {"manifest.json", "model.sig", "MODEL_CARD.md", "config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    proc = fedtune("verify", str(model_dir), "--public-key", str(pub))
    assert proc.returncode == 0 and "OK" in proc.stdout
    # `fedtune evaluate` on the run's round and on the published folder: the same model, the same
    # figures; a department field gives the per-group gap
    rows = [json.loads(x) for x in (out / "test" / "records.jsonl").read_text().splitlines()]
    grouped = tmp_path / "grouped"
    grouped.mkdir()
    (grouped / "r.jsonl").write_text(
        "".join(json.dumps({**r, "dept": "ab"[i % 2]}) + "\n" for i, r in enumerate(rows))
    )
    reports = {}
    for name, source, extra in (
        ("run", out, []),
        ("published", model_dir, ["--public-key", str(pub), "--config", str(out / "config.toml")]),
    ):
        args = ["--data", str(grouped), "--group-by", "dept", "--latency-requests", "2", *extra]
        proc = fedtune("evaluate", str(source), "--out", str(tmp_path / name), *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "targets: group_gap" in proc.stdout
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
        assert (tmp_path / name / "report.md").is_file()
    run_m, pub_m = reports["run"]["metrics"], reports["published"]["metrics"]
    assert run_m["accuracy"] == pub_m["accuracy"] and run_m["examples"] == len(rows)
    assert run_m["loss"] == pytest.approx(pub_m["loss"], rel=1e-3)
    assert set(reports["run"]["groups"]["by_group"]) == {"a", "b"}
    proc = fedtune("evaluate", str(model_dir), "--data", str(grouped), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--public-key" in proc.stderr
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = fedtune("verify", str(model_dir), "--public-key", str(pub))
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr
    proc = fedtune("evaluate", str(model_dir), "--data", str(grouped), "--out", str(tmp_path / "y"),
                   "--public-key", str(pub), "--config", str(out / "config.toml"))  # fmt: skip
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr  # never loaded unverified


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

    worst = float(re.search(r"Each record: \(([0-9.]+),", proc.stdout).group(1))
    assert 7.5 <= worst <= 8.0  # calibrated to the target epsilon of the shortcut
    assert "Each institution's entire dataset" in proc.stdout
    assert "Record-level noise per optimizer step" in proc.stdout
    assert len(re.findall(r"site site-\d: \d+ records, sample rate", proc.stdout)) == 3
    assert re.search(r"Per-record gradient norms at the start \(\d+ records\)", proc.stdout)


def test_the_run_goes_through_flwr_run_and_leaves_nothing_running(tiny_run):
    out, proc = tiny_run
    assert "Successfully started run" in proc.stderr  # submitted with `flwr run`
    assert "round 2/2: 3 site(s)" in proc.stderr  # the ServerApp's progress reaches the user
    assert marked(TINY_MARK) == []
    assert third_party_warnings(proc.stderr + proc.stdout) == []
    assert "preflight ok" in (out / "logs" / "run.log").read_text()
    assert (out / "logs" / "superlink.log").is_file()


def test_a_user_error_in_the_serverapp_is_one_paragraph_and_stops_everything(tmp_path):
    mark = uuid.uuid4().hex
    proc = fedtune(
        "simulate", "--config", str(SCENARIOS / "tiny.toml"), "--out", str(tmp_path),
        "--set", 'model.source="/nonexistent/model"', mark=mark,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "`model.source`: `/nonexistent/model` is neither" in errors[0]
    assert "Traceback" not in proc.stderr and "Exit Code" not in proc.stderr
    assert "ModelError" in (tmp_path / "logs" / "run.log").read_text()  # all of it kept
    assert left_running(mark) == []
    assert third_party_warnings(proc.stderr + proc.stdout) == []


def _as_in_a_terminal() -> None:
    """A job started in the background ignores SIGINT, and so would the CLI: not in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_superlink_and_everything_it_started(tmp_path, sig):
    mark = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "cli.main", "simulate", "--config", str(SCENARIOS / "tiny.toml")]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path)], cwd=ROOT, env=cli_env(mark), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_as_in_a_terminal,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "preflight ok" in line:  # Ray and its site actors are up: round 1 is running
                break
        running = "\n".join(marked(mark))
        assert "flower-superlink" in running and "flwr-simulation" in running, running
        assert "raylet" in running, running
        os.killpg(proc.pid, sig)  # SIGINT: what a terminal's Ctrl-C sends to its foreground
        rest = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "interrupted: stopping the run" in rest
    assert not (tmp_path / "summary.json").exists()
    assert left_running(mark) == []


def test_resume_runs_the_rounds_after_the_checkpoint_again(tiny_run, tmp_path):
    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("logs"))
    ckpt = json.loads((run / "checkpoint.json").read_text())
    ckpt["round"], ckpt["rows"] = 1, ckpt["rows"][:1]  # as if it crashed during round 2
    (run / "checkpoint.json").write_text(json.dumps(ckpt))
    shutil.rmtree(run / "rounds" / "2")
    proc = fedtune("simulate", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after round 1 of 2" in proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    resumed = load_file(str(run / "rounds" / "2" / "adapter_model.safetensors"))
    straight = load_file(str(out / "rounds" / "2" / "adapter_model.safetensors"))
    assert set(resumed) == set(straight)
    for key, value in straight.items():
        np.testing.assert_allclose(resumed[key], value, rtol=0, atol=1e-6)


# -- the pieces, without processes ----------------------------------------------------------------
FLOWER_TRACEBACK = [
    "\x1b[91mERROR \x1b[0m:     Simulation raised an exception\n",
    "Traceback (most recent call last):\n",
    '  File "/apps/fedtune/server/run.py", line 73, in execute\n',
    "    loaded = load_base(self.cfg.model, self.cfg.data.labels)\n",
    "{exception}\n",
    "  - `b`: second line of the message\n",
    "\x1b[91mERROR \x1b[0m:     Exit Code: 700\n",
    "\n",
    "An unhandled exception occurred when running the simulation.\n",
    "\n",
    "For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/700.html>\n",
    "\x1b[92mINFO \x1b[0m:      after\n",
]


def shown_by(log, lines):
    out = [line for raw in lines for line in log.feed(raw)]
    return out + log.finish()


def test_the_log_withholds_a_user_errors_traceback_and_shows_a_bugs():
    from cli.flower_log import FlowerLog
    from common.core.errors import ModelError

    user = FlowerLog()
    exc = "common.core.errors.ModelError: `model.source`: no such model"
    shown = shown_by(user, [line.format(exception=exc) for line in FLOWER_TRACEBACK])
    assert shown == [FLOWER_TRACEBACK[-1]]
    assert user.user_error is ModelError
    assert user.user_message == "`model.source`: no such model\n  - `b`: second line of the message"
    bug = FlowerLog()
    shown = shown_by(bug, [line.format(exception="KeyError: 'x'") for line in FLOWER_TRACEBACK])
    assert "".join(shown).count("Traceback") == 1 and "Exit Code: 700" in "".join(shown)
    assert bug.user_error is None and bug.failure == "KeyError: 'x'"


def test_the_log_drops_only_the_exact_known_lines():
    from cli.flower_log import FlowerLog

    warning = "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, "
    known = warning + "default simulated SuperNodes changed from 10 to 2.\n"
    other = warning + "something else changed.\n"
    assert shown_by(FlowerLog(), [known, other]) == [other]


def test_federation_config_scales_a_fraction_of_a_cpu(tiny_cfg):
    from cli.simulate import federation_config
    from common.core.errors import ConfigError

    cpus = os.cpu_count() or 1
    half = tiny_cfg.model_copy(
        update={"simulation": tiny_cfg.simulation.model_copy(update={"backend_cpus_per_site": 0.5})}
    )
    assert federation_config(half) == (
        "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.0 "
        f"init-args-num-cpus={2 * cpus}"
    )
    too_many = half.model_copy(
        update={
            "simulation": half.simulation.model_copy(update={"backend_cpus_per_site": cpus + 1})
        }
    )
    with pytest.raises(ConfigError, match="backend_cpus_per_site"):
        federation_config(too_many)


def test_the_staged_app_is_the_app_and_nothing_else(tmp_path):
    from cli.simulate import stage_app

    app = stage_app(tmp_path / "app")
    files = {p.relative_to(app).as_posix() for p in app.rglob("*") if p.is_file()}
    assert {"pyproject.toml", "server/app.py", "client/app.py", "simulations/run.py"} <= files
    assert {f.split("/")[0] for f in files} <= {
        "pyproject.toml",
        ".gitignore",
        "cli",
        "common",
        "client",
        "server",
        "simulations",
    }
    assert not any("__pycache__" in f for f in files)
