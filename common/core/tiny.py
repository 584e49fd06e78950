"""Tiny random models built from configs, with a byte-level tokenizer that needs no download.

Used by tests and `tiny.toml`: every architecture family fedtune supports, small enough to train
in seconds on a CPU, deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    DeepseekV3Config,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from common.core.config import TinyModelConfig

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
INIT_STD = 0.1
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus ChatML specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def _common(t: TinyModelConfig, vocab: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": 1024,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        # Wider than the usual 0.02: a tiny random model's final norm otherwise caps its logits
        # so close to uniform that no adapter can make it confident (loss stuck near ln V).
        "initializer_range": INIT_STD,
    }


def _llama(t: TinyModelConfig, vocab: int) -> PretrainedConfig:
    return LlamaConfig(**_common(t, vocab), num_key_value_heads=t.num_heads)


def _qwen2(t: TinyModelConfig, vocab: int) -> PretrainedConfig:
    # The DeepSeek-R1-Distill-Qwen family uses this architecture.
    return Qwen2Config(**_common(t, vocab), num_key_value_heads=max(1, t.num_heads // 2))


def _deepseek(t: TinyModelConfig, vocab: int) -> PretrainedConfig:
    # DeepSeek-V3 mixture of experts: a dense first layer, then routed + shared experts.
    return DeepseekV3Config(
        **_common(t, vocab),
        num_key_value_heads=t.num_heads,
        moe_intermediate_size=t.intermediate_size // 2,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=t.hidden_size // t.num_heads,
    )


def _gpt2(t: TinyModelConfig, vocab: int) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=vocab,
        n_embd=t.hidden_size,
        n_layer=t.num_layers,
        n_head=t.num_heads,
        n_inner=t.intermediate_size,
        n_positions=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=INIT_STD,
    )


def _bert(t: TinyModelConfig, vocab: int) -> PretrainedConfig:
    cfg = _common(t, vocab)
    cfg.pop("bos_token_id")
    cfg.pop("eos_token_id")
    return BertConfig(**cfg)


ARCHS: dict[str, Callable[[TinyModelConfig, int], PretrainedConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "deepseek": _deepseek,
    "gpt2": _gpt2,
    "bert": _bert,
}


def build(
    arch: str, t: TinyModelConfig, task: str, labels: list[str]
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tok = byte_tokenizer()
    config = ARCHS[arch](t, max(t.vocab_size, len(tok)))
    torch.manual_seed(t.seed)
    if task == "seq-cls":
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        return AutoModelForSequenceClassification.from_config(config), tok
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
