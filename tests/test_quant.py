"""gemstill.quant against independent references.

- Q8_0 / Q4_0 blocks equal gguf-py's `quants.quantize` byte for byte, and our dequantization equals gguf-py's
  `quants.dequantize` exactly, on random weights (with the corner cases: zero blocks, ties, constant blocks) and on
  real Gemma 3 270M weights. The fake-quant forward pass equals gguf-py's dequantized weights exactly.
- int8 per output channel against a plain numpy formula (1e-7 of the largest weight: XLA may divide by
  multiplying with a reciprocal).
- Quantizing a dequantized weight again gives the same weights (what makes a QAT export lossless).
- A model holding packed weights gives bit-identical logits to the same model with dequantized float weights.
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from gemstill.checkpoints.gguf_file import load_gguf, save_gguf
from gemstill.errors import GemstillError
from gemstill.model import build_model
from gemstill.params import from_flat, to_flat
from gemstill.quant import codec
from gemstill.quant.packed import PackedWeight
from gemstill.quant.weights import check_params, deployed_bytes, is_quantized_name, quantized_params

GGUF_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def _random_weights(seed: int, rows: int = 96, features: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, features)) * rng.uniform(1e-3, 3.0, (rows, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = w[1, 0]  # a constant block
    w[2, :32] = np.linspace(-1, 1, 32, dtype=np.float32)  # two elements of equal |w| and opposite sign
    w[3, :32] = np.round(w[3, :32] * 4) / 4  # many exact ties
    w[4, 32:64] *= 1e-30  # subnormal-sized scales
    return w


@pytest.fixture(scope="module")
def real_weights(gemma3_270m_gguf) -> list[np.ndarray]:
    """Three real tensors of Gemma 3 270M (dequantized from its Q4_K_M / Q6_K / Q5_0 file): [out, in] float32."""
    reader = gguf.GGUFReader(gemma3_270m_gguf)
    wanted = ("blk.0.attn_q.weight", "blk.3.ffn_down.weight", "blk.17.ffn_gate.weight")
    return [
        gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors if t.name in wanted
    ]


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_equal_gguf_py_on_random_weights(fmt, seed):
    w = _random_weights(seed)
    _check_against_gguf_py(w, fmt)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_blocks_equal_gguf_py_on_real_weights(real_weights, fmt):
    assert len(real_weights) == 3
    for w in real_weights:
        _check_against_gguf_py(w, fmt)


def _check_against_gguf_py(w: np.ndarray, fmt: str) -> None:
    reference = gguf.quants.quantize(w, GGUF_TYPES[fmt])
    codes, scales = codec.quantize_numpy(w, fmt)
    np.testing.assert_array_equal(codec.to_gguf_blocks(codes, scales, fmt), reference)
    expected = gguf.quants.dequantize(reference, GGUF_TYPES[fmt])
    np.testing.assert_array_equal(codec.dequantize_numpy(w, fmt), expected)
    np.testing.assert_array_equal(np.asarray(codec.fake_quant(jnp.asarray(w), fmt)), expected)
    back_codes, back_scales = codec.from_gguf_blocks(reference, fmt, *w.shape)
    np.testing.assert_array_equal(back_codes, codes)
    np.testing.assert_array_equal(back_scales, scales)
    # idempotence: the dequantized weight is on its own grid (a zero block may flip its scale's sign: -0.0 vs 0.0)
    np.testing.assert_array_equal(codec.dequantize_numpy(expected, fmt), expected)


def test_int8_per_output_channel_against_numpy():
    w = _random_weights(3)
    scale = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)
    expected = np.clip(np.round(w / np.where(scale == 0, 1, scale)), -127, 127) * scale
    np.testing.assert_allclose(codec.dequantize_numpy(w, "int8"), expected, rtol=0, atol=1e-7 * np.abs(w).max())
    # a float32 scale re-derived from on-grid weights moves by at most an ulp (GGUF's fp16 scales do not move)
    again = codec.dequantize_numpy(codec.dequantize_numpy(w, "int8"), "int8")
    np.testing.assert_allclose(again, expected, rtol=4e-7, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "q8_0", "q4_0"])
def test_fake_quant_gradient_is_straight_through(fmt):
    w = jnp.asarray(_random_weights(4, 8, 64))
    cotangent = jax.random.normal(jax.random.key(1), w.shape)
    grad = jax.grad(lambda w: jnp.sum(codec.fake_quant(w, fmt) * cotangent))(w)
    np.testing.assert_array_equal(grad, cotangent)


def test_shapes_that_do_not_split_into_blocks_are_refused_by_name():
    config = TINY.replace(embed_dim=40, head_dim=16)
    with pytest.raises(GemstillError, match=r"tensor token_embd\.weight has rows of 40 values.*refused"):
        check_params(config, "q4_0", include_embedding=True)
    with pytest.raises(GemstillError, match=r"tensor blk\.0\.attn_q\.weight has rows of 40 values.*refused"):
        check_params(config, "q8_0", include_embedding=False)
    check_params(config, "int8", include_embedding=True)  # per channel: any width


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_packed_gguf_model_equals_the_dequantized_model(tmp_path, fmt):
    """Weights kept packed in memory (dequantized inside the jitted pass) give the same logits, bit for bit,
    as the float32 weights gguf-py dequantizes, and take 1/3.8 (q8_0) or 1/7.1 (q4_0) of the float bytes."""
    config = TINY.replace(head_dim=32)
    flat = {k: np.asarray(v) for k, v in to_flat(build_model(config, seed=3)).items()}
    path = save_gguf(tmp_path / "m.gguf", config, flat, quant=fmt)
    _, dense, _ = load_gguf(path)
    _, packed, _ = load_gguf(path, packed=True)
    assert isinstance(packed["layers.0.mlp.gate"], PackedWeight)
    assert isinstance(packed["embedding"], PackedWeight)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 24)))
    np.testing.assert_array_equal(from_flat(config, packed)(tokens).logits, from_flat(config, dense)(tokens).logits)
    weights = [name for name in dense if is_quantized_name(name, True)]
    float_bytes = sum(np.asarray(dense[n]).nbytes for n in weights)
    packed_bytes = sum(packed[n].nbytes for n in weights)
    assert packed_bytes == pytest.approx(float_bytes * (34 if fmt == "q8_0" else 18) / (32 * 4), rel=1e-9)
    in_file = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    assert deployed_bytes(config, fmt, include_embedding=True) == in_file
    # and the round-to-nearest variant computed in memory is the same model
    on_grid = quantized_params(config, flat, fmt, include_embedding=True)
    for name in dense:
        np.testing.assert_array_equal(on_grid[name], dense[name])
