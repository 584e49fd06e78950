"""`export --gguf`: the GGUF read back by independent readers gives the published model's logits.

Independent of the writer (gguf's tensor table and writer, our permutation of q/k): transformers'
own GGUF loader (its tensor mapping, its inverse permutation, gguf's dequantizer) and, where
llama-cpp-python is installed (the optional `llama` extra), llama.cpp itself.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli.main import app
from common.core.errors import IntegrityError
from server.publishing.export import ExportError, export_gguf
from tests.server.conftest import TEST_TEXTS

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
# Q8_0 keeps each weight within half a step of its block's max / 127: on the tiny random model
# that moves logits by a few percent of their range (measured 0.13 of 3.3); F32 export is exact.
REL_TOLERANCE = 0.08


@pytest.fixture(scope="module")
def exported(published: Path, keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("gguf")
    result = CliRunner().invoke(app, ["export", str(published), "--gguf", "--public-key",
                                      str(keys[1]), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _ids(published: Path) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(published)
    return torch.tensor([tok(TEST_TEXTS[0])["input_ids"]])


def _reference_logits(published: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(published).eval()
    with torch.no_grad():
        return model(ids).logits[0]


def test_export_writes_gguf_modelfile_and_card(exported: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == [
        "MODEL_CARD.md", "Modelfile", "tiny-model.q8_0.gguf"]  # fmt: skip
    modelfile = (exported / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-model.q8_0.gguf\n")
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_metadata_and_tensor_types(exported: Path, published: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(exported / "tiny-model.q8_0.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 512  # padded to the vocab
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    # Each dequantized weight is within about half a Q8_0 step of the original (v_proj: no permute).
    from safetensors.numpy import load_file

    original = load_file(str(published / "model.safetensors"))[
        "model.layers.0.self_attn.v_proj.weight"
    ]
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    back = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(original.shape)
    step = np.abs(original.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    # half a step, and the step itself is stored as float16
    assert (np.abs(back - original).reshape(-1, 32) <= step * 0.55 + 1e-6).all()


def test_transformers_reads_the_gguf_within_q8_tolerance(exported: Path, published: Path) -> None:
    ids = _ids(published)
    expected = _reference_logits(published, ids)
    model = AutoModelForCausalLM.from_pretrained(exported, gguf_file="tiny-model.q8_0.gguf")
    with torch.no_grad():
        got = model.eval()(ids).logits[0]
    diff = (got - expected).abs().max().item()
    assert diff <= REL_TOLERANCE * expected.abs().max().item(), diff
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python (the `llama` extra) not installed")
def test_llama_cpp_runs_the_gguf_within_q8_tolerance(exported: Path, published: Path) -> None:
    import llama_cpp

    ids = _ids(published)
    expected = _reference_logits(published, ids)
    llm = llama_cpp.Llama(str(exported / "tiny-model.q8_0.gguf"), n_ctx=256, logits_all=True,
                          n_threads=1, verbose=False)  # fmt: skip
    llm.eval(ids[0].tolist())
    got = torch.tensor(np.array(llm.scores[: ids.shape[1]]), dtype=torch.float32)
    diff = (got - expected).abs().max().item()
    assert diff <= REL_TOLERANCE * expected.abs().max().item(), diff


def test_q4_k_m_is_llama_cpp_quantizer_or_a_clear_error(
    published: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    if not HAS_LLAMA_CPP:
        with pytest.raises(ExportError, match=r"`llama` extra"):
            export_gguf(published, tmp_path, keys[1], "q4_k_m")
        return
    done = export_gguf(published, tmp_path, keys[1], "q4_k_m")
    assert done.gguf.name == "tiny-model.q4_k_m.gguf" and done.gguf.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_a_tampered_folder_and_bad_options(
    published: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "tampered"
    shutil.copytree(published, folder)
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    with pytest.raises(IntegrityError, match=r"`config\.json` does not match"):
        export_gguf(folder, tmp_path / "out", keys[1])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match=r"`quant`"):
        export_gguf(published, tmp_path / "out", keys[1], "q2_k")
    result = CliRunner().invoke(app, ["export", str(published), "--public-key", str(keys[1])])
    assert result.exit_code == 2 and "--gguf" in result.output
