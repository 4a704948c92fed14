"""Attention for Gemma 3 layers: flash-attention Pallas TPU kernels (forward, dq, dk/dv) and a jnp reference.

Masks come from positions, as in gemstill.model: a key at position kp is visible to a query at qp iff kp >= 0
(-1 marks padding), kp <= qp, qp - kp < window (local layers) and both carry the same segment id (packed
documents). GQA/MQA read each K/V head once per group through the block index maps; nothing is repeated.

Block skipping: XLA first reduces the positions and segments to per-block min/max and derives which kv blocks
can hold a visible key for each q block (and the reverse, for the dk/dv kernel). Each kernel's reduction axis
walks only a contiguous range of blocks starting at the first needed one; its static length is the number of
blocks a window can span, so a local layer runs about (window + block) / length of a global layer's grid
steps. That bound assumes key index distance never exceeds position distance for a visible pair (true for
left/right padding and for packed documents whose positions restart at 0); when a batch breaks it (positions
with gaps), a `lax.cond` runs the same kernels over every block, so results never depend on the assumption.
Blocks inside the range that cannot hold a visible key are skipped by the kernel (no compute; the clamped
index map avoids their DMA past the end of the range).

Queries with no visible key: the kernels return 0 there (and pass no gradient); the model's dense softmax over
an all-masked row returns the mean of V instead. Such rows are padding, never read by a loss.

On a device mesh the kernels run under shard_map: examples split over data x fsdp, heads over tensor when the kv
heads divide evenly (a query head's kv head stays on its device). Attention mixes nothing across examples or kv
heads, so no reduction crosses devices (`flash_attention_on_mesh`). gemstill.kernels.dispatch.attention picks
between these kernels and `attention_reference`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from ._dispatch import round_up
from ._mesh import AnyMesh, plan, shard_mapped
from .masks import attention_mask

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_KV = 256
_MASKED = -2.3819763e38  # the model's fill value for masked logits (reference only)
_NEG = -1e30  # masked score inside the kernels: finite, so a fully masked tile gives exp(0) * 0, not NaN
_EMPTY_LSE = 1e30  # log-sum-exp of a row with no visible key: exp(s - lse) = 0 in the backward pass


def visible(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    window: int | None,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
) -> jax.Array:
    """[B, T, S] mask: gemstill.kernels.masks.attention_mask with separate query/key segment ids (one rule for both)."""
    return attention_mask(q_positions, kv_positions, window, q_segments, kv_segments)


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
    window: int | None,
    softcap: float | None,
) -> jax.Array:
    """The model's attention math exactly: q [B,T,N,H] (already scaled), k/v [B,S,K,H] -> [B,T,N,H]."""
    batch, steps, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, steps, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", grouped, k, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    mask = visible(q_positions, kv_positions, window, *_segments(q_segments, kv_segments))
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(q.dtype), v)
    return out.reshape(batch, steps, heads, head_dim)


def flash_attention_on_mesh(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
    window: int | None,
    softcap: float | None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
    interpret: Any = False,
    mesh: AnyMesh | None = None,
) -> jax.Array:
    """`flash_attention` split over a device mesh by shard_map: the kernel path of gemstill.kernels.dispatch.attention.

    q [B,T,N,H] (RoPE'd, normed, times the query scale), k/v [B,S,K,H] with K dividing N; positions [B,T]/[B,S]
    int32 (-1: padding key); segments [B,T]/[B,S] or None. Rows with no visible key differ (see module doc).
    mesh: where the kernels run split over examples and heads (default: the mesh set by jax.set_mesh, if any);
    see gemstill.kernels._mesh.plan for when they run unsplit.
    """

    def kernel(q, k, v, q_positions, kv_positions, q_segments, kv_segments):
        return flash_attention(
            q,
            k,
            v,
            q_positions=q_positions,
            kv_positions=kv_positions,
            q_segments=q_segments,
            kv_segments=kv_segments,
            window=window,
            softcap=softcap,
            block_q=block_q,
            block_kv=block_kv,
            interpret=interpret,
        )

    args = (q, k, v, q_positions, kv_positions, *_segments(q_segments, kv_segments))
    split = plan(mesh, q.shape[0], k.shape[2])
    if split is None:
        return kernel(*args)
    heads, rows = P(split.batch, None, split.heads), P(split.batch)
    return shard_mapped(kernel, split, in_specs=(heads, heads, heads, rows, rows, rows, rows), out_specs=heads)(*args)


def _segments(q_segments, kv_segments):
    if (q_segments is None) != (kv_segments is None):
        raise ValueError("give both q_segments and kv_segments, or neither")
    return q_segments, kv_segments


