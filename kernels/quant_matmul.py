"""Weight-only quantized matmul x [M, K] @ W [K, N]: int8 per output channel, int4 per group of input rows.

Formats (symmetric, zero point 0):
  int8  values int8 [K, N] in [-127, 127], scales float32 [1, N]: W ~= values * scales
  int4  values uint8 [K / 2, N], scales float32 [K / group, N]; within each group of `group` input rows, byte
        row i holds row i in its low nibble and row i + group / 2 in its high nibble (two's complement, [-7, 7]).
        That split-halves order lets the kernel unpack a group into two contiguous halves and multiply each by
        the matching half of x, with no interleaving shuffle.
The kernel multiplies x by the integer values in the activation dtype (exact: |v| <= 127 fits bf16's mantissa),
accumulates in float32 and applies the scales per output channel (int8) or per group inside the K loop (int4).
QAT and the GGUF block formats live in gemstill.quant, which packs its int8 format with `quantize_int8`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._dispatch import round_up

DEFAULT_GROUP = 128
DEFAULT_BLOCK_M = 256
DEFAULT_BLOCK_N = 256
DEFAULT_BLOCK_K = 1024  # a multiple of the group size; 1024 / 128 = 8 scale rows per tile (one TPU sublane tile)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["values", "scales"], meta_fields=["bits", "group", "features"]
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized [K, N] weight (a pytree: bits, group and features are static); `features` is K."""

    values: jax.Array
    scales: jax.Array
    bits: int  # 8 or 4
    group: int  # input rows per scale: K for int8
    features: int


def quantize_int8(w: jax.Array) -> QuantizedWeight:
    """Symmetric int8 per output channel (column of w [K, N])."""
    w = w.astype(jnp.float32)
    scales = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127.0
    safe = jnp.where(scales > 0, scales, 1.0)
    values = jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8)
    return QuantizedWeight(values, scales, 8, w.shape[0], w.shape[0])


