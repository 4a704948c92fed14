"""The codec of the one quantizer: int8 per output channel and llama.cpp's GGUF block formats Q8_0 and Q4_0.

Every format works on a weight in Hugging Face's [out, in] layout (the layout GGUF stores), quantizing each
row along the input dimension:

  int8  one float32 scale per row, codes in [-127, 127]:  w ~= code * amax(row) / 127
  q8_0  blocks of 32 inputs, one fp16 scale d = amax / 127, codes round-half-away(w / d) in [-127, 127]
  q4_0  blocks of 32 inputs, one fp16 scale d = (signed value of largest |w|) / -8,
        codes trunc(w / d + 8.5) clipped to [0, 15], value d * (code - 8)

The arithmetic is gguf-py's (`gguf.quants.Q8_0` / `Q4_0`, itself bit-exact with ggml-quants.c), step for step in
float32, so `quantize` gives the very bytes llama.cpp writes and `dequantize` the very weights it computes with;
the tests check both against gguf-py on random and real weights. `fake_quant` is the same round trip as a
differentiable function with a straight-through gradient: the QAT forward pass sees exactly the deployed
weights. Because a dequantized weight lies on its own grid, quantizing it again returns the same codes
(idempotence, tested), so exporting a QAT student in its format loses nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemstill.errors import GemstillError
from gemstill.kernels.quant_matmul import quantize_int8

BLOCK = 32  # inputs per scale in Q8_0 and Q4_0
FORMATS = ("int8", "q8_0", "q4_0")
GGUF_FORMATS = ("q8_0", "q4_0")
_ROWS_PER_CALL = 8192  # rows quantized per jitted call: bounds the float32 temporaries of a 262k-row embedding


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise GemstillError(f"unknown quantization format {name!r}; use one of {list(FORMATS)}")
    return name


def _round_half_away(x: jax.Array) -> jax.Array:
    """gguf-py's np_roundf: |x| rounded half away from zero, sign restored, with its own float32 steps."""
    a = jnp.abs(x)
    floored = jnp.floor(a)
    return jnp.sign(x) * (floored + jnp.floor(2 * (a - floored)))


def _safe_inverse(d: jax.Array) -> jax.Array:
    return jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))