class _Config(NamedTuple):
    """Static settings of one call (hashable: a custom_vjp nondiff argument)."""

    block_q: int
    block_kv: int
    window: int | None
    softcap: float | None
    interpret: Any


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
    window: int | None,
    softcap: float | None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
    interpret: Any = False,
) -> jax.Array:
    """The kernel path of dispatch.attention, unsplit (custom VJP: gradients for q, k, v, none for the rest)."""
    q_segments, kv_segments = _segments(q_segments, kv_segments)
    if q_segments is None:
        q_segments = jnp.zeros(q_positions.shape, jnp.int32)
        kv_segments = jnp.zeros(kv_positions.shape, jnp.int32)
    steps, length = q.shape[1], k.shape[1]
    config = _Config(
        block_q=min(block_q, round_up(steps, 8)),
        block_kv=min(block_kv, round_up(length, 8)),
        window=window,
        softcap=softcap,
        interpret=interpret,
    )
    meta = (
        q_positions.astype(jnp.int32),
        kv_positions.astype(jnp.int32),
        q_segments.astype(jnp.int32),
        kv_segments.astype(jnp.int32),
    )
    return _flash(q, k, v, meta, config)


# ---------------------------------------------------------------------------------------------------------------
# layout and block metadata (XLA)


class _Layout(NamedTuple):
    """Head-major, block-padded operands and the per-block skip tables the kernels read from SMEM."""

    q: jax.Array  # [B, N, T', H]
    k: jax.Array  # [B, K, S', H]
    v: jax.Array  # [B, K, S', H]
    q_pos: jax.Array  # [B, T', 1]
    q_seg: jax.Array  # [B, T', 1]
    kv_pos: jax.Array  # [B, 1, S']
    kv_seg: jax.Array  # [B, 1, S']
    kv_range: jax.Array  # [B * nq * 2] int32: first needed kv block, number of blocks from it to the last needed
    q_range: jax.Array  # [B * nk * 2] int32: the same for the q blocks that need each kv block
    need: jax.Array  # [B * nq * nk] int32: 1 where the (q block, kv block) pair can hold a visible key


