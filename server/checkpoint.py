"""Crash-safe rounds: after every completed round the coordinator writes a checkpoint atomically.

The checkpoint names the last completed round; its adapter is `rounds/<n>/` (written, then
renamed, before the checkpoint). Resuming restores the adapter, the rows, the privacy ledger and
accountant, and the run id (sites key their own accountants by it), and continues with round n+1:
no completed round is lost or applied twice. Sampling and local training are seeded per round, so
a resumed run without DP noise equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from common.core.adapters import saved_state_file
from common.core.errors import FedtuneError

NAME = "checkpoint.json"


@dataclass
class Checkpoint:
    round: int
    run_id: str
    config_sha256: str
    base: dict[str, float]
    final: dict[str, float]
    rows: list[dict[str, Any]]
    site_records: dict[str, int | None]
    elapsed_s: float
    privacy: dict[str, Any] = field(default_factory=dict)
    server_optimizer_steps: int = 0  # its arrays: server-optimizer/<round>.safetensors


def save(out: Path, ckpt: Checkpoint) -> None:
    tmp = out / f".{NAME}.tmp"
    tmp.write_text(json.dumps(asdict(ckpt)), encoding="utf-8")
    os.replace(tmp, out / NAME)


def load(out: Path, config_sha256: str) -> Checkpoint:
    path = out / NAME
    if not path.is_file():
        raise FedtuneError(f"cannot resume: `{path}` does not exist (no round was completed)")
    ckpt = Checkpoint(**json.loads(path.read_text(encoding="utf-8")))
    if ckpt.config_sha256 != config_sha256:
        raise FedtuneError(
            f"cannot resume `{out}`: its configuration differs from this one "
            "(resume with the run's own config.toml)"
        )
    return ckpt


def load_adapter(out: Path, round_idx: int, keys: list[str]) -> dict[str, np.ndarray]:
    """The exchanged arrays of round ``round_idx``'s saved state (the exchanged key names)."""
    saved = load_file(str(saved_state_file(out / "rounds" / str(round_idx))))
    missing = [k for k in keys if k not in saved]
    if missing:
        raise FedtuneError(f"cannot resume: round {round_idx}'s adapter lacks `{missing[0]}`")
    return {k: saved[k].astype(np.float32) for k in keys}


OPTIMIZER_DIR = "server-optimizer"


def save_optimizer(out: Path, round_idx: int, arrays: dict[str, np.ndarray]) -> None:
    """The server optimizer's state after round ``round_idx``, written before the checkpoint
    that names the round (a crash in between leaves the previous checkpoint and its state)."""
    folder = out / OPTIMIZER_DIR
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{round_idx}.tmp"
    save_file({k: np.ascontiguousarray(a) for k, a in arrays.items()}, str(tmp))
    os.replace(tmp, folder / f"{round_idx}.safetensors")


def prune_optimizer(out: Path, keep_round: int) -> None:
    """Drop the states of rounds before ``keep_round`` (checkpointed: no longer needed)."""
    for path in (out / OPTIMIZER_DIR).glob("*.safetensors"):
        if path.stem.isdigit() and int(path.stem) < keep_round:
            path.unlink(missing_ok=True)


def load_optimizer(out: Path, round_idx: int) -> dict[str, np.ndarray]:
    path = out / OPTIMIZER_DIR / f"{round_idx}.safetensors"
    if not path.is_file():
        raise FedtuneError(f"cannot resume: `{path}` (the server optimizer's state) is missing")
    return dict(load_file(str(path)))
