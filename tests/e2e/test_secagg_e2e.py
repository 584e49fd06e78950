"""End to end: `fedtune simulate` on tiny.toml with secure aggregation, through Flower's real
simulation engine (Ray), against the session's plaintext run of the same scenario."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import SCENARIOS
from tests.e2e.conftest import fedtune

pytestmark = pytest.mark.slow


def simulate(out: Path, *overrides: str) -> list[dict[str, Any]]:
    sets = [arg for o in overrides for arg in ("--set", o)]
    proc = fedtune("simulate", "--config", str(SCENARIOS / "tiny.toml"), "--out", str(out), *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_run
) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    root = tmp_path_factory.mktemp("secagg-e2e")
    plain = tiny_run[0]
    plain_rows = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    return {
        "plain": (plain, plain_rows),
        "secure": (root / "secure", simulate(root / "secure", "secagg.enabled=true")),
    }


def adapter(out: Path, r: int) -> dict[str, np.ndarray]:
    return load_file(str(out / "rounds" / str(r) / "adapter_model.safetensors"))


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float]:
    """max |a - b| and the largest float32 ulp of b (the adapter's own rounding)."""
    assert set(a) == set(b)
    diff = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    ulp = max(float(np.spacing(np.abs(b[k])).max()) for k in b)
    return diff, ulp


def test_secure_rounds_give_the_plain_adapter_within_the_bound(runs):
    (plain, plain_rows), (secure, rows) = runs["plain"], runs["secure"]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sites"] == ["site-0", "site-1", "site-2"]
        assert row["secagg_dropped"] == {} and row["secagg_clipped"] == 0
        assert 0 < row["secagg_error_bound"] < 1e-7
    # Round 1 starts from the same adapter: only quantization (the bound) and float32 rounding.
    diff1, ulp1 = max_diff(adapter(secure, 1), adapter(plain, 1))
    assert diff1 <= rows[0]["secagg_error_bound"] + 2 * ulp1
    # Round 2 trains from round 1's (slightly different) adapter: differences pass through local
    # training, which is smooth, so they stay within a small multiple of the bounds.
    diff2, ulp2 = max_diff(adapter(secure, 2), adapter(plain, 2))
    bound = sum(r["secagg_error_bound"] for r in rows) + 2 * (ulp1 + ulp2)
    assert diff2 <= 20 * bound
    ratio = rows[-1]["bytes_up"] / plain_rows[-1]["bytes_up"]
    assert 0.5 < ratio < 1.2  # one flat masked vector + shares vs one array per LoRA module
    print(f"\nround 2 max |secagg - plain| {diff2:.3g} (bounds {bound:.3g}); bytes up x{ratio:.4f}")


def test_secure_run_learns_like_the_plain_one(runs):
    plain, secure = (json.loads((runs[k][0] / "summary.json").read_text()) for k in runs)
    assert all(loss is None for loss in secure["train_loss"])  # not private: not reported
    assert secure["final"]["loss"] == pytest.approx(plain["final"]["loss"], rel=1e-4)