def _pad_axis(x: jax.Array, axis: int, size: int, mode: str = "constant", value: int = 0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    if mode == "edge":
        return jnp.pad(x, pad, mode="edge")
    return jnp.pad(x, pad, constant_values=value)


def _block_ranges(need: jax.Array) -> jax.Array:
    """[B, n, m] bool -> [B, n, 2] (first needed index along m, count up to the last needed; 0 if none)."""
    count = need.shape[-1]
    first = jnp.argmax(need, axis=-1)
    last = count - 1 - jnp.argmax(need[..., ::-1], axis=-1)
    span = jnp.where(jnp.any(need, axis=-1), last - first + 1, 0)
    return jnp.stack([first, span], axis=-1).astype(jnp.int32)


def _layout(q, k, v, meta, config: _Config) -> _Layout:
    q_pos, kv_pos, q_seg, kv_seg = meta
    bq, bk = config.block_q, config.block_kv
    steps, length = round_up(q.shape[1], bq), round_up(k.shape[1], bk)
    # padded queries repeat the last position and segment (their rows are dropped); padded keys are invisible
    q_pos, q_seg = (_pad_axis(x, 1, steps, "edge") for x in (q_pos, q_seg))
    kv_pos = _pad_axis(kv_pos, 1, length, value=-1)
    kv_seg = _pad_axis(kv_seg, 1, length, "edge")

    batch = q.shape[0]
    qp, qs = q_pos.reshape(batch, -1, bq), q_seg.reshape(batch, -1, bq)
    kp, ks = kv_pos.reshape(batch, -1, bk), kv_seg.reshape(batch, -1, bk)
    valid = kp >= 0
    big = jnp.iinfo(jnp.int32).max
    k_min = jnp.min(jnp.where(valid, kp, big), axis=-1)
    k_max = jnp.max(jnp.where(valid, kp, -1), axis=-1)
    ks_min = jnp.min(jnp.where(valid, ks, big), axis=-1)
    ks_max = jnp.max(jnp.where(valid, ks, -big), axis=-1)
    q_min, q_max = jnp.min(qp, axis=-1), jnp.max(qp, axis=-1)
    qs_min, qs_max = jnp.min(qs, axis=-1), jnp.max(qs, axis=-1)

    def pair(a, b):  # [B, nq] x [B, nk] -> [B, nq, nk]
        return a[:, :, None], b[:, None, :]

    need = (k_max >= 0)[:, None, :] & (lambda a, b: b <= a)(*pair(q_max, k_min))
    if config.window is not None:
        need &= (lambda a, b: a - b < config.window)(*pair(q_min, k_max))
    need &= (lambda a, b: b <= a)(*pair(qs_max, ks_min)) & (lambda a, b: a <= b)(*pair(qs_min, ks_max))

    return _Layout(
        q=_pad_axis(q, 1, steps).transpose(0, 2, 1, 3),
        k=_pad_axis(k, 1, length).transpose(0, 2, 1, 3),
        v=_pad_axis(v, 1, length).transpose(0, 2, 1, 3),
        q_pos=q_pos[:, :, None],
        q_seg=q_seg[:, :, None],
        kv_pos=kv_pos[:, None, :],
        kv_seg=kv_seg[:, None, :],
        kv_range=_block_ranges(need).reshape(-1),
        q_range=_block_ranges(need.transpose(0, 2, 1)).reshape(-1),
        need=need.astype(jnp.int32).reshape(-1),
    )


def _window_steps(window: int | None, blocks: int, own_block: int, other_block: int) -> int:
    """Grid steps along the reduction axis: all blocks, or as many as a window can span."""
    if window is None:
        return blocks
    return min(blocks, -(-(window - 1 + own_block) // other_block) + 1)


# ---------------------------------------------------------------------------------------------------------------
# kernels


def _tile_mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, window: int | None) -> jax.Array:
    q_pos, kv_pos = q_pos_ref[...], kv_pos_ref[...]  # [bq, 1], [1, bk]
    delta = q_pos - kv_pos
    mask = (kv_pos >= 0) & (delta >= 0) & (q_seg_ref[...] == kv_seg_ref[...])
    if window is not None:
        mask &= delta < window
    return mask


def _scores(q: jax.Array, k: jax.Array, softcap: float | None) -> jax.Array:
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s if softcap is None else jnp.tanh(s / softcap) * softcap


def _active(range_ref, row, j, need_ref, pair) -> jax.Array:
    """Whether reduction step j of this row does work: inside the row's range and on a needed block pair.

    The need table is read at the clamped index (SMEM reads are not bounds-checked on TPU, and `&` evaluates
    both sides), so steps past the range never index beyond it.
    """
    span = range_ref[row * 2 + 1]
    return (j < span) & (need_ref[pair(_clamped(range_ref, row, j))] != 0)


def _fwd_kernel(
    kv_range_ref,
    need_ref,
    q_ref,
    k_ref,
    v_ref,
    q_pos_ref,
    q_seg_ref,
    kv_pos_ref,
    kv_seg_ref,
    o_ref,
    lse_ref,
    m_ref,
    l_ref,
    acc_ref,
    *,
    window,
    softcap,
    nq,
    nk,
):
    """Grid (b, head, q block, step): online softmax over the needed kv blocks of this q block."""
    b, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    active = _active(kv_range_ref, b * nq + qi, j, need_ref, lambda kj: (b * nq + qi) * nk + kj)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(active)
    def _step():
        mask = _tile_mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, window)
        s = jnp.where(mask, _scores(q_ref[...], k_ref[...], softcap), _NEG)
        m_old = m_ref[...]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_old - m_new)
        v = v_ref[...]
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        total = l_ref[...]
        seen = total > 0
        safe = jnp.where(seen, total, 1.0)
        o_ref[...] = jnp.where(seen, acc_ref[...] / safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(safe), _EMPTY_LSE)


def _probs_and_dscores(q, k, v, do, lse, delta, mask, softcap):
    """Recomputed p [bq, bk] and dL/d(raw scores) of one tile."""
    s = _scores(q, k, softcap)
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    if softcap is not None:
        ds = ds * (1.0 - jnp.square(s / softcap))
    return p, ds


