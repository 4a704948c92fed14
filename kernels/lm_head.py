"""Fused LM head for distillation: `head_stats` as Pallas TPU kernels that never hold [tokens x vocab] logits.

Same contract as gemstill.kernels.chunked_head.head_stats (HeadStats of z = hidden @ table^T, soft-capped): the two
log-normalizers come from a kernel that walks the vocabulary a [block_n x block_v] tile at a time with an
online log-sum-exp at temperature 1 and at T together, so one pass over the table serves both. The k kept logits
and the label logit are not gathered from the tiles: comparing every tile element against k ids would cost k
vector ops per logit (k = 64..256), more than the matmul itself on a TPU's vector unit. They are instead k + 1
dot products per token against gathered table rows, done in XLA a chunk of tokens at a time.

Backward recomputes the tiles. dz = g_lse * softmax(z) + g_lse_t / T * softmax(z / T) (times the soft cap's
derivative) is formed tile by tile in two kernels: one reduces over the vocabulary for d_hidden, the other over
tokens for d_table (the flash-attention dq / dkv split, which keeps every output block resident while it is
reduced). The kept/label terms of dz are one-hot, so their share of the gradient is a gather and a scatter-add.

gemstill.kernels.dispatch.head_stats_dispatch is what the losses call: the kernel on TPU, the chunked XLA
`head_stats` elsewhere. On a device mesh the kernel runs under shard_map (`head_stats_pallas_on_mesh`): tokens
split over data x fsdp, the table passed whole (gathered once per call; its gradient is summed over the devices
by shard_map's transpose); every head statistic is a per-token value, so nothing else crosses devices.
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
from .chunked_head import HeadStats

DEFAULT_BLOCK_N = 256  # tokens per tile
DEFAULT_BLOCK_V = 1024  # vocabulary rows per tile: a 256 x 1024 f32 tile is 1 MiB of VMEM
GATHER_CHUNK = 256  # tokens per chunk of the kept/label row gather: 256 x 65 x 640 f32 = 43 MB


def head_stats_pallas_on_mesh(
    hidden: jax.Array,
    table: jax.Array,
    ids: jax.Array,
    labels: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    softcap: float | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    block_v: int = DEFAULT_BLOCK_V,
    interpret: Any = False,
    mesh: AnyMesh | None = None,
) -> HeadStats:
    """`head_stats_pallas` split over a device mesh by shard_map: the kernel path of head_stats_dispatch.

    block_n/block_v size the kernel's tiles (shrunk to fit small inputs).
    mesh: where the kernel runs split over tokens (default: the mesh set by jax.set_mesh, if any); see
    gemstill.kernels._mesh.plan for when it runs unsplit.
    """

    def kernel(hidden, table, ids, labels, temperature):
        return head_stats_pallas(
            hidden,
            table,
            ids,
            labels,
            temperature=temperature,
            softcap=softcap,
            block_n=block_n,
            block_v=block_v,
            interpret=interpret,
        )

    args = (hidden, table, ids, labels, jnp.asarray(temperature, jnp.float32))
    split = plan(mesh, hidden.shape[0])
    if split is None:
        return kernel(*args)
    rows = P(split.batch)
    return shard_mapped(kernel, split, in_specs=(rows, P(), rows, rows, P()), out_specs=rows)(*args)


def head_stats_pallas(
    hidden: jax.Array,
    table: jax.Array,
    ids: jax.Array,
    labels: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    softcap: float | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    block_v: int = DEFAULT_BLOCK_V,
    interpret: Any = False,
) -> HeadStats:
    """The fused kernel path of head_stats_dispatch, unsplit (custom VJP; none for ids, labels, temperature)."""
    tiles = _Tiles(
        block_n=min(block_n, round_up(hidden.shape[0], 8)),
        block_v=min(block_v, round_up(table.shape[0], 128)),
        softcap=softcap,
        interpret=interpret,
    )
    picked = jnp.concatenate([ids, labels[:, None]], axis=1).astype(jnp.int32)
    return _fused(hidden, table, picked, jnp.asarray(temperature, jnp.float32), tiles)


class _Tiles(NamedTuple):
    """Static settings of one fused call (hashable: a custom_vjp nondiff argument)."""

    block_n: int
    block_v: int
    softcap: float | None
    interpret: Any


# ---------------------------------------------------------------------------------------------------------------
# kernels


def _capped_tile(h: jax.Array, t: jax.Array, softcap: float | None) -> jax.Array:
    """z = h [bn, D] @ t [bv, D]^T in float32, soft-capped."""
    z = jax.lax.dot_general(h, t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return z if softcap is None else jnp.tanh(z / softcap) * softcap


def _in_vocab(j: jax.Array, block_v: int, vocab: int) -> jax.Array:
    """[1, bv] mask of the tile's columns that are real vocabulary rows (the table is padded to whole tiles)."""
    return j * block_v + jax.lax.broadcasted_iota(jnp.int32, (1, block_v), 1) < vocab


