"""Local training lowers the loss on a tiny model; the schedule and data order behave."""

import itertools

import numpy as np
import pytest

from client.train import batches, lr_factor, make_optimizer, train_round
from common.core.adapters import attach_lora
from common.core.config import TrainConfig
from common.core.models import load_base
from common.core.records import Record
from common.core.tasks import encode, evaluate
from simulations.corpora import synthetic


def records(n: int, seed: int = 0) -> list[Record]:
    rows = synthetic(n_train=n, n_test=1, seed=seed).train
    return [
        Record([{"role": "user", "content": r["text"]}], r["label"], r["label"], "t") for r in rows
    ]


def test_one_site_training_lowers_its_loss(tiny_cfg):
    loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
    model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
    data = records(64)
    before = evaluate(model, loaded.tokenizer, data, tiny_cfg)
    cfg = tiny_cfg.train.model_copy(update={"local_steps": 30, "lr": 2e-2})
    result = train_round(
        model,
        encode(data, loaded.tokenizer, tiny_cfg),
        cfg,
        pad_id=0,
        round_idx=0,
        total_rounds=1,
        seed=0,
    )
    after = evaluate(model, loaded.tokenizer, data, tiny_cfg)
    assert result.steps == 30 and np.isfinite(result.loss)
    assert after["loss"] < before["loss"] - 1.0, (before, after)


def test_training_is_reproducible_for_a_seed(tiny_cfg):
    def run():
        loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
        model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
        enc = encode(records(16), loaded.tokenizer, tiny_cfg)
        return train_round(
            model, enc, tiny_cfg.train, pad_id=0, round_idx=0, total_rounds=1, seed=7
        ).loss

    assert run() == run()


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(warmup_steps=4, schedule="cosine")
    factors = [lr_factor(s, 20, cfg) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert factors[-1] < 0.05
    assert lr_factor(10, 20, TrainConfig(schedule="constant")) == 1.0


def test_no_weight_decay_on_biases_and_norms(tiny_cfg):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_accumulation_splits_each_step_into_micro_batches(tiny_cfg):
    loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
    enc = encode(records(10), loaded.tokenizer, tiny_cfg)
    cfg = TrainConfig(batch_size=8, grad_accum=4)
    steps = batches(enc, cfg, seed=0, pad_id=0, steps=3)
    assert len(steps) == 3 and all(len(s) == 4 for s in steps)
    assert all(mb["input_ids"].shape[0] == 2 for s in steps for mb in s)


def test_fedprox_adds_mu_times_the_drift_to_each_step(tiny_cfg):
    """Two SGD steps from the same weights and batches, with and without FedProx: the first step
    is the same (no drift yet), the second differs by exactly -lr * mu * (w1 - w0)."""
    import torch

    lr, mu = 0.1, 0.5

    def weights_after(steps: int, proximal_mu: float) -> list[torch.Tensor]:
        loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
        model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
        enc = encode(records(16), loaded.tokenizer, tiny_cfg)
        cfg = TrainConfig(
            optimizer="sgd", lr=lr, local_steps=steps, schedule="constant", batch_size=8,
            proximal_mu=proximal_mu,
        )  # fmt: skip
        train_round(model, enc, cfg, pad_id=0, round_idx=0, total_rounds=1, seed=3)
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
    start = [
        p.detach().clone()
        for p in attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model).parameters()
        if p.requires_grad
    ]
    w1 = weights_after(1, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(w1, weights_after(1, mu), strict=True))
    plain, prox = weights_after(2, 0.0), weights_after(2, mu)
    moved = False
    for p0, p1, a, b in zip(start, w1, plain, prox, strict=True):
        torch.testing.assert_close(b - a, -lr * mu * (p1 - p0), rtol=1e-4, atol=1e-7)
        moved |= bool((p1 - p0).abs().max() > 1e-4)
    assert moved  # the first step moved the weights, so the proximal term was not zero


