"""The LM head's few statistics a distillation loss needs, computed without [tokens x vocab] logits.

Every logit loss gemstill trains with (sparse KL/JSD over the teacher's kept ids, plus hard-label cross-entropy)
depends on the student's full logits z only through four per-token quantities: z at the teacher's k kept ids,
z at the label, logsumexp(z) and logsumexp(z / T). `head_stats` computes them a chunk of tokens at a time and
its custom VJP recomputes each chunk's logits in the backward pass, so peak memory holds one [chunk x vocab]
tile instead of all of them. The losses are then written on the small [tokens x k] tensors and differentiated
by JAX as usual; the chain rule back through the head is

    dL/dz_j = g_kept at j (j kept) + g_label at j (j = label) + g_lse * softmax(z)_j + g_lse_t * softmax(z/T)_j / T

which is what `_head_bwd` applies chunk by chunk. `head_stats_reference` is the plain version (full logits)
that tests compare against; the Pallas kernel in gemstill.kernels fuses the same contract on accelerators.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 1024  # tokens per LM-head tile: 1,024 x 262,144 float32 logits = 1 GiB


class HeadStats(NamedTuple):
    """Per token: the student logits a sparse distillation loss reads, and two log-normalizers."""

    kept: jax.Array  # [N, k] float32 logits at the teacher's kept ids
    label: jax.Array  # [N] float32 logit at the hard label
    lse: jax.Array  # [N] logsumexp(z): the log-normalizer at temperature 1
    lse_t: jax.Array  # [N] logsumexp(z / T)


def _logits(hidden: jax.Array, table: jax.Array, softcap: float | None) -> jax.Array:
    z = jnp.einsum("nd,vd->nv", hidden, table, preferred_element_type=jnp.float32)
    return z if softcap is None else jnp.tanh(z / softcap) * softcap


def _stats(z: jax.Array, ids: jax.Array, labels: jax.Array, temperature: float | jax.Array) -> HeadStats:
    return HeadStats(
        kept=jnp.take_along_axis(z, ids, axis=-1),
        label=jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0],
        lse=jax.nn.logsumexp(z, axis=-1),
        lse_t=jax.nn.logsumexp(z / temperature, axis=-1),
    )


def head_stats_reference(
    hidden: jax.Array,
    table: jax.Array,
    ids: jax.Array,
    labels: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    softcap: float | None = None,
) -> HeadStats:
    """HeadStats from the full [N, V] logits: the naive path, for tests and benchmarks."""
    return _stats(_logits(hidden, table, softcap), ids, labels, temperature)


def head_stats(
    hidden: jax.Array,
    table: jax.Array,
    ids: jax.Array,
    labels: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    softcap: float | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> HeadStats:
    """HeadStats of logits = hidden [N, D] @ table [V, D]^T (then the soft cap), `chunk` tokens at a time.

    ids [N, k] and labels [N] are int32 vocabulary ids. Gradients flow to hidden and table; ids, labels and the
    temperature (a float or a traced scalar, so a schedule needs no recompilation) get none.
    Accumulation is float32 whatever the input dtypes; gradients come back in the inputs' dtypes.
    """
    return _head_stats(hidden, table, ids, labels, jnp.asarray(temperature, jnp.float32), softcap, int(chunk))


def _padded_chunks(x: jax.Array, chunk: int) -> jax.Array:
    count = x.shape[0]
    chunks = -(-count // chunk)
    pad = [(0, chunks * chunk - count)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad).reshape(chunks, chunk, *x.shape[1:])


def _unchunk(x: jax.Array, count: int) -> jax.Array:
    return x.reshape(-1, *x.shape[2:])[:count]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _head_stats(hidden, table, ids, labels, temperature, softcap, chunk):
    return _head_fwd(hidden, table, ids, labels, temperature, softcap, chunk)[0]


def _head_fwd(hidden, table, ids, labels, temperature, softcap, chunk):
    count = hidden.shape[0]
    step = min(chunk, max(count, 1))

    def one(args):
        h, i, y = args
        return _stats(_logits(h, table, softcap), i, y, temperature)

    chunked = jax.lax.map(one, (_padded_chunks(hidden, step), _padded_chunks(ids, step), _padded_chunks(labels, step)))
    stats = HeadStats(*(_unchunk(x, count) for x in chunked))
    return stats, (hidden, table, ids, labels, temperature, stats.lse, stats.lse_t)


def _head_bwd(softcap, chunk, residuals, cotangents):
    hidden, table, ids, labels, temperature, lse, lse_t = residuals
    g = HeadStats(*cotangents)
    count, vocab = hidden.shape[0], table.shape[0]
    step = min(chunk, max(count, 1))

    def one(grad_table, args):
        h, i, y, l1, lt, gk, gy, gl, glt = args
        raw = jnp.einsum("nd,vd->nv", h, table, preferred_element_type=jnp.float32)
        z = raw if softcap is None else jnp.tanh(raw / softcap) * softcap
        dz = gl[:, None] * jnp.exp(z - l1[:, None]) + (glt / temperature)[:, None] * jnp.exp(
            z / temperature - lt[:, None]
        )
        rows = jnp.arange(h.shape[0])[:, None]
        dz = dz.at[rows, i].add(gk).at[rows[:, 0], y].add(gy)
        if softcap is not None:
            dz = dz * (1.0 - jnp.square(z / softcap))
        grad_h = jnp.einsum("nv,vd->nd", dz, table.astype(jnp.float32))
        grad_table = grad_table + jnp.einsum("nv,nd->vd", dz, h.astype(jnp.float32))
        return grad_table, grad_h

    inputs = (hidden, ids, labels, lse, lse_t, g.kept, g.label, g.lse, g.lse_t)
    grad_table, grad_h = jax.lax.scan(
        one, jnp.zeros((vocab, table.shape[1]), jnp.float32), tuple(_padded_chunks(x, step) for x in inputs)
    )
    # no gradient for the temperature: schedules set it, training does not learn it
    return _unchunk(grad_h, count).astype(hidden.dtype), grad_table.astype(table.dtype), None, None, None


_head_stats.defvjp(_head_fwd, _head_bwd)
