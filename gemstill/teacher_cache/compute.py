"""What the cache keeps of the teacher's next-token distribution, computed in token chunks.

The LM head runs `chunk` tokens at a time (as in scoring), so [tokens x vocab] logits never exist beyond one
chunk; everything the cache stores is reduced from that chunk before the next one is computed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

CHUNK = 128  # tokens per LM-head chunk: 128 x 262,144 float32 logits = 128 MiB


class Summary(NamedTuple):
    """Per token (leading axes [...]) the kept ids, their teacher log-probs, and what a loss needs besides."""

    ids: jax.Array  # [..., k] int32, ascending within each token
    logprobs: jax.Array  # [..., k] float32: log softmax(logits / T) at ids
    lse: jax.Array  # [...] logsumexp(logits / T): the log-normalizer
    entropy: jax.Array  # [...] exact entropy of softmax(logits / T), over the whole vocabulary
    tail_mass: jax.Array  # [...] 1 - sum(exp(logprobs)): the probability of every id not kept


def summarize(logits: jax.Array, k: int, temperature: float, keys: jax.Array | None = None) -> Summary:
    """Summarize logits [N, V]: the top-k ids, or with `keys` [N] k distinct ids sampled by Gumbel-top-k.

    Gumbel-top-k (the top k of z + Gumbel noise) draws k ids without replacement in proportion to exp(z).
    Written so XLA keeps each pass over [N, V] fused: the entropy reuses lse instead of sharing one exp
    between two sums, and the kept log-probs are gathered from the logits, not from a materialized log p.
    """
    z = logits / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = z - lse[:, None]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.uint32)
    scores = logits if keys is None else z + gumbel_noise(keys, vocab)  # dividing by T > 0 keeps the order
    ids = jnp.sort(top_k_ids(scores, k), axis=-1)
    logprobs = jnp.take_along_axis(logits, ids, axis=-1) / temperature - lse[:, None]
    tail_mass = jnp.maximum(1.0 - jnp.sum(jnp.exp(logprobs), axis=-1), 0.0)
    return Summary(ids.astype(jnp.int32), logprobs, lse, entropy, tail_mass)


def top_k_ids(scores: jax.Array, k: int, block: int = 64) -> jax.Array:
    """Ids of the k largest scores of each row [N, V] (ties broken by position), ~2.7x cheaper on CPU than
    lax.top_k over whole rows: the k blocks of `block` ids with the largest maxima hold k scores at least as
    large as any score outside them, so the exact top k is the top k of those k * block candidates.
    """
    rows, vocab = scores.shape
    blocks = -(-vocab // block)
    if blocks <= k:
        return jax.lax.top_k(scores, k)[1]
    if vocab % block:
        scores = jnp.pad(scores, ((0, 0), (0, blocks * block - vocab)), constant_values=-jnp.inf)
    grouped = scores.reshape(rows, blocks, block)
    chosen = jnp.sort(jax.lax.top_k(grouped.max(axis=-1), k)[1], axis=-1)  # block ids, ascending
    candidates = jnp.take_along_axis(grouped, chosen[:, :, None], axis=1).reshape(rows, k * block)
    picked = jax.lax.top_k(candidates, k)[1]
    return jnp.take_along_axis(chosen, picked // block, axis=-1) * block + picked % block


def gumbel_noise(keys: jax.Array, ids: jax.Array) -> jax.Array:
    """Gumbel(0, 1) noise [N, t] for vocabulary ids [t] (uint32): per token two 32-bit words from its PRNG key,
    per id a keyed integer hash.

    Drawing all N x vocab values from threefry costs ~4x more on CPU (0.44 s vs 0.10 s per 128 x 262,144 chunk);
    the hash (two rounds of lowbias32, keyed by the token's words) gives 24 uniform bits per id for a few integer
    ops, about the resolution jax.random.gumbel has in float32.
    """
    words = jax.vmap(lambda key: jax.random.bits(key, (2,), jnp.uint32))(keys)
    bits = _lowbias32(_lowbias32(ids[None, :] ^ words[:, :1]) ^ words[:, 1:])
    uniform = ((bits >> 8).astype(jnp.float32) + 0.5) * 2.0**-24  # in (0, 1)
    return -jnp.log(-jnp.log(uniform))


def _lowbias32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finalizer with low bias (C. Wellons' lowbias32): every input bit affects every output bit."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def summarize_hidden(
    head: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    k: int,
    temperature: float,
    keys: jax.Array | None = None,
    chunk: int = CHUNK,
) -> Summary:
    """`summarize` of head(hidden) for hidden [N, D] (keys [N] when sampling), one chunk of tokens at a time."""
    count = hidden.shape[0]
    chunks = -(-count // chunk)
    hidden = jnp.pad(hidden, ((0, chunks * chunk - count), (0, 0))).reshape(chunks, chunk, -1)
    if keys is None:
        out = jax.lax.map(lambda h: summarize(head(h), k, temperature), hidden)
    else:
        keys = keys[jnp.minimum(jnp.arange(chunks * chunk), count - 1)].reshape(chunks, chunk)
        out = jax.lax.map(lambda args: summarize(head(args[0]), k, temperature, args[1]), (hidden, keys))
    return jax.tree.map(lambda x: x.reshape(chunks * chunk, *x.shape[2:])[:count], out)


def token_keys(seed: jax.Array, seq_index: jax.Array, steps: int) -> jax.Array:
    """PRNG keys [B, steps]: key of token t of sequence i depends on (seed, i, t) only, not on batching or resume."""
    base = jax.random.key(seed)
    per_seq = jax.vmap(lambda i: jax.random.fold_in(base, i))(seq_index)
    return jax.vmap(lambda key: jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(steps)))(per_seq)


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "temperature", "sampled", "chunk"))
def teacher_summary(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    seq_index: jax.Array,
    seed: jax.Array,
    *,
    k: int,
    temperature: float,
    sampled: bool,
    chunk: int = CHUNK,
) -> Summary:
    """The teacher's summary at every position of packed rows [B, L]; position i describes the token after i."""
    model = nnx.merge(graphdef, state)
    hidden = model(tokens, positions, mask=segment_ids > 0, segment_ids=segment_ids, return_logits=False).final_hidden
    batch, steps, dim = hidden.shape
    keys = token_keys(seed, seq_index, steps).reshape(-1) if sampled else None

    def head(h: jax.Array) -> jax.Array:
        return model.logits(h[None])[0]

    out = summarize_hidden(head, hidden.reshape(batch * steps, dim), k, temperature, keys, chunk)
    return jax.tree.map(lambda x: x.reshape(batch, steps, *x.shape[1:]), out)
