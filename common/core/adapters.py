"""Adapters (LoRA, DoRA, IA3 through PEFT): attach, select what is trained and exchanged, and
move state as numpy arrays.

The PEFT adapter state dict is the unit that crosses the wire. Two aggregation modes for LoRA
and DoRA:

- ``ffa`` (FFA-LoRA, Sun et al. 2024): A is frozen at an initialisation every party derives from the
  shared ``lora.init_seed``; only B (and a classifier head, if any) is trained and exchanged. The
  weight delta B·A is then linear in B, so averaging B averages the deltas exactly.
- ``fedavg``: A and B are both trained and averaged separately (mean(B)·mean(A) != mean(B·A)).

DoRA adds a magnitude vector per adapted layer, trained and averaged with B (the average of
magnitudes is not the average of the sites' weights: DoRA's weight is not linear in it). IA3's
scaling vectors act linearly on one layer's weights (``W · diag(l)``), so their average is the
average of the sites' scaled weights: exact.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from peft import IA3Config, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from peft import LoraConfig as PeftLoraConfig
from peft import set_peft_model_state_dict as _peft_set
from transformers import PreTrainedModel

from common.core.config import LoraConfig, ModelConfig
from common.core.errors import ModelError

# Attention projections adapted when `lora.target_modules = "auto"`, per model family.
AUTO_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "deepseek_v3": ["q_proj", "kv_b_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}
HEAD_NAMES = ("classifier", "score")
# IA3's targets when `lora.target_modules = "auto"`: attention keys and values, and the
# feed-forward output projection (whose input it scales), per model family.
AUTO_IA3: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


def target_modules(lora: LoraConfig, model: PreTrainedModel) -> list[str]:
    if lora.target_modules != "auto":
        return list(lora.target_modules)
    model_type = str(model.config.model_type)
    if model_type not in AUTO_TARGETS:
        raise ModelError(
            f'`lora.target_modules` = "auto" does not know model type `{model_type}`; '
            f"list the modules to adapt (known types: {', '.join(sorted(AUTO_TARGETS))})"
        )
    return AUTO_TARGETS[model_type]


def ia3_targets(lora: LoraConfig, model: PreTrainedModel) -> tuple[list[str], list[str]]:
    """IA3's (target modules, feed-forward modules): listed ones are scaled at their output."""
    if lora.target_modules != "auto":
        return list(lora.target_modules), []
    model_type = str(model.config.model_type)
    if model_type not in AUTO_IA3:
        raise ModelError(
            f'`lora.method` = "ia3" with `lora.target_modules` = "auto" does not know model type '
            f"`{model_type}`; list the modules to scale (known: {', '.join(sorted(AUTO_IA3))})"
        )
    targets, feedforward = AUTO_IA3[model_type]
    return list(targets), list(feedforward)


def adapted_layers(lora: LoraConfig, model: PreTrainedModel) -> list[int] | None:
    """`lora.layers` as PEFT's ``layers_to_transform`` (negative indices resolved); None: all."""
    if not lora.layers:
        return None
    n = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ModelError(
            f"`lora.layers`: model type `{model.config.model_type}` does not say how many layers "
            "it has (`num_hidden_layers`); leave `lora.layers` empty"
        )
    bad = [i for i in lora.layers if not -n <= i < n]
    if bad:
        raise ModelError(f"`lora.layers`: {bad} out of range for a model of {n} layers")
    return sorted({i % n for i in lora.layers})


def attach_lora(model: PreTrainedModel, lora: LoraConfig, mcfg: ModelConfig) -> PeftModel:
    """Wrap ``model`` with LoRA adapters initialised from the shared seed (same A everywhere)."""
    heads = [n for n in HEAD_NAMES if hasattr(model, n)] if mcfg.task == "seq-cls" else None
    task = TaskType.SEQ_CLS if mcfg.task == "seq-cls" else TaskType.CAUSAL_LM
    peft_cfg: PeftLoraConfig | IA3Config
    if lora.method == "ia3":
        targets, feedforward = ia3_targets(lora, model)
        if lora.layers:
            raise ModelError(
                '`lora.layers` does not apply to `lora.method` = "ia3" (PEFT scales every layer)'
            )
        peft_cfg = IA3Config(
            target_modules=targets, feedforward_modules=feedforward, task_type=task,
            modules_to_save=heads,
        )  # fmt: skip
        return get_peft_model(model, peft_cfg)  # scaling vectors start at 1: no seed involved
    peft_cfg = PeftLoraConfig(
        use_dora=lora.method == "dora",
        layers_to_transform=adapted_layers(lora, model),
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=lora.dropout,
        target_modules=target_modules(lora, model),
        task_type=task,
        modules_to_save=heads,
    )
    # The shared seed makes every party's A (and the head's copy) identical without sending it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.init_seed)
        peft_model = get_peft_model(model, peft_cfg)
    if lora.aggregation == "ffa":
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def exchanged_keys(model: PeftModel, lora: LoraConfig) -> list[str]:
    """Keys of the adapter state dict that are trained and sent each round, in a fixed order."""
    keys = list(get_peft_model_state_dict(model).keys())
    if lora.aggregation == "ffa":
        keys = [k for k in keys if "lora_A" not in k]
    return sorted(keys)


def get_state(model: PeftModel, keys: list[str]) -> OrderedDict[str, np.ndarray]:
    """The exchanged part of the adapter as float32 numpy arrays (copies)."""
    full = get_peft_model_state_dict(model)
    return OrderedDict((k, full[k].detach().float().cpu().numpy().copy()) for k in keys)


def set_state(model: PeftModel, state: dict[str, np.ndarray]) -> None:
    """Load exchanged adapter arrays; every key must be known and every shape must match."""
    full = get_peft_model_state_dict(model)
    problems = [f"unknown key `{k}`" for k in state if k not in full]
    problems += [
        f"`{k}`: expected shape {tuple(full[k].shape)}, got {tuple(v.shape)}"
        for k, v in state.items()
        if k in full and tuple(full[k].shape) != tuple(v.shape)
    ]
    if problems:
        raise ModelError("adapter state does not fit the model: " + "; ".join(problems))
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(v)).to(full[k].dtype) for k, v in state.items()
    }
    merged = {**full, **tensors}
    _peft_set(model, merged)


def frozen_fingerprint(model: PeftModel, lora: LoraConfig) -> str:
    """sha256 of the frozen part (A under ``ffa``): sites check they share the server's A."""
    if lora.aggregation != "ffa":
        return ""
    full = get_peft_model_state_dict(model)
    digest = hashlib.sha256()
    for key in sorted(k for k in full if "lora_A" in k):
        digest.update(key.encode())
        digest.update(full[key].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def flatten(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.ravel() for v in state.values()]).astype(np.float32)


def unflatten(vec: np.ndarray, like: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = 0
    for key, ref in like.items():
        out[key] = vec[offset : offset + ref.size].reshape(ref.shape).astype(np.float32)
        offset += ref.size
    if offset != vec.size:
        raise ModelError(f"flat update has {vec.size} values, the adapter needs {offset}")
    return out


def state_bytes(state: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in state.values()))
