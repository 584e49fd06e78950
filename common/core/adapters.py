"""What a site trains (`lora.method`): attach it, select what is trained and exchanged, move that
state as numpy arrays, save a round and apply a saved round to a base model.

Adapters (LoRA, DoRA, IA3, prompt tuning) go through PEFT: the PEFT adapter state dict is the
unit that crosses the wire and a round is saved in PEFT's format. The model's own weights
(``partial``: the chosen top layers, final norm and head; ``head``: a classifier's head alone;
``full``: every weight) are trained in
place: the trained parameters (by their names in the model) cross the wire, and a round is saved
as those tensors alone (``trained_weights.safetensors``, with ``trained_weights.json`` naming the
method), never a whole model copy per round for ``partial``. Averaging weights is averaging the
sites' models: exact for ``full`` and ``partial`` (the frozen part is the same everywhere).

Two aggregation modes for LoRA and DoRA:

- ``ffa`` (FFA-LoRA, Sun et al. 2024): A is frozen at an initialisation every party derives from the
  shared ``lora.init_seed``; only B (and a classifier head, if any) is trained and exchanged. The
  weight delta B·A is then linear in B, so averaging B averages the deltas exactly.
- ``fedavg``: A and B are both trained and averaged separately (mean(B)·mean(A) != mean(B·A)).

DoRA adds a magnitude vector per adapted layer, trained and averaged with B (the average of
magnitudes is not the average of the sites' weights: DoRA's weight is not linear in it). IA3's
scaling vectors act linearly on one layer's weights (``W · diag(l)``), so their average is the
average of the sites' scaled weights: exact. Prompt tuning's virtual-token embeddings are
averaged as they are (the model is not linear in them: like DoRA's magnitudes, an average of
parameters, not of outputs); they start from a random init drawn from ``lora.init_seed``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import (
    IA3Config,
    PeftModel,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
)
from peft import LoraConfig as PeftLoraConfig
from peft import set_peft_model_state_dict as _peft_set
from safetensors.torch import load_file as _load_tensors
from safetensors.torch import save_file as _save_tensors
from torch import nn
from transformers import PreTrainedModel

from common.core.config import LoraConfig, ModelConfig
from common.core.config.training import STAGE_LAYERS, UnfreezeStage
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
# The norm after the last layer, by model family (`lora.train_final_norm`).
FINAL_NORM = re.compile(r"(?:^|\.)(?:norm|ln_f|final_layer_?norm)$")
# Methods that train the model's own weights (no PEFT wrapper), and the files of their rounds.
WEIGHT_METHODS = ("partial", "head", "full")
TRAINED_FILE = "trained_weights.safetensors"
TRAINED_META = "trained_weights.json"
# A transformer layer's index in a parameter name (llama/qwen2 `layers`, bert `layer`, gpt2 `h`).
LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|blocks)\.(\d+)\.")
# Parameters of the input embeddings (never trained by `partial`).
EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embeddings|wte|wpe)\.")
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


def _check_positions(model: PreTrainedModel, lora: LoraConfig, mcfg: ModelConfig) -> None:
    """A record of `model.max_length` tokens (and the virtual tokens of `prompt`) must fit the
    model's positions: under DP every batch is padded to that length, so a misfit would fail
    every step, not one long record."""
    limit = getattr(model.config, "max_position_embeddings", None)
    tokens = mcfg.max_length + (lora.virtual_tokens if lora.method == "prompt" else 0)
    if isinstance(limit, int) and tokens > limit:
        extra = f" + {lora.virtual_tokens} virtual tokens" if lora.method == "prompt" else ""
        raise ModelError(
            f"`model.max_length` = {mcfg.max_length}{extra} is more than the {limit} positions "
            f"the model has: set `model.max_length` to at most {limit - (tokens - mcfg.max_length)}"
        )


def attach_lora(model: PreTrainedModel, lora: LoraConfig, mcfg: ModelConfig) -> nn.Module:
    """``model`` made ready to train by `lora.method`: wrapped with PEFT adapters initialised
    from the shared seed (same init everywhere), or (``partial``, ``full``) with only the chosen
    weights left trainable."""
    _check_positions(model, lora, mcfg)
    if lora.method in WEIGHT_METHODS:
        return _train_weights(model, lora)
    heads = [n for n in HEAD_NAMES if hasattr(model, n)] if mcfg.task == "seq-cls" else []
    if lora.train_final_norm:
        heads.append(final_norm(model))
    task = TaskType.SEQ_CLS if mcfg.task == "seq-cls" else TaskType.CAUSAL_LM
    peft_cfg: PeftLoraConfig | IA3Config | PromptTuningConfig
    if lora.method == "ia3":
        targets, feedforward = ia3_targets(lora, model)
        if lora.layers:
            raise ModelError(
                '`lora.layers` does not apply to `lora.method` = "ia3" (PEFT scales every layer)'
            )
        peft_cfg = IA3Config(
            target_modules=targets, feedforward_modules=feedforward, task_type=task,
            modules_to_save=heads or None,
        )  # fmt: skip
        return get_peft_model(model, peft_cfg)  # scaling vectors start at 1: no seed involved
    if lora.method == "prompt":
        if lora.layers:
            raise ModelError(
                '`lora.layers` does not apply to `lora.method` = "prompt" (the virtual tokens '
                "enter at the input)"
            )
        peft_cfg = PromptTuningConfig(
            task_type=task, num_virtual_tokens=lora.virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM, modules_to_save=heads or None,
        )  # fmt: skip
    else:
        peft_cfg = PeftLoraConfig(
            use_dora=lora.method == "dora",
            layers_to_transform=adapted_layers(lora, model),
            r=lora.r,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
            lora_dropout=lora.dropout,
            target_modules=target_modules(lora, model),
            task_type=task,
            modules_to_save=heads or None,
        )
    # The shared seed makes every party's A (and the head's copy) identical without sending it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.init_seed)
        peft_model = get_peft_model(model, peft_cfg)
    if lora.method in ("lora", "dora") and lora.aggregation == "ffa":
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def _layer_of(name: str) -> int | None:
    m = LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def _num_layers(model: nn.Module, names: list[str]) -> int:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    return max((i for name in names if (i := _layer_of(name)) is not None), default=-1) + 1


def _train_weights(model: PreTrainedModel, lora: LoraConfig) -> PreTrainedModel:
    """`partial` / `head` / `full`: freeze every weight but the trained ones, in place.

    ``partial`` trains the chosen layers, and the weights in no layer that are not input
    embeddings (final norm, pooler, task head; a causal LM's output layer when it is not tied
    to the input embedding). A tied output layer stays frozen with the embedding it shares.
    """
    params = dict(model.named_parameters())  # a tied weight appears once, under its first name
    if lora.method == "full":
        for p in params.values():
            p.requires_grad_(True)
        return model
    names = list(params)
    n = _num_layers(model, names)
    top = [k for k in names if _layer_of(k) is None and not EMBEDDING.search(k)]
    if lora.method == "head":
        if lora.layers or lora.fraction is not None:
            raise ModelError(
                '`lora.method` = "head" trains no layer: leave `lora.layers` and `lora.fraction` '
                "unset (or use `partial`)"
            )
        heads = [k for k in top if k.split(".")[0] in HEAD_NAMES]
        if not heads:
            raise ModelError(
                '`lora.method` = "head" trains a classifier\'s head: use it with `model.task` = '
                '"seq-cls"'
            )
        norm = final_norm(model) + "." if lora.train_final_norm else None
        top = heads + [k for k in top if norm and k.startswith(norm)]
        chosen: set[int] = set()
    elif lora.layers:
        if lora.fraction is not None:
            raise ModelError(
                '`lora.method` = "partial": set `lora.layers` or `lora.fraction`, not both'
            )
        chosen = set(adapted_layers(lora, model) or [])
    elif lora.fraction is not None:
        total = sum(p.numel() for p in params.values())
        size = sum(params[k].numel() for k in top)
        chosen = set()
        for layer in range(n - 1, -1, -1):
            if size >= lora.fraction * total:
                break
            chosen.add(layer)
            size += sum(params[k].numel() for k in names if _layer_of(k) == layer)
    else:
        raise ModelError(
            '`lora.method` = "partial" needs `lora.layers` (e.g. [-2, -1]: the top two layers) '
            "or `lora.fraction` (e.g. 0.25) to say what it trains"
        )
    for k, p in params.items():
        p.requires_grad_(k in top or _layer_of(k) in chosen)
    return model


# ------------------------------------------------------------------- progressive unfreezing


def _stage_layers(stage: UnfreezeStage, n: int) -> set[int] | None:
    """The layers a stage trains (None: everything, embeddings included)."""
    m = STAGE_LAYERS.match(stage.layers)
    assert m is not None  # checked by the config
    if stage.layers == "all":
        return None
    if stage.layers == "head":
        return set()
    k = int(m.group(2)) if m.group(2) else math.ceil(float(m.group(3)) / 100 * n)
    return set(range(max(0, n - k), n))


def check_schedule(stages: list[UnfreezeStage], n: int) -> None:
    """Each stage must include the one before (unfreezing never freezes again)."""
    for i in range(1, len(stages)):
        before, now = _stage_layers(stages[i - 1], n), _stage_layers(stages[i], n)
        if now is not None and (before is None or not before <= now):
            raise ModelError(
                f"`train.unfreeze[{i}].layers` = `{stages[i].layers}` trains less than stage "
                f"{i - 1} (`{stages[i - 1].layers}`) in a model of {n} layers; each stage must "
                "include the one before"
            )


def stage_scales(
    names: list[str], stages: list[UnfreezeStage], n: int, round_no: int
) -> dict[str, float]:
    """`train.unfreeze` at round ``round_no`` (1-based): each of ``names`` (parameter or
    exchanged-key names) that trains this round, with its rate multiple: the `lr_scale` of the
    stage that first unfroze it. Without stages every name trains at 1."""
    if not stages:
        return dict.fromkeys(names, 1.0)
    check_schedule(stages, n)
    current = [s for s in stages if s.from_round <= round_no]
    out: dict[str, float] = {}
    for name in names:
        layer = _layer_of(name)
        for stage in current:
            chosen = _stage_layers(stage, n)
            if chosen is None or (
                layer in chosen if layer is not None else not EMBEDDING.search(name)
            ):
                out[name] = stage.lr_scale
                break
    if not out:
        raise ModelError(
            f"`train.unfreeze`: nothing this method trains is unfrozen in round {round_no} "
            f"(`{current[-1].layers}`); e.g. a causal LM's LoRA has no head: start at `top:1`"
        )
    return out


def num_layers(model: nn.Module) -> int:
    """The model's transformer layers (its config's `num_hidden_layers`, else those seen)."""
    return _num_layers(model, [k for k, _ in model.named_parameters()])


def final_norm(model: nn.Module) -> str:
    """The dotted name of the norm after the last layer (`lora.train_final_norm`)."""
    found = [
        name
        for name, module in model.named_modules()
        if FINAL_NORM.search(name) and _layer_of(name + ".") is None and not EMBEDDING.search(name)
        and next(module.parameters(recurse=False), None) is not None
    ]  # fmt: skip
    if len(found) == 1:
        return found[0]
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ModelError(
        f"`lora.train_final_norm`: a {kind} model has "
        + (
            f"several norms after its last layer ({', '.join(found)})"
            if found
            else "no norm after its last layer (post-norm models such as BERT normalise "
            "inside each layer)"
        )
    )


def trains_weights(model: nn.Module) -> bool:
    """True for `partial` / `full` models (their own weights trained), False for PEFT ones."""
    return not isinstance(model, PeftModel)


def exchanged_keys(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Keys of the state that is trained and sent each round, in a fixed order."""
    if not isinstance(model, PeftModel):
        return sorted(k for k, p in model.named_parameters() if p.requires_grad)
    keys = list(get_peft_model_state_dict(model).keys())
    if lora.method in ("lora", "dora") and lora.aggregation == "ffa":
        keys = [k for k in keys if "lora_A" not in k]
    return sorted(keys)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, PeftModel):
        return get_peft_model_state_dict(model)
    return dict(model.named_parameters())


