"""`gemstill export` on small random models: what each format writes, exact GGUF round trips, and bad input
(one line, exit 1, nothing left behind). The real 270M against transformers and llama.cpp is in
test_export_270m.py; the pipeline's export stage in test_tiny_pipeline.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from gemstill.checkpoints.gguf_file import load_gguf
from gemstill.checkpoints.native import save_native
from gemstill.errors import GemstillError
from gemstill.export import ExportTarget, export_model
from gemstill.model import build_model
from gemstill.params import to_flat
from gemstill.quant.weights import quantized_params

REPO = Path(__file__).resolve().parents[1]
CONFIG = TINY.replace(head_dim=32, query_pre_attn_scalar=32.0)  # rows of 64 or 128 values: every format applies


def gemstill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemstill", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A random native checkpoint (no tokenizer)."""
    flat = {k: np.asarray(v) for k, v in to_flat(build_model(CONFIG, seed=5)).items()}
    directory = save_native(tmp_path_factory.mktemp("native") / "model", CONFIG, flat, None)
    return directory, flat


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_requests_are_one_line_errors(tmp_path, tiny_model):
    directory, _ = tiny_model
    spec = f"orbax:{directory}"
    out = tmp_path / "out"
    _one_line_error(gemstill("export", "--model", spec, "--format", "onnx", "--out", str(out)), "unknown export format")
    _one_line_error(
        gemstill("export", "--model", spec, "--format", "hf", "--quant", "q4_0", "--out", str(out)),
        "--quant q4_0 is not available for --format hf",
    )
    _one_line_error(
        gemstill("export", "--model", spec, "--format", "gguf", "--quant", "q5_k", "--out", str(out)), "choose one of"
    )
    _one_line_error(gemstill("export", "--model", spec, "--format", "gguf", "--out", str(out)), "carries no tokenizer")
    not_gemma = tmp_path / "llama"
    not_gemma.mkdir()
    (not_gemma / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    _one_line_error(
        gemstill("export", "--model", f"hf:{not_gemma}", "--format", "hf", "--out", str(out)), "is not Gemma 3"
    )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # no scratch directory left behind


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_model):
    """An existing --out is refused; --overwrite replaces only a directory holding a gemstill export (its marker),
    never anything else (a directory of the user's files stays byte for byte), nor a file, nor the working
    directory."""
    directory, _ = tiny_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["export", "--model", f"orbax:{directory}", "--format", "orbax", "--out", str(out)]
    _one_line_error(gemstill(*args), "already exists", "--overwrite")
    _one_line_error(gemstill(*args, "--overwrite"), "holds no gemstill export", "choose another --out")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    exported = tmp_path / "exported"
    args = ["export", "--model", f"orbax:{directory}", "--format", "orbax", "--out", str(exported)]
    assert gemstill(*args).returncode == 0
    result = gemstill(*args, "--overwrite")  # an export: replaced
    assert result.returncode == 0, result.stderr
    files = ["GEMMA_TERMS.html", "README.md", "config.json", "gemstill-export.json", "params"]
    assert sorted(p.name for p in exported.iterdir()) == files
    assert "## License" in (exported / "README.md").read_text()
    _one_line_error(gemstill(*args[:-1], str(out / "keep.txt")), "is a file", "choose a directory")
    _one_line_error(gemstill(*args[:-1], str(out / "keep.txt" / "sub")), "is a file, not a directory")
    _one_line_error(gemstill(*args[:-1], ".", "--overwrite"), "working directory", "new directory")


def test_blocks_that_do_not_fit_are_refused_by_tensor_name(tmp_path):
    config = TINY.replace(embed_dim=48)  # rows of 48 values: not a multiple of 32
    flat = {k: np.asarray(v) for k, v in to_flat(build_model(config)).items()}
    directory = save_native(tmp_path / "model", config, flat, None)
    result = gemstill("export", "--model", f"orbax:{directory}", "--format", "gguf", "--quant", "q4_0", "--out", "x")
    _one_line_error(result, "tensor token_embd.weight has rows of 48 values", "refused, not kept in f16")
    assert not (REPO / "x").exists()


def test_a_failure_mid_export_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    _, flat = tiny_model
    incomplete = {k: v for k, v in flat.items() if k != "layers.3.mlp.down"}
    with pytest.raises(GemstillError, match="1 parameters missing"):
        export_model(CONFIG, incomplete, None, "orbax", tmp_path / "out")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gemstill.checkpoints.hf.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(CONFIG, flat, _tiny_tokenizer(), "hf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_gguf_export_stores_exactly_the_quantized_weights(tmp_path, tiny_model, quant):
    """What gemstill reads back from its GGUF is the float weight cast to the storage type, or for q8_0/q4_0
    exactly the round-to-nearest weights of gemstill.quant; a second export of that file changes nothing."""
    _, flat = tiny_model
    tokenizer = _tiny_tokenizer()
    out = export_model(CONFIG, flat, tokenizer, "gguf", tmp_path / "gguf", quant)
    config, loaded, _ = load_gguf(out / "model.gguf")
    assert config == CONFIG
    if quant in ("q8_0", "q4_0"):
        expected = quantized_params(CONFIG, flat, quant, include_embedding=True)
    else:
        import ml_dtypes

        dtype = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}[quant]
        expected = {k: v if k.endswith(".scale") else v.astype(dtype).astype(np.float32) for k, v in flat.items()}
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    from gemstill.loading import load_tokenizer

    rebuilt = load_tokenizer(f"gguf:{out / 'model.gguf'}")  # padded to the 512 embedding rows, same ids
    text = "<start_of_turn>user\n12 + 7 = 19.  The answer<end_of_turn>"
    assert rebuilt.vocab_size == CONFIG.vocab_size > tokenizer.vocab_size
    assert rebuilt.encode(text) == tokenizer.encode(text)
    again = export_model(config, loaded, tokenizer, "gguf", tmp_path / "again", quant)
    _, reloaded, _ = load_gguf(again / "model.gguf")
    for name, value in loaded.items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=name)


def _tiny_tokenizer():
    """A small Gemma-style SentencePiece model (the tiny profile's recipe), at most 512 pieces."""
    from gemstill.data.config import TokenizerTrainingConfig
    from gemstill.data.prepare import train_sentencepiece

    lines = (f"{a} + {b} = {a + b}. The answer is {a * b}." for a in range(40) for b in range(20))
    return train_sentencepiece(lines, TokenizerTrainingConfig(vocab_size=512))


def test_export_targets_validate_in_the_profile():
    assert ExportTarget(format="gguf").quant == "f32"
    assert ExportTarget(format="gguf", quant="q4_0").name == "gguf-q4_0"
    with pytest.raises(ValueError, match="not available for --format orbax"):
        ExportTarget(format="orbax", quant="q8_0")
    with pytest.raises(GemstillError):
        export_model(CONFIG, {}, None, "gguf", "/nonexistent/x", "q3")