def _lse_kernel(temp_ref, h_ref, t_ref, out_ref, m1_ref, s1_ref, mt_ref, st_ref, *, vocab, block_v, softcap):
    """Grid (token tile i, vocab tile j), j innermost: online log-sum-exp of z and z / T, written at the last j."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for m_ref, s_ref in ((m1_ref, s1_ref), (mt_ref, st_ref)):
            m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
            s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)

    z = _capped_tile(h_ref[...], t_ref[...], softcap)
    z = jnp.where(_in_vocab(j, block_v, vocab), z, -jnp.inf)
    for scaled, m_ref, s_ref in ((z, m1_ref, s1_ref), (z / temp_ref[0], mt_ref, st_ref)):
        m_old = m_ref[...]
        m_new = jnp.maximum(m_old, jnp.max(scaled, axis=1, keepdims=True))
        s_ref[...] = s_ref[...] * jnp.exp(m_old - m_new) + jnp.sum(jnp.exp(scaled - m_new), axis=1, keepdims=True)
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _write():
        out_ref[:, 0:1] = m1_ref[...] + jnp.log(s1_ref[...])
        out_ref[:, 1:2] = mt_ref[...] + jnp.log(st_ref[...])


def _tile_dz(temp_ref, h_ref, t_ref, rows_ref, j, *, vocab, block_v, softcap) -> jax.Array:
    """dL/d(raw logits) of one tile from the normalizer terms: rows_ref holds (lse, lse_t, g_lse, g_lse_t)."""
    temperature = temp_ref[0]
    z = _capped_tile(h_ref[...], t_ref[...], softcap)
    rows = rows_ref[...]
    lse, lse_t, g_lse, g_lse_t = (rows[:, c : c + 1] for c in range(4))
    dz = g_lse * jnp.exp(z - lse) + (g_lse_t / temperature) * jnp.exp(z / temperature - lse_t)
    if softcap is not None:
        dz = dz * (1.0 - jnp.square(z / softcap))
    return jnp.where(_in_vocab(j, block_v, vocab), dz, 0.0)


def _dh_kernel(temp_ref, h_ref, t_ref, rows_ref, dh_ref, acc_ref, **static):
    """Grid (token tile i, vocab tile j): d_hidden[i] = sum_j dz_ij @ table_j, accumulated in VMEM."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    t = t_ref[...]
    dz = _tile_dz(temp_ref, h_ref, t_ref, rows_ref, j, **static)
    acc_ref[...] += jnp.dot(dz.astype(t.dtype), t, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(1) - 1)
    def _write():
        dh_ref[...] = acc_ref[...]


def _dt_kernel(temp_ref, h_ref, t_ref, rows_ref, dt_ref, acc_ref, **static):
    """Grid (vocab tile j, token tile i): d_table[j] = sum_i dz_ij^T @ hidden_i, accumulated in VMEM."""
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    h = h_ref[...]
    dz = _tile_dz(temp_ref, h_ref, t_ref, rows_ref, j, **static)
    acc_ref[...] += jax.lax.dot_general(
        dz.astype(h.dtype), h, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )

    @pl.when(i == pl.num_programs(1) - 1)
    def _write():
        dt_ref[...] = acc_ref[...]