def get_state(model: nn.Module, keys: list[str]) -> OrderedDict[str, np.ndarray]:
    """The exchanged part (adapter, or trained weights) as float32 numpy arrays (copies)."""
    full = _state(model)
    return OrderedDict((k, full[k].detach().float().cpu().numpy().copy()) for k in keys)


def set_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load exchanged arrays; every key must be known and every shape must match."""
    full = _state(model)
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
    if not isinstance(model, PeftModel):
        with torch.no_grad():
            for k, v in tensors.items():
                full[k].copy_(v.to(full[k].device))
        return
    _peft_set(model, {**full, **tensors})


def frozen_fingerprint(model: nn.Module, lora: LoraConfig) -> str:
    """sha256 of the frozen part (A under ``ffa``): sites check they share the server's A."""
    if not isinstance(model, PeftModel) or lora.method not in ("lora", "dora"):
        return ""
    if lora.aggregation != "ffa":
        return ""
    full = get_peft_model_state_dict(model)
    digest = hashlib.sha256()
    for key in sorted(k for k in full if "lora_A" in k):
        digest.update(key.encode())
        digest.update(full[key].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------ saved rounds on disk


def save_round(model: nn.Module, folder: Path, keys: list[str], method: str) -> None:
    """A round's trained state into ``folder``: PEFT's adapter format, or the trained weights."""
    if isinstance(model, PeftModel):
        model.save_pretrained(str(folder))
        return
    folder.mkdir(parents=True, exist_ok=True)
    full = dict(model.named_parameters())
    tensors = {k: full[k].detach().cpu().contiguous() for k in keys}
    _save_tensors(tensors, str(folder / TRAINED_FILE))
    meta = {"format": "fedtune-trained-weights", "method": method, "tensors": len(keys)}
    (folder / TRAINED_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def saved_state_file(folder: Path) -> Path:
    """The safetensors file of a saved round (either kind)."""
    if (folder / TRAINED_META).is_file():
        return folder / TRAINED_FILE
    return folder / "adapter_model.safetensors"


def is_saved_round(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() or (folder / TRAINED_META).is_file()


def is_adapter(folder: Path) -> bool:
    """A PEFT adapter folder (servable beside a base), not a round of trained weights."""
    return (folder / "adapter_config.json").is_file()


def apply_round(model: PreTrainedModel, folder: Path) -> Any:
    """``model`` (the base) with a saved round applied and, for adapters, folded into the base
    weights; raises ModelError when the round does not fit the base."""
    if (folder / TRAINED_META).is_file():
        tensors = _load_tensors(str(folder / TRAINED_FILE))
        params = dict(model.named_parameters())
        problems = [f"unknown weight `{k}`" for k in tensors if k not in params]
        problems += [
            f"`{k}`: expected shape {tuple(params[k].shape)}, got {tuple(v.shape)}"
            for k, v in tensors.items()
            if k in params and params[k].shape != v.shape
        ]
        if problems:
            raise ModelError(f"`{folder}` does not fit the base model: " + "; ".join(problems))
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v.to(params[k].dtype))
        model.eval()
        return model
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (ValueError, RuntimeError, OSError, KeyError) as err:
        raise ModelError(f"adapter `{folder}` does not fit the base model: {err}") from None
    if peft_model.peft_config["default"].is_prompt_learning:
        raise ModelError(
            f'`{folder}` is a prompt-tuning adapter (`lora.method` = "prompt"): its virtual '
            "tokens cannot be folded into the base weights; serve it beside the base with "
            "`fedtune serve --adapter NAME=RUN_DIR`"
        )
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


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