def quantize_int4(w: jax.Array, group: int = DEFAULT_GROUP) -> QuantizedWeight:
    """Symmetric int4 per group of `group` input rows, packed two per byte (split-halves order, see module doc)."""
    if group % 2:
        raise ValueError(f"int4 group size must be even, got {group}")
    features, outputs = w.shape
    padded = round_up(features, group)
    w = jnp.pad(w.astype(jnp.float32), [(0, padded - features), (0, 0)]).reshape(padded // group, group, outputs)
    scales = jnp.max(jnp.abs(w), axis=1) / 7.0  # [groups, N]
    safe = jnp.where(scales > 0, scales, 1.0)
    values = jnp.clip(jnp.round(w / safe[:, None, :]), -7, 7).astype(jnp.int8)
    low, high = values[:, : group // 2], values[:, group // 2 :]
    packed = (low.astype(jnp.uint8) & 0xF) | (high.astype(jnp.uint8) << 4)
    return QuantizedWeight(packed.reshape(padded // 2, outputs), scales, 4, group, features)


def _unpack_int4(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 bytes -> (low nibbles, high nibbles) as int32 in [-8, 7]."""
    as_int = packed.astype(jnp.int32)
    low, high = as_int & 0xF, (as_int >> 4) & 0xF
    return jnp.where(low >= 8, low - 16, low), jnp.where(high >= 8, high - 16, high)


def dequantize(qw: QuantizedWeight) -> jax.Array:
    """The float32 [K, N] weight a QuantizedWeight stands for."""
    if qw.bits == 8:
        return qw.values.astype(jnp.float32) * qw.scales
    groups, outputs = qw.scales.shape
    low, high = _unpack_int4(qw.values.reshape(groups, qw.group // 2, outputs))
    values = jnp.concatenate([low, high], axis=1).astype(jnp.float32) * qw.scales[:, None, :]
    return values.reshape(groups * qw.group, outputs)[: qw.features]


def quant_matmul_reference(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    """x @ dequantize(qw) in float32 at full precision, cast to x's dtype."""
    out = jnp.dot(x.astype(jnp.float32), dequantize(qw), precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)


def quant_matmul_xla(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    """The XLA path of gemstill.kernels.dispatch.quant_matmul: dequantize to x's dtype and multiply."""
    if qw.bits == 8:  # scale after the integer-valued matmul: one multiply per output instead of per weight
        out = jnp.dot(x, qw.values.astype(x.dtype), preferred_element_type=jnp.float32) * qw.scales
        return out.astype(x.dtype)
    return jnp.dot(x, dequantize(qw).astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def quant_matmul_pallas(
    x: jax.Array,
    qw: QuantizedWeight,
    *,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
    interpret: Any = False,
) -> jax.Array:
    """The kernel path of gemstill.kernels.dispatch.quant_matmul (custom VJP: gradient for x only)."""
    return _kernel_matmul(x, qw, (block_m, block_n, block_k, interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_matmul(x, qw, blocks):
    return _run(x, qw, blocks)


def _kernel_fwd(x, qw, blocks):
    return _run(x, qw, blocks), qw


def _kernel_bwd(blocks, qw, g):
    # dx = g @ W^T; integer weights take no gradient (QAT trains float weights through gemstill.quant.fake_quant)
    dx = jnp.dot(g, dequantize(qw).T.astype(g.dtype), preferred_element_type=jnp.float32).astype(g.dtype)
    return dx, None


_kernel_matmul.defvjp(_kernel_fwd, _kernel_bwd)


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, acc_ref):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    x = x_ref[...]
    acc_ref[...] += jnp.dot(x, w_ref[...].astype(x.dtype), preferred_element_type=jnp.float32)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _write():
        o_ref[...] = (acc_ref[...] * s_ref[...]).astype(o_ref.dtype)


def _dot(x: jax.Array, values: jax.Array) -> jax.Array:
    return jnp.dot(x, values.astype(x.dtype), preferred_element_type=jnp.float32)


def _int4_kernel(x_ref, w_ref, s_ref, o_ref, acc_ref, *, group: int):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    x, scales, half = x_ref[...], s_ref[...], group // 2
    low, high = _unpack_int4(w_ref[...])
    for g in range(scales.shape[0]):  # static: block_k / group groups per tile
        rows = slice(g * half, (g + 1) * half)
        part = jnp.dot(
            x[:, g * group : g * group + half], low[rows].astype(x.dtype), preferred_element_type=jnp.float32
        )
        part += jnp.dot(
            x[:, g * group + half : (g + 1) * group], high[rows].astype(x.dtype), preferred_element_type=jnp.float32
        )
        acc_ref[...] += part * scales[g : g + 1]

    @pl.when(kk == pl.num_programs(2) - 1)
    def _write():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _run(x: jax.Array, qw: QuantizedWeight, blocks: tuple[int, int, int, Any]) -> jax.Array:
    block_m, block_n, block_k, interpret = blocks
    (rows, features), outputs = x.shape, qw.values.shape[1]
    bm, bn = min(block_m, round_up(rows, 8)), min(block_n, round_up(outputs, 128))
    step = 2 if qw.bits == 4 else 1  # input rows per stored row
    unit = qw.group if qw.bits == 4 else 8
    bk = min(round_up(block_k, unit), round_up(features, unit))
    m_pad, n_pad, k_pad = round_up(rows, bm), round_up(outputs, bn), round_up(features, bk)
    x = jnp.pad(x, [(0, m_pad - rows), (0, k_pad - features)])
    values = jnp.pad(qw.values, [(0, k_pad // step - qw.values.shape[0]), (0, n_pad - outputs)])
    scale_rows = 1 if qw.bits == 8 else bk // qw.group
    scales = jnp.pad(
        qw.scales, [(0, (1 if qw.bits == 8 else k_pad // qw.group) - qw.scales.shape[0]), (0, n_pad - outputs)]
    )
    kernel = _int8_kernel if qw.bits == 8 else functools.partial(_int4_kernel, group=qw.group)
    scale_map = (lambda i, j, kk: (0, j)) if qw.bits == 8 else (lambda i, j, kk: (kk, j))
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // bm, n_pad // bn, k_pad // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bk // step, bn), lambda i, j, kk: (kk, j)),
            pl.BlockSpec((scale_rows, bn), scale_map),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"quant_matmul_int{qw.bits}",
    )(x, values, scales)
    return out[:rows, :outputs]