# ---------------------------------------------------------------------------------------------------------------
# pallas_call wrappers (inputs already padded to whole tiles)


# token/vocab tiles run in parallel, the other axis is the reduction; the default 256 x 1024 float32 tiles with
# D = 640 need ~16 MiB of VMEM in the d_table kernel (double-buffered inputs and output block, scratch),
# at or above the default scoped limit on several TPU generations
_COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=48 * 2**20)


def _smem_spec() -> pl.BlockSpec:
    return pl.BlockSpec(memory_space=pltpu.SMEM)


def _normalizers(hidden, table, temperature, vocab: int, tiles: _Tiles) -> jax.Array:
    """[N, 2] float32 (logsumexp z, logsumexp z/T) of padded hidden [N, D] and table [V', D]."""
    (n, d), bn, bv = hidden.shape, tiles.block_n, tiles.block_v
    kernel = functools.partial(_lse_kernel, vocab=vocab, block_v=bv, softcap=tiles.softcap)
    return pl.pallas_call(
        kernel,
        grid=(n // bn, table.shape[0] // bv),
        in_specs=[
            _smem_spec(),
            pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
            pl.BlockSpec((bv, d), lambda i, j: (j, 0)),
        ],
        out_specs=pl.BlockSpec((bn, 2), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n, 2), jnp.float32),
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32) for _ in range(4)],
        compiler_params=_COMPILER_PARAMS,
        interpret=tiles.interpret,
        name="lm_head_lse",
    )(temperature.reshape(1), hidden, table)


