"""``fedtune export --gguf``: a verified published folder as a GGUF file and an Ollama Modelfile.

Reads top to bottom: verify the folder (a tampered one is never exported), read its config,
tokenizer and weights, then write GGUF with llama.cpp's own Python package, ``gguf``: its tensor
name table (``gguf.get_tensor_name_map``), its writer, its tokenizer readers (``gguf.vocab``) and
its quantizer (Q8_0). Q4_K_M is llama.cpp's K-quant mix, made by llama.cpp itself through
llama-cpp-python (the optional ``llama`` extra), from an F32 file this module writes first.
Only the Llama architecture (SmolLM2 and fedtune's tiny models) is converted; others are refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.core.errors import FedtuneError
from common.identity.signing import verify_folder

logger = logging.getLogger(__name__)

QUANTS = ("q8_0", "q4_k_m")
_ARCHS = {"LlamaForCausalLM": "llama"}


class ExportError(FedtuneError):
    """The folder cannot be exported (unsupported architecture, quantization or runtime)."""


@dataclass(frozen=True)
class Exported:
    gguf: Path
    modelfile: Path


def export_gguf(
    model_dir: str | Path, out_dir: str | Path, public_key: str | Path, quant: str = "q8_0"
) -> Exported:
    """Verify ``model_dir``, then write ``<name>.<quant>.gguf`` and ``Modelfile`` to ``out_dir``."""
    import gguf

    root, out = Path(model_dir), Path(out_dir)
    if quant not in QUANTS:
        raise ExportError(f"`quant` must be one of {', '.join(QUANTS)}, got `{quant}`")
    verify_folder(root, public_key)
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    arch = _arch(config)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{root.resolve().name}.{quant}.gguf"
    if quant == "q8_0":
        _write(root, config, arch, target, gguf.GGMLQuantizationType.Q8_0)
    else:
        f32 = out / f".{target.name}.f32-{os.getpid()}"
        try:
            _write(root, config, arch, f32, gguf.GGMLQuantizationType.F32)
            _llama_quantize(f32, target, "LLAMA_FTYPE_MOSTLY_Q4_K_M")
        finally:
            f32.unlink(missing_ok=True)
    modelfile = out / "Modelfile"
    modelfile.write_text(ollama_modelfile(root, target.name), encoding="utf-8")
    copy_card(root, out)
    logger.info("exported %s -> %s (%s)", root, target, quant)
    return Exported(target, modelfile)


def _arch(config: dict[str, Any]) -> str:
    names = config.get("architectures") or []
    arch = next((_ARCHS[n] for n in names if n in _ARCHS), None)
    if arch is None:
        raise ExportError(f"GGUF export supports {sorted(_ARCHS)}; this model is {names}")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"rope scaling `{rope}` is not exported; only the default rope is")
    return arch


# ------------------------------------------------------------------------------------ writing


def _write(root: Path, config: dict[str, Any], arch: str, path: Path, qtype: Any) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    _hparams(writer, config, root.resolve().name, qtype)
    _vocab(writer, root, int(config["vocab_size"]))
    n_blocks = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    for hf_name, tensor in _tensors(root):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor `{hf_name}` has no GGUF name for `{arch}`")
        data = _undo_rope_permute(hf_name, tensor, config)
        _add(writer, name, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _hparams(writer: Any, config: dict[str, Any], name: str, qtype: Any) -> None:
    import gguf

    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    rope = config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    is_q8 = qtype == gguf.GGMLQuantizationType.Q8_0
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if is_q8 else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocab(writer: Any, root: Path, n_vocab: int) -> None:
    """Byte-level BPE tokens (gguf's reader), control tokens marked, padded to the model's vocab;
    merges, special token ids and the chat template from gguf's SpecialVocab."""
    import gguf

    try:
        bpe = gguf.BpeVocab(root)
    except FileNotFoundError as err:
        raise ExportError(f"GGUF export needs a byte-level BPE tokenizer: {err}") from None
    tokens = [str(text) for text, _score, _type in bpe.all_tokens()]
    if len(tokens) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens, the model only {n_vocab}")
    special = _special_ids(root)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
             for i in range(len(tokens))]  # fmt: skip
    for i in range(len(tokens), n_vocab):  # embedding rows no token uses, as llama.cpp pads them
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(root))
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))  # BPE has no scores; readers expect the key
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(root, load_merges=True, n_vocab=n_vocab)
    if not special_vocab.merges:
        # A BPE with no merges (the tiny test models): llama.cpp requires the key and gguf
        # cannot write an empty array, so one rule joins two control tokens, which byte-level
        # pieces of text never are: it never applies.
        special_vocab.merges = [f"{tokens[0]} {tokens[1]}"]
    special_vocab.add_to_gguf(writer, quiet=True)