def _dq_kernel(
    kv_range_ref,
    need_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_pos_ref,
    q_seg_ref,
    kv_pos_ref,
    kv_seg_ref,
    dq_ref,
    acc_ref,
    *,
    window,
    softcap,
    nq,
    nk,
):
    """Grid (b, head, q block, step): dq = sum over needed kv blocks of ds @ k."""
    b, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    active = _active(kv_range_ref, b * nq + qi, j, need_ref, lambda kj: (b * nq + qi) * nk + kj)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(active)
    def _step():
        mask = _tile_mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, window)
        k = k_ref[...]
        _, ds = _probs_and_dscores(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask, softcap)
        acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(
    q_range_ref,
    need_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_pos_ref,
    q_seg_ref,
    kv_pos_ref,
    kv_seg_ref,
    dk_ref,
    dv_ref,
    dk_acc,
    dv_acc,
    *,
    window,
    softcap,
    nq,
    nk,
):
    """Grid (b, kv head, kv block, group member, step): dk, dv summed over the group's heads and needed q blocks."""
    b, kj, g, j = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    active = _active(q_range_ref, b * nk + kj, j, need_ref, lambda qi: (b * nq + qi) * nk + kj)

    @pl.when((g == 0) & (j == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(active)
    def _step():
        mask = _tile_mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, window)
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_dscores(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], mask, softcap)
        contract_rows = (((0,), (0,)), ((), ()))
        dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype), do, contract_rows, preferred_element_type=jnp.float32)
        dk_acc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, contract_rows, preferred_element_type=jnp.float32)

    @pl.when((g == pl.num_programs(3) - 1) & (j == pl.num_programs(4) - 1))
    def _write():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------
# pallas_call wrappers


def _clamped(range_ref, row, j):
    """Block index of reduction step j: first + j, held at the last needed block once the range is used up."""
    first, span = range_ref[row * 2], range_ref[row * 2 + 1]
    return first + jnp.minimum(j, jnp.maximum(span - 1, 0))


def _sizes(lay: _Layout, config: _Config) -> tuple[int, int, int, int, int]:
    batch, heads, steps, head_dim = lay.q.shape
    nq, nk = steps // config.block_q, lay.k.shape[2] // config.block_kv
    return batch, heads, head_dim, nq, nk


def _q_side_specs(config: _Config, nq: int, groups: int):
    """Specs for grid (b, head, q block, step) walking kv blocks."""
    bq, bk = config.block_q, config.block_kv

    def kv_block(b, n, qi, j, kv_range, need):
        return _clamped(kv_range, b * nq + qi, j)

    head_dim_block = lambda b, n, qi, j, *_: (b, n, qi, 0)  # noqa: E731
    kv_spec = lambda head_dim: pl.BlockSpec(  # noqa: E731
        (None, None, bk, head_dim), lambda b, n, qi, j, *r: (b, n // groups, kv_block(b, n, qi, j, *r), 0)
    )
    q_spec = lambda head_dim: pl.BlockSpec((None, None, bq, head_dim), head_dim_block)  # noqa: E731
    row_spec = pl.BlockSpec((None, None, bq, 1), head_dim_block)
    q_meta = pl.BlockSpec((None, bq, 1), lambda b, n, qi, j, *_: (b, qi, 0))
    kv_meta = pl.BlockSpec((None, 1, bk), lambda b, n, qi, j, *r: (b, 0, kv_block(b, n, qi, j, *r)))
    return q_spec, kv_spec, row_spec, q_meta, kv_meta


def _forward(lay: _Layout, config: _Config, kv_steps: int) -> tuple[jax.Array, jax.Array]:
    batch, heads, head_dim, nq, nk = _sizes(lay, config)
    groups = heads // lay.k.shape[1]
    q_spec, kv_spec, row_spec, q_meta, kv_meta = _q_side_specs(config, nq, groups)
    kernel = functools.partial(_fwd_kernel, window=config.window, softcap=config.softcap, nq=nq, nk=nk)
    bq = config.block_q
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, nq, kv_steps),
            in_specs=[q_spec(head_dim), kv_spec(head_dim), kv_spec(head_dim), q_meta, q_meta, kv_meta, kv_meta],
            out_specs=[q_spec(head_dim), row_spec],
            scratch_shapes=[
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, head_dim), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(lay.q.shape, lay.q.dtype),
            jax.ShapeDtypeStruct((*lay.q.shape[:3], 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=config.interpret,
        name="flash_attention_fwd",
    )(lay.kv_range, lay.need, lay.q, lay.k, lay.v, lay.q_pos, lay.q_seg, lay.kv_pos, lay.kv_seg)


def _grad_q(lay: _Layout, do, lse, delta, config: _Config, kv_steps: int) -> jax.Array:
    batch, heads, head_dim, nq, nk = _sizes(lay, config)
    groups = heads // lay.k.shape[1]
    q_spec, kv_spec, row_spec, q_meta, kv_meta = _q_side_specs(config, nq, groups)
    kernel = functools.partial(_dq_kernel, window=config.window, softcap=config.softcap, nq=nq, nk=nk)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, nq, kv_steps),
            in_specs=[
                q_spec(head_dim),
                kv_spec(head_dim),
                kv_spec(head_dim),
                q_spec(head_dim),
                row_spec,
                row_spec,
                q_meta,
                q_meta,
                kv_meta,
                kv_meta,
            ],
            out_specs=q_spec(head_dim),
            scratch_shapes=[pltpu.VMEM((config.block_q, head_dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(lay.q.shape, lay.q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=config.interpret,
        name="flash_attention_dq",
    )(lay.kv_range, lay.need, lay.q, lay.k, lay.v, do, lse, delta, lay.q_pos, lay.q_seg, lay.kv_pos, lay.kv_seg)


def _grad_kv(lay: _Layout, do, lse, delta, config: _Config, q_steps: int) -> tuple[jax.Array, jax.Array]:
    batch, heads, head_dim, nq, nk = _sizes(lay, config)
    kv_heads = lay.k.shape[1]
    groups = heads // kv_heads
    bq, bk = config.block_q, config.block_kv

    def q_block(b, h, kj, g, j, q_range, need):
        return _clamped(q_range, b * nk + kj, j)

    q_side = lambda b, h, kj, g, j, *r: (b, h * groups + g, q_block(b, h, kj, g, j, *r), 0)  # noqa: E731
    kv_side = lambda b, h, kj, g, j, *_: (b, h, kj, 0)  # noqa: E731
    q_spec = pl.BlockSpec((None, None, bq, head_dim), q_side)
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), kv_side)
    row_spec = pl.BlockSpec((None, None, bq, 1), q_side)
    q_meta = pl.BlockSpec((None, bq, 1), lambda b, h, kj, g, j, *r: (b, q_block(b, h, kj, g, j, *r), 0))
    kv_meta = pl.BlockSpec((None, 1, bk), lambda b, h, kj, g, j, *_: (b, 0, kj))
    kernel = functools.partial(_dkv_kernel, window=config.window, softcap=config.softcap, nq=nq, nk=nk)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, kv_heads, nk, groups, q_steps),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, q_meta, q_meta, kv_meta, kv_meta],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(lay.k.shape, lay.k.dtype), jax.ShapeDtypeStruct(lay.v.shape, lay.v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=config.interpret,
        name="flash_attention_dkv",
    )(lay.q_range, lay.need, lay.q, lay.k, lay.v, do, lse, delta, lay.q_pos, lay.q_seg, lay.kv_pos, lay.kv_seg)


