"""`train.cache_frozen`: the frozen layers run once per record, and training through the cache is
the training without it (plain and DP-SGD, encoder classifier and causal LM), reused across rounds
only while what it depends on is unchanged."""

from __future__ import annotations

import contextlib
import functools
import logging

import pytest
import torch
from torch import nn

import common.core.frozen as frozen
from client.dp import DPTrainer
from client.train import train_round
from common.core.adapters import attach_lora
from common.core.config import Config, RecordDPConfig, load_config
from common.core.models import load_base
from common.core.records import Record
from common.core.tasks import Encoded, batch_loss, collate, encode, evaluate
from common.privacy.accounting import GaussianAccountant, RecordPlan
from simulations.corpora import synthetic
from tests.conftest import SCENARIOS

LABELS = ["red", "green", "blue"]
# (architecture, task): an encoder classifier (padded right, pooled at [CLS]) and a causal LM
# (padded left, rotary positions): the two ways a batch is laid out.
MODELS = [("bert", "seq-cls"), ("llama", "causal-lm")]


def config(arch: str, task: str, *extra: str) -> Config:
    return load_config(
        SCENARIOS / "tiny.toml",
        [
            f"model.source=tiny:{arch}",
            f"model.task={task}",
            "model.tiny.num_layers=3",
            f"data.labels={LABELS}",
            "lora.layers=[-1]",
            "lora.target_modules=['query','value']"
            if arch == "bert"
            else "lora.target_modules=['q_proj','v_proj']",
            "train.optimizer=sgd",
            "train.lr=0.5",
            "train.batch_size=8",
            "train.local_steps=3",
            *extra,
        ],
    )


def model_for(cfg: Config) -> nn.Module:
    loaded = load_base(cfg.model, cfg.data.labels)
    model = attach_lora(loaded.model, cfg.lora, cfg.model)
    for m in model.modules():  # the cache is the eval-mode pass: compare without dropout
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


@functools.cache
def examples(arch: str, task: str) -> list[Encoded]:
    cfg = config(arch, task)
    rows = synthetic(n_train=24, n_test=1, seed=3).train
    recs = [
        Record([{"role": "user", "content": r["text"]}], r["label"], r["label"], "t") for r in rows
    ]
    return encode(recs, load_base(cfg.model, cfg.data.labels).tokenizer, cfg)


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_rounds(cfg: Config, model: nn.Module, data: list[Encoded], rounds: int = 2) -> None:
    for r in range(rounds):
        train_round(model, data, cfg.train, pad_id=0, round_idx=r, total_rounds=rounds, seed=r)


@pytest.fixture(autouse=True)
def empty_cache():
    frozen._CACHE.clear()
    yield
    frozen._CACHE.clear()