def _special_ids(root: Path) -> set[int]:
    data = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
    return {int(t["id"]) for t in data.get("added_tokens", []) if t.get("special")}


def _pre_tokenizer(root: Path) -> str:
    """llama.cpp's name for the text splitting before BPE: SmolLM2 splits digits one by one."""
    data = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    return "smollm" if digits else "default"


def _tensors(root: Path) -> list[tuple[str, np.ndarray]]:
    from safetensors.numpy import load_file

    files = sorted(root.glob("model*.safetensors"))
    if not files:
        raise ExportError(f"`{root}` has no model*.safetensors weights")
    found: list[tuple[str, np.ndarray]] = []
    for file in files:
        found.extend(sorted(load_file(str(file)).items()))
    return found


def _undo_rope_permute(name: str, data: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """HF stores q/k rows rotate-half ordered; llama.cpp's rope wants them interleaved (the
    inverse of the permutation HF's own converter applies; as llama.cpp's converter does)."""
    heads = int(config["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        heads = int(config.get("num_key_value_heads") or heads)
    elif not name.endswith("self_attn.q_proj.weight"):
        return data
    rows = data.shape[0]  # (heads * head_dim, hidden) -> per head, halves interleaved
    return (
        data.reshape(heads, 2, rows // heads // 2, *data.shape[1:])
        .swapaxes(1, 2)
        .reshape(data.shape)
    )


def _add(writer: Any, name: str, data: np.ndarray, qtype: Any) -> None:
    import gguf

    values = data.astype(np.float32)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    quantize = (qtype == gguf.GGMLQuantizationType.Q8_0 and values.ndim == 2
                and values.shape[-1] % block == 0)  # fmt: skip
    if quantize:  # matrices: Q8_0; norms (1-D) stay F32, as llama.cpp's converter keeps them
        writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, values)


def _llama_quantize(source: Path, target: Path, ftype: str) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``) through llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            "`q4_k_m` is made by llama.cpp's quantizer: install the `llama` extra "
            "(pip install -e '.[llama]', builds llama.cpp) or use `q8_0`"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise ExportError(f"llama.cpp could not quantize `{source.name}` to {ftype} ({status})")


# ------------------------------------------------------------------------------------- Ollama

_CHATML_GO = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)


def ollama_modelfile(root: Path, gguf_name: str) -> str:
    """``ollama create NAME -f Modelfile`` next to the GGUF. A ChatML chat template (fedtune's
    models use it) is written as Ollama's Go template; any other is left to the template the GGUF
    carries (``tokenizer.chat_template``), which Ollama reads itself."""
    config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = str(config.get("chat_template") or _template_file(root) or "")
    lines = [f"FROM ./{gguf_name}"]
    if "<|im_start|>" in template and "<|im_end|>" in template:
        lines += [f'TEMPLATE """{_CHATML_GO}"""', 'PARAMETER stop "<|im_end|>"']
    else:
        lines.append("# chat template: the one in the GGUF metadata (tokenizer.chat_template)")
    return "\n".join(lines) + "\n"


def _template_file(root: Path) -> str | None:
    path = root / "chat_template.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def copy_card(root: Path, out: Path) -> None:
    """The model card travels with the export (what the model is, its privacy guarantee)."""
    if (root / "MODEL_CARD.md").is_file():
        shutil.copyfile(root / "MODEL_CARD.md", out / "MODEL_CARD.md")
