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
}


def _with(cfg, **sections):
    data = cfg.model_dump(mode="json", exclude_none=True)
    for section, fields in sections.items():
        node = data
        for part in section.split("."):
            node = node.setdefault(part, {})
        node.update(fields)
    return build_config(data)


def _round(cfg, root: Path, secure: bool) -> tuple[dict, dict[str, np.ndarray]]:
    if secure:
        cfg = _with(cfg, secagg={"enabled": True})
    cfg, nodes = setup_run(cfg, root, {"rounds": 1})
    grid = InProcessGrid(client_app, nodes)
    if secure:
        give_identities(grid, nodes)
    summary = FederatedRun(cfg, root / "run", grid).execute()
    return summary, load_file(str(root / "run" / "rounds" / "1" / "adapter_model.safetensors"))


# `lora` plain vs secure: tests/server/test_secagg_round.py (against a numpy reference).
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_each_method_round_trips_plain_and_under_secure_aggregation(tiny_cfg, tmp_path, method):
    cfg = _with(tiny_cfg, lora={"method": method, "target_modules": "auto"})
    plain_summary, plain = _round(cfg, tmp_path / "plain", secure=False)
    _, secure = _round(cfg, tmp_path / "secure", secure=True)
    sent = sorted(k for k in plain if not k.endswith("lora_A.weight"))
    assert sent and all(k.endswith(SENT[method]) for k in sent), sent
    assert all(any(k.endswith(s) for k in sent) for s in SENT[method])
    start = 1.0 if method == "ia3" else 0.0  # B starts at 0, DoRA's magnitudes at |W|, IA3 at 1
    assert any(np.abs(plain[k] - start).max() > 1e-4 for k in sent if "magnitude" not in k)
    for k in sent:  # the same sites' updates, summed in the clear or masked and quantized
        np.testing.assert_allclose(secure[k], plain[k], atol=1e-4, err_msg=k)
    size = sum(plain[k].size for k in sent)
    assert plain_summary["bytes_up"][0] >= 3 * 4 * size  # 3 sites, float32: the method's bytes


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_methods_without_per_record_gradients_are_refused_under_record_level_dp(tiny_cfg, method):
    """Opacus has no per-record gradients for PEFT's DoRA and IA3 layers (a round fails in the
    hooks): the config is refused before anything runs, naming both fields."""
    refused = rf'`lora.method` = "{method}" is not supported with record-level DP'
    with pytest.raises(ConfigError, match=refused):
        _with(
            tiny_cfg,
            lora={"method": method},
            **{"privacy.record": {"enabled": True, "target_epsilon": 8.0}},
        )