@pytest.mark.parametrize(("arch", "task"), MODELS)
def test_training_through_the_cache_is_training_without_it(arch, task, monkeypatch, caplog):
    data = examples(arch, task)
    calls = []
    real = frozen.prefix_states
    monkeypatch.setattr(frozen, "prefix_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain, cached = model_for(config(arch, task)), model_for(config(arch, task))
    start = trained(plain)
    run_rounds(config(arch, task), plain, data)
    with caplog.at_level(logging.INFO, logger="common.core.frozen"):
        run_rounds(config(arch, task, "train.cache_frozen=true"), cached, data)
    want, got = trained(plain), trained(cached)
    assert any(not torch.equal(want[k], start[k]) for k in want)  # it trained
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    # the 2 frozen layers ran once for both rounds; the model is whole again afterwards
    assert calls == [1]
    assert "the 2 frozen layers below the lowest trained one ran once" in caplog.text
    assert not any(isinstance(m, frozen.PassThrough) for m in cached.modules())


@pytest.mark.parametrize(("arch", "task"), MODELS)
def test_dp_sgd_through_the_cache_is_dp_sgd_without_it(arch, task):
    """Same Poisson draws and noise (a test seed), clipping active: every record's gradient goes
    through the cache exactly as it would without it."""
    data = examples(arch, task)
    cfg = config(arch, task, "train.cache_frozen=true")
    dp_cfg = RecordDPConfig(enabled=True, noise_multiplier=0.7, max_grad_norm=0.05)
    models = {}
    for use_cache in (False, True):
        model = models[use_cache] = model_for(cfg)
        records: list[Encoded] = data
        prefix = None
        if use_cache:
            records, prefix = frozen.with_cache(model, data, 0, [])
            assert prefix is not None and prefix.skip == 2
        plan = RecordPlan(len(data), 0.5, 12, 1, 1, 0.7, dp_cfg.max_grad_norm, 1e-5, 0.0)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        skip = frozen.skipping(model, prefix) if prefix else contextlib.nullcontext()
        with (
            skip,
            DPTrainer(
                model, opt, dp_cfg, plan, GaussianAccountant(), physical_batch_size=5, seed=11
            ) as dp,
        ):
            for _ in range(2):
                dp.step(records, functools.partial(collate, pad_id=0))
    want, got = trained(models[False]), trained(models[True])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_the_cache_is_rebuilt_when_a_held_back_weight_below_changes(monkeypatch):
    """A `train.unfreeze` stage holds back a lower layer's adapter (trained in an earlier stage,
    exchanged every round): when the coordinator's model changes it, the cache must follow."""
    data = examples("llama", "causal-lm")
    model = model_for(config("llama", "causal-lm", "lora.layers=[]"))
    held = [p for n, p in model.named_parameters() if p.requires_grad and ".layers.2." not in n]
    for p in held:  # the stage trains layer 2 only
        p.requires_grad_(False)
    calls = []
    real = frozen.prefix_states
    monkeypatch.setattr(frozen, "prefix_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    below = next(p for n, p in model.named_parameters() if ".layers.0." in n and "lora_B" in n)
    old, _ = frozen.with_cache(model, data, 0, held)
    frozen.with_cache(model, data, 0, held)
    assert calls == [1]
    with torch.no_grad():
        below.add_(0.5)
    records, prefix = frozen.with_cache(model, data, 0, held)
    assert calls == [1, 1] and prefix is not None
    # and the new states are the new model's
    fresh = frozen.prefix_states(model, prefix, data[:2], 0)
    for a, b, was in zip(fresh, records[:2], old[:2], strict=True):
        torch.testing.assert_close(b.hidden, a, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(b.hidden, was.hidden, atol=1e-3)


def test_not_used_when_the_lowest_layer_trains(caplog):
    cfg = config("llama", "causal-lm", "lora.layers=[]", "train.cache_frozen=true")
    model = model_for(cfg)
    data = examples("llama", "causal-lm")
    with caplog.at_level(logging.INFO, logger="common.core.frozen"):
        out, prefix = frozen.with_cache(model, data, 0, [])
    assert prefix is None and out is data
    assert "not used (the lowest layer trains)" in caplog.text


def test_a_cache_that_does_not_reproduce_the_model_is_not_used(monkeypatch, caplog):
    """The self-check: states that do not give the full model's logits are refused, and the round
    trains without them (here: the same as without the cache at all)."""
    data = examples("bert", "seq-cls")
    real = frozen.prefix_states
    monkeypatch.setattr(frozen, "prefix_states", lambda *a, **k: [s + 1.0 for s in real(*a, **k)])
    plain, cached = model_for(config("bert", "seq-cls")), model_for(config("bert", "seq-cls"))
    run_rounds(config("bert", "seq-cls"), plain, data, rounds=1)
    with caplog.at_level(logging.WARNING, logger="common.core.frozen"):
        run_rounds(config("bert", "seq-cls", "train.cache_frozen=true"), cached, data, rounds=1)
    assert "does not reproduce this model's" in caplog.text
    assert not frozen._CACHE
    want, got = trained(plain), trained(cached)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_cache_frozen_with_several_workers_is_refused():
    with pytest.raises(
        Exception, match=r"`train.cache_frozen` is not supported with `train.workers` = 2"
    ):
        config("llama", "causal-lm", "train.cache_frozen=true", "train.workers=2")


@pytest.mark.parametrize(("arch", "task"), MODELS)
def test_evaluation_through_the_cache_gives_the_same_figures(arch, task, monkeypatch):
    rows = synthetic(n_train=1, n_test=20, seed=4).test
    recs = [
        Record([{"role": "user", "content": r["text"]}], r["label"], r["label"], "t") for r in rows
    ]
    cfg = config(arch, task)
    loaded = load_base(cfg.model, cfg.data.labels)
    model = attach_lora(loaded.model, cfg.lora, cfg.model)
    with torch.no_grad():  # a trained-looking adapter and head, so the figures mean something
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    want = evaluate(model, loaded.tokenizer, recs, cfg, 7)
    calls = []
    real = frozen.prefix_states
    monkeypatch.setattr(frozen, "prefix_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = config(arch, task, "train.cache_frozen=true")
    for _ in range(2):  # the second evaluation reuses the states
        got = evaluate(model, loaded.tokenizer, recs, fast, 7)
        assert got["accuracy"] == want["accuracy"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert calls == [1]


def test_the_cache_outlives_the_process_in_the_sites_folder(tmp_path, monkeypatch, caplog):
    """Flower's Deployment Engine runs every round in a new process: the states are kept in the
    site's state folder (its user only), read back instead of recomputed, and a torn file is
    rebuilt, never trusted."""
    data = examples("bert", "seq-cls")
    model = model_for(config("bert", "seq-cls"))
    folder = tmp_path / "frozen-cache"
    built, prefix = frozen.with_cache(model, data, 0, [], folder)
    assert prefix is not None
    (saved,) = folder.glob("*.safetensors")
    assert folder.stat().st_mode & 0o777 == 0o700 and saved.stat().st_mode & 0o777 == 0o600

    calls = []
    monkeypatch.setattr(frozen, "prefix_states", lambda *a, **k: calls.append(1) or [])
    frozen._CACHE.clear()  # a new process
    with caplog.at_level(logging.INFO, logger="common.core.frozen"):
        again, prefix = frozen.with_cache(model, data, 0, [], folder)
    assert calls == [] and prefix is not None
    assert "were read from the site's cache" in caplog.text
    assert all(torch.equal(a.hidden, b.hidden) for a, b in zip(again, built, strict=True))

    saved.write_bytes(saved.read_bytes()[:100])  # torn
    frozen._CACHE.clear()
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="common.core.frozen"):
        rebuilt, prefix = frozen.with_cache(model, data, 0, [], folder)
    assert "unreadable" in caplog.text and prefix is not None
    assert all(torch.equal(a.hidden, b.hidden) for a, b in zip(rebuilt, built, strict=True))
    # one file per record set, the newest few kept
    for n in range(frozen.FILES_KEPT + 2):
        frozen.with_cache(model, data[: n + 2], 0, [], folder)
    assert len(list(folder.glob("*.safetensors"))) == frozen.FILES_KEPT


def test_a_bfloat16_model_caches_in_its_own_dtype():
    cfg = config("llama", "causal-lm", "model.dtype=bfloat16", "train.cache_frozen=true")
    model = model_for(cfg)
    data = examples("llama", "causal-lm")
    records, prefix = frozen.with_cache(model, data, 0, [])
    assert prefix is not None and records[0].hidden.dtype == torch.bfloat16
    start = trained(model)
    run_rounds(cfg, model, data, rounds=1)
    assert any(not torch.equal(p, start[k]) for k, p in trained(model).items())


def test_the_check_ignores_a_causal_lms_padding():
    """Left padding: the full model runs the pad tokens through every layer, the cache holds
    zeros there; those positions' logits are nobody's and must not fail the check (they did
    on SmolLM2, which then trained without the cache)."""
    cfg = config("llama", "causal-lm")
    model = model_for(cfg)
    with torch.no_grad():  # a pad token whose states differ wildly from the cache's zeros
        model.get_input_embeddings().weight[0].fill_(5.0)
    data = examples("llama", "causal-lm")
    assert len({len(e.input_ids) for e in data[: frozen.CHECK_RECORDS]}) > 1
    _, prefix = frozen.with_cache(model, data, 0, [])
    assert prefix is not None


def test_the_final_norm_trains_under_dp_sgd_through_the_cache():
    """`lora.train_final_norm`: the norm sits above every layer, so the layers below the adapted
    one are still skipped; its per-record gradients are clipped with the adapter's (no noise
    here, so the step's size shows the clipping: a norm left out of it would step far past the
    bound, as the plain step below does)."""
    data = examples("llama", "causal-lm")
    cfg = config("llama", "causal-lm", "train.cache_frozen=true", "lora.train_final_norm=true")
    clip, lr = 0.05, 0.5
    steps = {}
    for private in (False, True):
        model = model_for(cfg)
        records, prefix = frozen.with_cache(model, data, 0, [])
        assert prefix is not None and prefix.skip == 2
        before = trained(model)
        norm = next(k for k in before if k.endswith("model.norm.modules_to_save.default.weight"))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        with frozen.skipping(model, prefix):
            if private:
                dp_cfg = RecordDPConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=clip)
                plan = RecordPlan(len(data), 1.0, len(data), 1, 1, 0.0, clip, 1e-5, 0.0)
                with DPTrainer(
                    model, opt, dp_cfg, plan, GaussianAccountant(), physical_batch_size=5, seed=1
                ) as dp:
                    dp.step(records, functools.partial(collate, pad_id=0))
            else:
                loss, _ = batch_loss(model, collate(records, pad_id=0))
                loss.backward()
                opt.step()
        after = trained(model)
        assert not torch.equal(after[norm], before[norm])
        steps[private] = torch.cat([(after[k] - before[k]).flatten() for k in before]).norm()
    # sampling rate 1: every record in the batch; the mean of clipped gradients is within clip
    assert steps[True] <= lr * clip * (1 + 1e-4)
    assert steps[False] > 4 * lr * clip


@pytest.mark.parametrize(("arch", "task"), MODELS)
def test_records_run_in_batches_of_similar_length_and_come_back_in_order(arch, task):
    """The pass sorts records by length (less padding) and puts each one's states back at its
    own place: the same states as each record run alone."""
    data = examples(arch, task)
    lengths = [len(e.input_ids) for e in data]
    assert len(set(lengths)) > 3 and lengths != sorted(lengths)  # the order does change
    model = model_for(config(arch, task))
    prefix, why = frozen.plan(model)
    assert prefix is not None, why
    batched = frozen.prefix_states(model, prefix, data, 0, batch_size=5)
    for e, states in zip(data, batched, strict=True):
        (alone,) = frozen.prefix_states(model, prefix, [e], 0, batch_size=1)
        assert states.shape == (len(e.input_ids), alone.size(-1))
        torch.testing.assert_close(states, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("arch", "task"), MODELS)
def test_a_bfloat16_pass_keeps_float32_states_close_to_the_exact_ones(arch, task, caplog):
    """`train.cache_precision = "bf16"`: the frozen layers run under bfloat16 autocast, the
    states come back in float32, within the check's bound of the float32 pass and not equal to
    it (bfloat16 did run); a round through them trains close to one through exact states."""
    data = examples(arch, task)
    exact_cfg = config(arch, task, "train.cache_frozen=true")
    half_cfg = config(arch, task, "train.cache_frozen=true", "train.cache_precision=bf16")
    model = model_for(exact_cfg)
    prefix, why = frozen.plan(model)
    assert prefix is not None, why
    exact = frozen.prefix_states(model, prefix, data, 0)
    with caplog.at_level(logging.WARNING, logger="common.core.frozen"):
        half, used = frozen.with_cache(model, data, 0, [], precision="bf16")
    assert used is not None and "does not reproduce" not in caplog.text
    gaps = []
    for e, want in zip(half, exact, strict=True):
        assert e.hidden.dtype == torch.float32 and e.hidden.shape == want.shape
        gaps.append(float((e.hidden - want).norm() / want.norm()))
    assert 0 < max(gaps) <= frozen.CLOSE["bf16"], gaps
    # the two precisions never share a cache entry
    again, _ = frozen.with_cache(model, data, 0, [])
    assert all(torch.equal(a.hidden, b) for a, b in zip(again, exact, strict=True))
    assert len(frozen._CACHE) == 2

    steps = {}
    for name, cfg in (("exact", exact_cfg), ("half", half_cfg)):
        m = model_for(cfg)
        start = trained(m)
        run_rounds(cfg, m, data, rounds=1)
        steps[name] = torch.cat([(p - start[k]).flatten() for k, p in trained(m).items()])
    assert steps["exact"].norm() > 0
    assert (steps["half"] - steps["exact"]).norm() <= 0.1 * steps["exact"].norm()


def test_a_saved_file_from_a_bfloat16_pass_is_not_taken_for_an_exact_one(tmp_path, caplog):
    """A file whose states are not the frozen layers' float32 output (here: a bfloat16 pass's,
    saved under the float32 cache's name) is refused by the check and rebuilt, never trained
    on."""
    data = examples("bert", "seq-cls")
    model = model_for(config("bert", "seq-cls"))
    folder = tmp_path / "frozen-cache"
    frozen.with_cache(model, data, 0, [], folder)
    (saved,) = folder.glob("*.safetensors")
    frozen.with_cache(model, data, 0, [], tmp_path / "other", "bf16")
    (forged,) = (tmp_path / "other").glob("*.safetensors")
    saved.write_bytes(forged.read_bytes())
    frozen._CACHE.clear()  # a new process
    with caplog.at_level(logging.WARNING, logger="common.core.frozen"):
        records, prefix = frozen.with_cache(model, data, 0, [], folder)
    assert "does not reproduce this model's output" in caplog.text
    assert "of their norm away" in caplog.text
    assert prefix is None and records is data


def test_auto_precision_is_bfloat16_only_where_the_cpu_has_bfloat16_instructions(monkeypatch):
    model = torch.nn.Linear(2, 2)
    for fast, chosen in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda f=fast: f)
        assert frozen.resolve_precision(model, "auto") == chosen
        assert frozen.resolve_precision(model, "fp32") == "fp32"  # a choice is kept as given
        assert frozen.resolve_precision(model, "bf16") == "bf16"


def test_under_dp_whether_the_cache_is_used_never_depends_on_the_records():
    """A coordinator crafts the model so that one token overflows (its embedding Inf). Without
    DP the check runs on the site's first records: it refuses the cache when such a record is
    among them and takes it otherwise, so one record would decide whether every record's frozen
    layers run with dropout. Under DP (`private`) it runs on public stand-ins: one decision
    whichever records the site holds (the poisoned record then drops as non-finite in DP-SGD)."""
    data = examples("bert", "seq-cls")
    model = model_for(config("bert", "seq-cls"))
    stand_ins = frozen.probes(data, model, 0)
    used = {t for e in [*data, *stand_ins] for t in e.input_ids}
    poison = next(t for t in range(5, 250) if t not in used)
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("inf")
    first = data[0]
    poisoned = [Encoded([first.input_ids[0], poison, *first.input_ids[1:]], 0), *data[1:]]

    def decided(records: list[Encoded], private: bool) -> bool:
        frozen._CACHE.clear()
        _, prefix = frozen.with_cache(model, records, 0, [], private=private)
        return prefix is not None

    assert decided(data, private=False) and not decided(poisoned, private=False)  # the attack
    assert decided(data, private=True) and decided(poisoned, private=True)
    # the stand-ins are public: the same for any records of the task, none of them a record
    assert [e.input_ids for e in frozen.probes(data[3:], model, 0)] == [
        e.input_ids for e in stand_ins
    ]
    assert not {tuple(e.input_ids) for e in stand_ins} & {tuple(e.input_ids) for e in data}


def test_a_dp_round_checks_its_cache_on_the_stand_ins(monkeypatch):
    """The training loop passes the stepper's `private`: a DP-SGD round (DPStepper) checks the
    cache on the public stand-ins, a plain round on its records."""
    from client.dp import DPStepper

    data = examples("bert", "seq-cls")
    cfg = config("bert", "seq-cls", "train.cache_frozen=true", "train.local_steps=1")
    calls: list[int] = []
    real = frozen.probes
    monkeypatch.setattr(frozen, "probes", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_rounds(cfg, model_for(cfg), data, rounds=1)
    assert not calls
    frozen._CACHE.clear()
    plan = RecordPlan(len(data), 0.5, 12, 1, 1, 0.7, 0.05, 1e-5, 0.0)
    dp_cfg = RecordDPConfig(enabled=True, noise_multiplier=0.7, max_grad_norm=0.05)
    stepper = DPStepper(dp_cfg, plan, GaussianAccountant(), width=cfg.model.max_length)
    train_round(model_for(cfg), data, cfg.train, pad_id=0, round_idx=0, total_rounds=1, seed=0,
                stepper=stepper)  # fmt: skip
    assert calls == [1]