def _grad_hidden(hidden, table, rows, temperature, vocab: int, tiles: _Tiles) -> jax.Array:
    (n, d), bn, bv = hidden.shape, tiles.block_n, tiles.block_v
    kernel = functools.partial(_dh_kernel, vocab=vocab, block_v=bv, softcap=tiles.softcap)
    return pl.pallas_call(
        kernel,
        grid=(n // bn, table.shape[0] // bv),
        in_specs=[
            _smem_spec(),
            pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
            pl.BlockSpec((bv, d), lambda i, j: (j, 0)),
            pl.BlockSpec((bn, 4), lambda i, j: (i, 0)),
        ],
        out_specs=pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n, d), jnp.float32),
        scratch_shapes=[pltpu.VMEM((bn, d), jnp.float32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=tiles.interpret,
        name="lm_head_grad_hidden",
    )(temperature.reshape(1), hidden, table, rows)


def _grad_table(hidden, table, rows, temperature, vocab: int, tiles: _Tiles) -> jax.Array:
    (n, d), bn, bv = hidden.shape, tiles.block_n, tiles.block_v
    kernel = functools.partial(_dt_kernel, vocab=vocab, block_v=bv, softcap=tiles.softcap)
    return pl.pallas_call(
        kernel,
        grid=(table.shape[0] // bv, n // bn),
        in_specs=[
            _smem_spec(),
            pl.BlockSpec((bn, d), lambda j, i: (i, 0)),
            pl.BlockSpec((bv, d), lambda j, i: (j, 0)),
            pl.BlockSpec((bn, 4), lambda j, i: (i, 0)),
        ],
        out_specs=pl.BlockSpec((bv, d), lambda j, i: (j, 0)),
        out_shape=jax.ShapeDtypeStruct(table.shape, jnp.float32),
        scratch_shapes=[pltpu.VMEM((bv, d), jnp.float32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=tiles.interpret,
        name="lm_head_grad_table",
    )(temperature.reshape(1), hidden, table, rows)


# ---------------------------------------------------------------------------------------------------------------
# the picked (kept + label) logits: k + 1 gathered rows per token, in XLA


def _chunks(x: jax.Array, size: int) -> jax.Array:
    return x.reshape(-1, size, *x.shape[1:])


def _picked_logits(hidden, table, picked, softcap: float | None, size: int) -> jax.Array:
    """[N, k+1] float32 capped logits at the picked ids, `size` tokens of gathered rows at a time."""

    def one(args):
        h, p = args
        z = jnp.einsum("nd,nkd->nk", h, table[p], preferred_element_type=jnp.float32)
        return z if softcap is None else jnp.tanh(z / softcap) * softcap

    return jax.lax.map(one, (_chunks(hidden, size), _chunks(picked, size))).reshape(picked.shape)


def _picked_grads(hidden, table, picked, g_picked, grad_table, softcap: float | None, size: int):
    """Add the one-hot (kept/label) terms of dz: (d_hidden [N, D] f32, grad_table + scatter-add)."""

    def one(acc, args):
        h, p, g = args
        rows = table[p].astype(jnp.float32)
        if softcap is not None:
            z = jnp.einsum("nd,nkd->nk", h.astype(jnp.float32), rows)
            g = g * (1.0 - jnp.square(jnp.tanh(z / softcap)))
        acc = acc.at[p].add(g[:, :, None] * h.astype(jnp.float32)[:, None, :])
        return acc, jnp.einsum("nk,nkd->nd", g, rows)

    parts = (_chunks(hidden, size), _chunks(picked, size), _chunks(g_picked, size))
    grad_table, grad_hidden = jax.lax.scan(one, grad_table, parts)
    return grad_hidden.reshape(hidden.shape[0], -1), grad_table


# ---------------------------------------------------------------------------------------------------------------
# custom VJP


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _token_layout(count: int, block_n: int) -> tuple[int, int]:
    """(padded token count, gather chunk): both whole multiples of block_n, the count a multiple of the chunk."""
    if count <= GATHER_CHUNK:
        padded = round_up(count, block_n)
        return padded, padded
    gather = block_n * max(1, GATHER_CHUNK // block_n)
    return round_up(count, gather), gather


def _padded(hidden, table, picked, tiles: _Tiles):
    """Tokens padded with zero rows (id 0, zero cotangent later) and the table to whole vocabulary tiles."""
    tokens, _ = _token_layout(hidden.shape[0], tiles.block_n)
    return (
        _pad_rows(hidden, tokens),
        _pad_rows(table, round_up(table.shape[0], tiles.block_v)),
        _pad_rows(picked, tokens),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hidden, table, picked, temperature, tiles):
    return _fused_fwd(hidden, table, picked, temperature, tiles)[0]


def _fused_fwd(hidden, table, picked, temperature, tiles):
    count, vocab = hidden.shape[0], table.shape[0]
    h, t, p = _padded(hidden, table, picked, tiles)
    norms = _normalizers(h, t, temperature, vocab, tiles)[:count]
    z = _picked_logits(h, table, p, tiles.softcap, _token_layout(count, tiles.block_n)[1])[:count]
    stats = HeadStats(kept=z[:, :-1], label=z[:, -1], lse=norms[:, 0], lse_t=norms[:, 1])
    return stats, (hidden, table, picked, temperature, norms)


def _fused_bwd(tiles, residuals, cotangents):
    hidden, table, picked, temperature, norms = residuals
    g = HeadStats(*cotangents)
    count, vocab = hidden.shape[0], table.shape[0]
    h, t, p = _padded(hidden, table, picked, tiles)
    rows = _pad_rows(jnp.concatenate([norms, g.lse[:, None], g.lse_t[:, None]], axis=1), h.shape[0])
    grad_h = _grad_hidden(h, t, rows, temperature, vocab, tiles)
    grad_t = _grad_table(h, t, rows, temperature, vocab, tiles)[:vocab]
    g_picked = _pad_rows(jnp.concatenate([g.kept, g.label[:, None]], axis=1), h.shape[0])
    gather = _token_layout(count, tiles.block_n)[1]
    picked_h, grad_t = _picked_grads(h, table, p, g_picked, grad_t, tiles.softcap, gather)
    grad_h = (grad_h + picked_h)[:count]
    # ids, labels and the temperature get no gradient (as in gemstill.kernels.chunked_head)
    return grad_h.astype(hidden.dtype), grad_t.astype(table.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