def test_layer_wise_rates_and_no_decay_groups_match_the_config(tiny_cfg, monkeypatch):
    """`train.layer_lr_decay`: layer i of n at lr * decay^(n-1-i), top layer at lr; biases and
    norms without weight decay; the schedule scales every group and keeps their ratios."""
    import client.train as ct

    loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
    model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
    n = loaded.model.config.num_hidden_layers
    cfg = TrainConfig(lr=0.1, layer_lr_decay=0.5, weight_decay=0.01, warmup_steps=2, local_steps=1)
    opt = make_optimizer(model, cfg)
    names = {id(p): name for name, p in model.named_parameters()}
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            layer = int(names[id(p)].split(".layers.")[1].split(".")[0])
            assert group["lr"] == pytest.approx(0.1 * 0.5 ** (n - 1 - layer)), names[id(p)]
            assert group["weight_decay"] == (0.0 if p.ndim < 2 else 0.01)
            seen += 1
    assert seen == sum(p.requires_grad for p in model.parameters())
    assert {g["lr_scale"] for g in opt.param_groups} == {0.5**k for k in range(n)}

    made = []
    monkeypatch.setattr(
        ct, "make_optimizer", lambda m, c, s=None: made.append(make_optimizer(m, c, s)) or made[-1]
    )
    enc = encode(records(8), loaded.tokenizer, tiny_cfg)
    ct.train_round(model, enc, cfg, pad_id=0, round_idx=0, total_rounds=1, seed=0)
    for group in made[0].param_groups:  # warmup step 1 of 2: factor 0.5 on every group
        assert group["lr"] == pytest.approx(0.1 * 0.5 * group["lr_scale"])


