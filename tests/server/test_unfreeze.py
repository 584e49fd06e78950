"""Progressive unfreezing (`train.unfreeze`) across federated rounds: what trains in each round
follows the schedule at the sites and at the coordinator, and a resumed run continues it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from client.app import app as client_app
from client.train import make_optimizer, train_round
from common.core.adapters import TRAINED_FILE, attach_lora, stage_scales
from common.core.errors import ModelError
from common.core.models import load_base
from common.core.tasks import encode
from server.run import FederatedRun
from tests.client.test_train import records
from tests.server.inprocess import InProcessGrid, ServerKilled, kill_in_round
from tests.server.test_methods import _with
from tests.server.test_run import setup_run

# The head first; the top layer from round 2 at half the rate; everything from round 3.
SCHEDULE = [
    {"from_round": 1, "layers": "head"},
    {"from_round": 2, "layers": "top:1", "lr_scale": 0.5},
    {"from_round": 3, "layers": "all", "lr_scale": 0.25},
]
HEAD = ("lm_head.", "model.norm.")


def _part(key: str) -> str:
    if key.startswith(HEAD):
        return "head"
    if key.startswith("model.layers.1."):
        return "top"
    return "rest"  # layer 0 and the input embedding


def _cfg(tiny_cfg):
    return _with(tiny_cfg, lora={"method": "full"}, train={"unfreeze": SCHEDULE})


def test_stage_scales_follow_the_schedule(tiny_cfg):
    cfg = _cfg(tiny_cfg)
    names = list(dict(load_base(cfg.model, cfg.data.labels).model.named_parameters()))
    stages = cfg.train.unfreeze
    for round_no, expected in [
        (1, {"head": 1.0}),
        (2, {"head": 1.0, "top": 0.5}),
        (3, {"head": 1.0, "top": 0.5, "rest": 0.25}),
        (7, {"head": 1.0, "top": 0.5, "rest": 0.25}),
    ]:
        got = stage_scales(names, stages, 2, round_no)
        assert {_part(k) for k in got} == set(expected), round_no
        assert all(got[k] == expected[_part(k)] for k in got)


def test_site_trains_only_the_stage_at_its_rates_and_restores_the_rest(tiny_cfg, monkeypatch):
    import client.train as ct

    cfg = _cfg(tiny_cfg)
    loaded = load_base(cfg.model, cfg.data.labels)
    model = attach_lora(loaded.model, cfg.lora, cfg.model)
    made = []
    monkeypatch.setattr(
        ct, "make_optimizer", lambda m, c, s=None: made.append(make_optimizer(m, c, s)) or made[-1]
    )
    enc = encode(records(8), loaded.tokenizer, cfg)
    train = cfg.train.model_copy(update={"local_steps": 2, "lr": 1e-2})
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    train_round(model, enc, train, pad_id=0, round_idx=1, total_rounds=3, seed=0)  # round 2
    opt_params = {id(p): g["lr_scale"] for g in made[0].param_groups for p in g["params"]}
    for k, p in model.named_parameters():
        part = _part(k)
        assert (id(p) in opt_params) == (part != "rest"), k
        if part == "top":
            assert opt_params[id(p)] == 0.5
        moved = not np.array_equal(p.detach().numpy(), before[k].numpy())
        assert moved == (part != "rest"), k
        assert p.requires_grad  # the held-back weights train again in a later stage


def _saved(root: Path, round_no: int) -> dict[str, np.ndarray]:
    return load_file(str(root / "rounds" / str(round_no) / TRAINED_FILE))


def test_federated_rounds_follow_the_schedule_and_resume_continues_it(tiny_cfg, tmp_path):
    cfg, nodes = setup_run(_cfg(tiny_cfg), tmp_path, {"rounds": 3})
    base = {k: p.detach().numpy() for k, p in load_base(cfg.model, cfg.data.labels)
            .model.named_parameters()}  # fmt: skip
    grid = InProcessGrid(client_app, nodes)
    grid.fault = kill_in_round(3)
    with pytest.raises(ServerKilled):
        FederatedRun(cfg, tmp_path / "run", grid).execute()
    FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes), resume=True).execute()
    previous = base
    for round_no, moving in [(1, {"head"}), (2, {"head", "top"}), (3, {"head", "top", "rest"})]:
        state = _saved(tmp_path / "run", round_no)
        assert sorted(state) == sorted(base)  # the same tensors every round
        moved = {_part(k) for k in state if not np.array_equal(state[k], previous[k])}
        assert moved == moving, round_no
        previous = state


def test_a_schedule_that_trains_nothing_or_narrows_is_refused_naming_the_field(tiny_cfg):
    lora_cfg = tiny_cfg  # causal-LM LoRA: no head weights to train
    keys = ["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    head_only = _with(lora_cfg, train={"unfreeze": [{"from_round": 1, "layers": "head"}]})
    with pytest.raises(ModelError, match="`train.unfreeze`: nothing this method trains"):
        stage_scales(keys, head_only.train.unfreeze, 2, 1)
    narrowing = _with(
        lora_cfg,
        train={"unfreeze": [{"from_round": 1, "layers": "top:2"}, {"from_round": 2,
                                                                  "layers": "top:1"}]},
    )  # fmt: skip
    with pytest.raises(ModelError, match=r"`train.unfreeze\[1\].layers` = `top:1` trains less"):
        stage_scales(keys, narrowing.train.unfreeze, 2, 2)


def test_the_coordinator_holds_back_what_a_stage_freezes_under_institution_level_noise(
    tiny_cfg, tmp_path
):
    """Institution-level DP adds Gaussian noise to every coordinate of the sum, frozen ones
    included: the coordinator must keep what the stage holds back exactly as it was, or the
    noise alone would move weights the schedule has not unfrozen yet."""
    noisy = _with(
        _cfg(tiny_cfg),
        **{"privacy.institution": {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0,
                                   "noise_at": "server"}},
    )  # fmt: skip
    cfg, nodes = setup_run(noisy, tmp_path, {"rounds": 2, "min_sites": 3})
    base = {k: p.detach().numpy() for k, p in load_base(cfg.model, cfg.data.labels)
            .model.named_parameters()}  # fmt: skip
    FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes)).execute()
    previous = base
    for round_no, moving in [(1, {"head"}), (2, {"head", "top"})]:
        state = _saved(tmp_path / "run", round_no)
        moved = {_part(k) for k in state if not np.array_equal(state[k], previous[k])}
        assert moved == moving, round_no
        previous = state