def _materialized(divisor: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The divisor as a real array: XLA turns a division by any broadcast scalar (even a traced one) into a
    multiplication by its rounded reciprocal, which moves some scales by one ulp and breaks ties unlike ggml."""
    return jax.lax.optimization_barrier(jnp.broadcast_to(divisor, shape))


def _unfused(product: jax.Array) -> jax.Array:
    """The product as a value of its own, rounded once: a select the compiler cannot resolve stands between it and
    the next addition, so LLVM cannot contract the two into one fused multiply-add (ggml rounds twice)."""
    return jnp.where(product == product, product, jnp.zeros_like(product))


def _codes_q8_0(blocks: jax.Array, divisor: jax.Array) -> tuple[jax.Array, jax.Array]:
    amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    d = amax / _materialized(divisor, amax.shape)
    codes = _round_half_away(blocks * _safe_inverse(d))
    return codes.astype(jnp.int8), d[..., 0].astype(jnp.float16)


def _codes_q4_0(blocks: jax.Array, divisor: jax.Array) -> tuple[jax.Array, jax.Array]:
    index = jnp.argmax(jnp.abs(blocks), axis=-1)[..., None]
    signed_max = jnp.take_along_axis(blocks, index, axis=-1)
    d = signed_max / _materialized(divisor, signed_max.shape)
    shifted = jnp.trunc(_unfused(blocks * _safe_inverse(d)) + jnp.float32(8.5))
    codes = jnp.clip(shifted, 0, 15).astype(jnp.int8) - 8  # gguf-py casts to uint8 first: the same for 0..16
    return codes, d[..., 0].astype(jnp.float16)


def _codes_int8(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Pallas int8 matmul's own format (per output channel = per row here), so a packed int8 weight is
    exactly the kernel's QuantizedWeight, transposed."""
    packed = quantize_int8(rows.T)
    return packed.values.T, packed.scales[0]


def codes_and_scales(w: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
    """w [rows, in] -> (int8 codes [rows, in], scales [rows, in / 32] fp16; for int8 [rows] float32)."""
    return _codes_and_scales(w, jnp.float32(127 if fmt == "q8_0" else -8), fmt)


@functools.partial(jax.jit, static_argnums=2)
def _codes_and_scales(w: jax.Array, divisor: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
    w = w.astype(jnp.float32)
    if fmt == "int8":
        return _codes_int8(w)
    rows, features = w.shape
    blocks = w.reshape(rows, features // BLOCK, BLOCK)
    codes, scales = (_codes_q8_0 if fmt == "q8_0" else _codes_q4_0)(blocks, divisor)
    return codes.reshape(rows, features), scales


def dequantize_codes(codes: jax.Array, scales: jax.Array, fmt: str) -> jax.Array:
    """float32 weights from codes and scales (exact products: an fp16 scale times a small integer)."""
    if fmt == "int8":
        return codes.astype(jnp.float32) * scales[..., None].astype(jnp.float32)
    rows, features = codes.shape
    blocks = codes.reshape(rows, features // BLOCK, BLOCK).astype(jnp.float32)
    return (blocks * scales[..., None].astype(jnp.float32)).reshape(rows, features)


def check_shape(name: str, shape: tuple[int, ...], fmt: str) -> None:
    """Refuse a weight whose rows do not split into 32-value blocks, naming it (no silent f16 fallback)."""
    if fmt in GGUF_FORMATS and shape[-1] % BLOCK:
        raise GemstillError(
            f"tensor {name} has rows of {shape[-1]} values, not a multiple of {fmt.upper()}'s {BLOCK}-value block, "
            f"so it cannot be stored in {fmt}; it is refused, not kept in f16: choose widths that are multiples "
            f"of {BLOCK}, or export with --quant f16"
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quant(w: jax.Array, fmt: str) -> jax.Array:
    """Quantize-dequantize w [rows, in] in `fmt`, with a straight-through (identity) gradient; the forward value is
    exactly the dequantized weight (w + stop_gradient(q - w) would round twice)."""
    return _roundtrip(w, fmt).astype(w.dtype)


fake_quant.defvjp(lambda w, fmt: (fake_quant(w, fmt), None), lambda fmt, _, g: (g,))


def _roundtrip(w: jax.Array, fmt: str) -> jax.Array:
    codes, scales = codes_and_scales(w, fmt)
    return dequantize_codes(codes, scales, fmt)


def quantize_numpy(w: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales of a host array, computed in row chunks so a 262k x 640 embedding stays cheap."""
    w = np.asarray(w, np.float32)
    parts = [codes_and_scales(jnp.asarray(w[i : i + _ROWS_PER_CALL]), fmt) for i in range(0, len(w), _ROWS_PER_CALL)]
    return (
        np.concatenate([np.asarray(c) for c, _ in parts]),
        np.concatenate([np.asarray(s) for _, s in parts]),
    )


def dequantize_numpy(w: np.ndarray, fmt: str) -> np.ndarray:
    """The float32 weight a host array becomes in `fmt`: what the deployed model computes with."""
    codes, scales = quantize_numpy(w, fmt)
    return np.asarray(dequantize_codes(jnp.asarray(codes), jnp.asarray(scales), fmt))


def to_gguf_blocks(codes: np.ndarray, scales: np.ndarray, fmt: str) -> np.ndarray:
    """GGUF block bytes [rows, blocks * bytes per block] (uint8), as ggml lays them out."""
    rows, features = codes.shape
    blocks = codes.reshape(rows * features // BLOCK, BLOCK)
    d = scales.reshape(-1, 1).astype(np.float16).view(np.uint8)
    if fmt == "q8_0":
        body = blocks.astype(np.int8).view(np.uint8)
    elif fmt == "q4_0":
        unsigned = (blocks + 8).astype(np.uint8)  # element j in the low nibble of byte j, j + 16 in the high one
        body = unsigned[:, : BLOCK // 2] | (unsigned[:, BLOCK // 2 :] << np.uint8(4))
    else:
        raise GemstillError(f"format {fmt!r} has no GGUF block layout; use q8_0 or q4_0")
    return np.concatenate([d, body], axis=1).reshape(rows, -1)


def from_gguf_blocks(raw: np.ndarray, fmt: str, rows: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes and fp16 scales of GGUF block bytes (the inverse of to_gguf_blocks)."""
    blocks = np.asarray(raw, np.uint8).reshape(rows * features // BLOCK, -1)
    scales = blocks[:, :2].copy().view(np.float16).reshape(rows, features // BLOCK)
    body = blocks[:, 2:]
    if fmt == "q8_0":
        return body.view(np.int8).reshape(rows, features), scales
    codes = np.concatenate([body & 0x0F, body >> 4], axis=1).astype(np.int8) - 8
    return codes.reshape(rows, features), scales