# ---------------------------------------------------------------------------------------------------------------
# custom VJP, with the full-range fallback


def _steps(lay: _Layout, config: _Config) -> tuple[int, int, jax.Array]:
    """(kv steps, q steps) a window needs, and whether every block range of this batch fits in them."""
    _, _, _, nq, nk = _sizes(lay, config)
    kv_steps = _window_steps(config.window, nk, config.block_q, config.block_kv)
    q_steps = _window_steps(config.window, nq, config.block_kv, config.block_q)
    fits = (jnp.max(lay.kv_range[1::2]) <= kv_steps) & (jnp.max(lay.q_range[1::2]) <= q_steps)
    return kv_steps, q_steps, fits


def _unlayout(x: jax.Array, steps: int) -> jax.Array:
    return x.transpose(0, 2, 1, 3)[:, :steps]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, meta, config):
    return _flash_fwd(q, k, v, meta, config)[0]


def _flash_fwd(q, k, v, meta, config):
    lay = _layout(q, k, v, meta, config)
    kv_steps, _, fits = _steps(lay, config)
    _, _, _, _, nk = _sizes(lay, config)
    if kv_steps == nk:
        out, lse = _forward(lay, config, nk)
    else:
        out, lse = jax.lax.cond(fits, lambda: _forward(lay, config, kv_steps), lambda: _forward(lay, config, nk))
    return _unlayout(out, q.shape[1]), (q, k, v, meta, out, lse)


def _flash_bwd(config, residuals, d_out):
    q, k, v, meta, out, lse = residuals
    lay = _layout(q, k, v, meta, config)
    kv_steps, q_steps, fits = _steps(lay, config)
    _, _, _, nq, nk = _sizes(lay, config)
    do = _pad_axis(d_out, 1, lay.q.shape[2]).transpose(0, 2, 1, 3).astype(q.dtype)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)

    def run(kv: int, qs: int):
        return _grad_q(lay, do, lse, delta, config, kv), *_grad_kv(lay, do, lse, delta, config, qs)

    if kv_steps == nk and q_steps == nq:
        dq, dk, dv = run(nk, nq)
    else:
        dq, dk, dv = jax.lax.cond(fits, lambda: run(kv_steps, q_steps), lambda: run(nk, nq))
    return _unlayout(dq, q.shape[1]), _unlayout(dk, k.shape[1]), _unlayout(dv, v.shape[1]), None


_flash.defvjp(_flash_fwd, _flash_bwd)
