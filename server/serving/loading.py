"""What ``fedtune serve`` loads: a verified published folder, or a base with LoRA adapters.

A published folder is verified (signature and every file) before a byte of it is parsed; a folder
that fails is never loaded. Adapters are served without merging, so one base in memory answers
to several model ids: each adapter comes from a published folder (verified, its ``adapter/``), a
run folder (its last round) or a round's adapter folder. Run folders are the coordinator's own
working files and carry no signature: they are logged as unsigned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.core.config import ModelConfig
from common.core.errors import ModelError
from common.identity.signing import verify_folder
from server.serving.engine import ServedModel

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    served: list[ServedModel]


def load_published(folder: str | Path, public_key: str | Path, model_id: str | None) -> Loaded:
    """Verify the folder (raises IntegrityError), then load the merged model from it."""
    root = Path(folder)
    verify_folder(root, public_key)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(root), local_files_only=True).eval()
    model.config.use_cache = True
    name = model_id or root.resolve().name
    return Loaded(model, tokenizer, [ServedModel(name, None, f"published:{root}")])


def load_adapters(
    adapters: dict[str, Path], base: str | None, public_key: str | Path | None
) -> Loaded:
    """``base`` (a model source or a run folder) with each adapter under its own model id."""
    from peft import PeftModel

    from common.core.models import load_base

    if not adapters:
        raise ModelError("give at least one `--adapter NAME=PATH`")
    dirs = {name: adapter_dir(path, public_key) for name, path in adapters.items()}
    loaded = load_base(base_config(base, list(adapters.values())))
    model: Any = loaded.model
    for name, path in dirs.items():
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=name,
                                                  is_trainable=False)  # fmt: skip
        except (ValueError, RuntimeError, OSError, KeyError) as err:
            raise ModelError(f"adapter `{name}` (`{path}`) does not fit the base model "
                             f"`{loaded.source}`: {err}") from None  # fmt: skip
    model.eval()
    model.config.use_cache = True
    served = [ServedModel(name, name, str(adapters[name])) for name in dirs]
    return Loaded(model, loaded.tokenizer, served)


def adapter_dir(path: Path, public_key: str | Path | None) -> Path:
    """The adapter folder that ``path`` stands for; a published folder is verified first."""
    if (path / "manifest.json").is_file():
        if public_key is None:
            raise ModelError(f"`{path}` is a published folder: give `--public-key` to verify it")
        verify_folder(path, public_key)
        if not (path / "adapter").is_dir():
            raise ModelError(
                f"`{path}` is a published model without an adapter (`partial` or `full` "
                f"fine-tuning): serve it whole: `fedtune serve {path} --public-key KEY`"
            )
        return path / "adapter"
    if (path / "config.toml").is_file() and (path / "rounds").is_dir():
        rounds = [p for p in (path / "rounds").iterdir() if p.name.isdigit()]
        if not rounds:
            raise ModelError(f"run folder `{path}` holds no saved round")
        last = max(rounds, key=lambda p: int(p.name))
        if not (last / "adapter_config.json").is_file():
            raise ModelError(
                f"run `{path}` trained the model's own weights (`lora.method` `partial`, "
                "`head` or `full`), not an adapter: publish it and serve the published folder"
            )
        logger.warning("serving unsigned adapter of run `%s`, round %s", path, last.name)
        return last
    if (path / "adapter_config.json").is_file():
        logger.warning("serving unsigned adapter folder `%s`", path)
        return path
    raise ModelError(f"`{path}` is neither a published folder, a run folder nor an adapter folder "
                     "(no manifest.json, config.toml or adapter_config.json)")  # fmt: skip


def base_config(base: str | None, adapters: list[Path]) -> ModelConfig:
    """``base`` as a model config: a run folder's model section, or a model source string."""
    from common.core.config import load_config

    if base is None:
        runs = [p for p in adapters if (p / "config.toml").is_file()]
        if not runs:
            raise ModelError("give `--base` (a model source or a run folder) for the adapters")
        base = str(runs[0])
    path = Path(base)
    if (path / "config.toml").is_file():
        cfg = load_config(path / "config.toml").model
    else:
        cfg = ModelConfig.model_validate({"source": base})
    if cfg.task != "causal-lm":
        raise ModelError(f"base `{base}` is a `{cfg.task}` model; only `causal-lm` is served")
    return cfg