def test_full_fine_tuning_rates_run_from_the_embeddings_to_the_head():
    """`full` on a BERT classifier with `train.layer_lr_decay`: the head and the top layer at
    `train.lr`, layer i of n at decay^(n-1-i), the embeddings (below every layer) at decay^n;
    biases and LayerNorm weights (BERT names them `LayerNorm`) without weight decay."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from common.core.config import LoraConfig, ModelConfig

    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=32, num_labels=3)
    )  # fmt: skip
    model = attach_lora(
        bert, LoraConfig(method="full"), ModelConfig(source="tiny:bert", max_length=32)
    )
    opt = make_optimizer(model, TrainConfig(lr=1.0, layer_lr_decay=0.5, weight_decay=0.01))
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(rate) == len(params)
    expected = {
        "classifier.weight": 1.0,
        "bert.pooler.dense.weight": 1.0,
        "bert.encoder.layer.2.attention.self.query.weight": 1.0,
        "bert.encoder.layer.0.output.dense.weight": 0.25,
        "bert.embeddings.word_embeddings.weight": 0.125,
        "bert.embeddings.position_embeddings.weight": 0.125,
    }
    for name, lr in expected.items():
        assert rate[id(params[name])] == pytest.approx(lr), name
    for name, p in params.items():
        bias_or_norm = name.endswith(".bias") or "LayerNorm" in name
        assert decay[id(p)] == (0.0 if bias_or_norm else 0.01), name


def test_peft_scaling_vectors_and_virtual_tokens_get_no_weight_decay(tiny_cfg):
    """IA3's scalings start at 1 and prompt tuning's virtual tokens are inputs: decaying them
    towards 0 would not pull the model towards its base."""
    from common.core.config import LoraConfig

    loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
    ia3 = attach_lora(loaded.model, LoraConfig(method="ia3"), tiny_cfg.model)
    opt = make_optimizer(ia3, TrainConfig(weight_decay=0.1))
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) > 0

    loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
    prompt = attach_lora(loaded.model, LoraConfig(method="prompt"), tiny_cfg.model)
    opt = make_optimizer(prompt, TrainConfig(weight_decay=0.1))
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_gradient_checkpointing_trains_the_same_and_is_switched_off_after(tiny_cfg):
    import torch

    def trained(checkpointing: bool):
        loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
        model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
        enc = encode(records(16), loaded.tokenizer, tiny_cfg)
        cfg = TrainConfig(
            local_steps=3, batch_size=8, lr=1e-2, gradient_checkpointing=checkpointing
        )
        seen = []
        layer = loaded.model.model.layers[0]
        hook = layer.register_forward_pre_hook(
            lambda mod, _args: seen.append(mod.gradient_checkpointing and mod.training)
        )
        train_round(model, enc, cfg, pad_id=0, round_idx=0, total_rounds=1, seed=5)
        hook.remove()
        assert not loaded.model.is_gradient_checkpointing  # switched off after the round
        return [p.detach().clone() for p in model.parameters() if p.requires_grad], seen

    plain, plain_seen = trained(False)
    ckpt, ckpt_seen = trained(True)
    assert plain_seen == [False] * 3 and ckpt_seen == [True] * 3  # on for every training step
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_with_record_level_dp_is_refused_naming_the_fields():
    from common.core.config import build_config
    from common.core.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="train.gradient_checkpointing"):
        build_config(
            {
                "train": {"gradient_checkpointing": True},
                "privacy": {"record": {"enabled": True, "target_epsilon": 8.0}},
            }
        )


def test_bf16_runs_the_passes_in_bfloat16_and_keeps_weights_and_loss_float32(tiny_cfg):
    """`train.precision = "bf16"`: the layers compute in bfloat16 (seen from a forward hook), the
    trained weights stay float32, and the update is the fp32 one up to bfloat16 rounding."""
    import torch

    def trained(precision: str):
        loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
        model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
        enc = encode(records(16), loaded.tokenizer, tiny_cfg)
        cfg = TrainConfig(local_steps=3, batch_size=8, lr=1e-2, precision=precision)
        start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        dtypes: list[torch.dtype] = []
        proj = loaded.model.model.layers[0].self_attn.q_proj.base_layer
        hook = proj.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
        result = train_round(model, enc, cfg, pad_id=0, round_idx=0, total_rounds=1, seed=5)
        hook.remove()
        after = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in after)
        assert np.isfinite(result.loss)
        return torch.cat([(b - a).flatten() for a, b in zip(start, after, strict=True)]), dtypes

    full, full_types = trained("fp32")
    half, half_types = trained("bf16")
    assert set(full_types) == {torch.float32} and set(half_types) == {torch.bfloat16}
    assert not torch.equal(full, half)  # it did run in bfloat16
    cosine = torch.nn.functional.cosine_similarity(full, half, dim=0)
    assert cosine > 0.98, cosine  # the same update, up to rounding


def test_fp16_on_cpu_and_mixed_precision_with_record_level_dp_are_refused(tiny_cfg):
    import torch

    from common.core.config import build_config
    from common.core.errors import ConfigError, ModelError

    loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
    model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
    enc = encode(records(8), loaded.tokenizer, tiny_cfg)
    cfg = TrainConfig(local_steps=1, batch_size=4, precision="fp16")
    with pytest.raises(ModelError, match='`train.precision` = "fp16" needs a CUDA device'):
        train_round(model, enc, cfg, pad_id=0, round_idx=0, total_rounds=1, seed=0)
    with pytest.raises((ConfigError, ValueError), match='`train.device` = "cuda" is not supported'):
        build_config({"train": {"device": "cuda"}})  # never a silent fall-back to CPU
    # the experimental multi-GPU path: refused at a site without a GPU per worker, before any
    # worker starts
    from client.parallel import train_site_round, worker_device

    gpus = TrainConfig(local_steps=1, batch_size=4, workers=2, device="cuda")
    assert worker_device(gpus, 1) == ("nccl", torch.device("cuda:1"))
    assert worker_device(TrainConfig(workers=2), 1) == ("gloo", torch.device("cpu"))
    if torch.cuda.device_count() < 2:
        with pytest.raises(ModelError, match=r'`train.device` = "cuda" with `train.workers` = 2'):
            train_site_round(model, enc, gpus, pad_id=0, round_idx=0, total_rounds=1, seed=0)
    with pytest.raises((ConfigError, ValueError), match='`train.precision` = "bf16" is not'):
        build_config(
            {
                "train": {"precision": "bf16"},
                "privacy": {"record": {"enabled": True, "target_epsilon": 8.0}},
            }
        )


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_gloo_workers_train_as_one_process_on_the_same_batches(tiny_cfg, grad_accum):
    """`train.workers = 2`: two forked processes (torch.distributed, gloo) split every
    micro-batch; the round's update and losses equal the single process's on the same batches."""
    import torch

    from client.parallel import train_site_round

    def trained(workers: int):
        loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
        model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
        enc = encode(records(24), loaded.tokenizer, tiny_cfg)
        cfg = TrainConfig(local_steps=3, batch_size=8, grad_accum=grad_accum, lr=1e-2,
                          workers=workers, threads=1)  # fmt: skip
        start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        result = train_site_round(model, enc, cfg, pad_id=0, round_idx=0, total_rounds=1, seed=3)
        after = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        return start, after, result

    start, one, single = trained(1)
    _, two, parallel = trained(2)
    assert any(not torch.equal(a, b) for a, b in zip(start, one, strict=True))
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert parallel.loss == pytest.approx(single.loss, rel=1e-5)
    assert parallel.steps == single.steps == 3 and parallel.examples == single.examples


def test_a_worker_that_dies_without_reporting_fails_the_round_instead_of_hanging(
    tiny_cfg, monkeypatch
):
    """Rank 1 dies before it joins the process group (as if killed for memory): rank 0 would
    wait for it there for torch's default 30 minutes; the site's round fails at once instead,
    naming the worker and its exit code."""
    import os

    import client.parallel as cp
    from common.core.errors import ModelError

    real = cp.dist.init_process_group

    def dies_on_rank_1(*args, rank: int, **kwargs):
        if rank == 1:
            os._exit(9)
        return real(*args, rank=rank, **kwargs)

    monkeypatch.setattr(cp.dist, "init_process_group", dies_on_rank_1)  # the forks inherit it
    loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
    model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
    enc = encode(records(8), loaded.tokenizer, tiny_cfg)
    cfg = TrainConfig(local_steps=2, batch_size=4, workers=2, threads=1)
    with pytest.raises(ModelError, match="worker 1 exited with code 9"):
        cp.train_site_round(model, enc, cfg, pad_id=0, round_idx=0, total_rounds=1, seed=0)


def test_workers_with_record_level_dp_are_refused_naming_the_fields():
    from common.core.config import build_config
    from common.core.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="`train.workers` = 2 is not supported"):
        build_config(
            {
                "train": {"workers": 2},
                "privacy": {"record": {"enabled": True, "target_epsilon": 8.0}},
            }
        )


def test_partial_by_fraction_trains_the_fewest_top_layers_holding_it():
    """`lora.method = "partial"` with `lora.fraction`: the head and final norm, then whole
    layers from the top until the trained weights reach the fraction of the model's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.core.config import LoraConfig, ModelConfig

    def trained_layers(fraction: float) -> tuple[set[int], float]:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=64, vocab_size=128,
                          tie_word_embeddings=False)  # fmt: skip
        model = attach_lora(LlamaForCausalLM(cfg), LoraConfig(method="partial", fraction=fraction),
                            ModelConfig(source="tiny:llama"))  # fmt: skip
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        layers = {int(k.split(".layers.")[1].split(".")[0]) for k in names if ".layers." in k}
        total = sum(p.numel() for p in model.parameters())
        share = sum(p.numel() for p in model.parameters() if p.requires_grad) / total
        assert "lm_head.weight" in names and "model.norm.weight" in names
        assert "model.embed_tokens.weight" not in names
        return layers, share

    # head + norm alone hold 4,128 of 49,440 weights (8%); each layer 10,304 (21%)
    assert trained_layers(0.05) == (set(), pytest.approx(4128 / 49440))
    layers, share = trained_layers(0.25)
    assert layers == {3} and share >= 0.25
    layers, share = trained_layers(0.5)
    assert layers == {2, 3} and share >= 0.5


def test_head_trains_a_classifiers_head_alone_and_refuses_layers_and_causal_lms():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from common.core.config import LoraConfig, ModelConfig
    from common.core.errors import ModelError

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, vocab_size=128,
                      tie_word_embeddings=False, num_labels=3, pad_token_id=0)  # fmt: skip
    seq_cls = ModelConfig(task="seq-cls")
    model = attach_lora(LlamaForSequenceClassification(cfg), LoraConfig(method="head"), seq_cls)
    assert sorted(k for k, p in model.named_parameters() if p.requires_grad) == ["score.weight"]
    with_norm = LoraConfig(method="head", train_final_norm=True)
    model = attach_lora(LlamaForSequenceClassification(cfg), with_norm, seq_cls)
    trained = sorted(k for k, p in model.named_parameters() if p.requires_grad)
    assert trained == ["model.norm.weight", "score.weight"]
    with pytest.raises(ModelError, match='"head" trains no layer'):
        attach_lora(
            LlamaForSequenceClassification(cfg), LoraConfig(method="head", layers=[-1]), seq_cls
        )
    with pytest.raises(ModelError, match='"head" trains a classifier'):
        attach_lora(LlamaForCausalLM(cfg), LoraConfig(method="head"), ModelConfig())
