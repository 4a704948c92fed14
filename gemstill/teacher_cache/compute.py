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

    Gumbel-top-k (top k of z + Gumbel noise) draws k ids without replacement in proportion to exp(z).
    """
    z = logits.astype(jnp.float32) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = z - lse[:, None]
    # -sum p log p after lse, rather than sharing one exp between two sums: XLA then keeps every pass fused
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    scores = logits if keys is None else z + gumbel_noise(keys, z.shape[-1])  # top-k of logits / T: of logits
    ids = jnp.sort(jax.lax.top_k(scores, k)[1], axis=-1)
    logprobs = jnp.take_along_axis(logits, ids, axis=-1) / temperature - lse[:, None]  # a gather from logp copies it
    tail_mass = jnp.maximum(1.0 - jnp.sum(jnp.exp(logprobs), axis=-1), 0.0)
    return Summary(ids.astype(jnp.int32), logprobs, lse, entropy, tail_mass)


def gumbel_noise(keys: jax.Array, vocab: int) -> jax.Array:
    """Gumbel(0, 1) noise [N, vocab]: per token two 32-bit words from its PRNG key, per id a keyed integer hash.

    Drawing all N x vocab values from threefry costs ~8x more on CPU than the LM head's extra passes; the hash
    (two rounds of lowbias32, keyed by the token's words) gives 24 uniform bits per id at the price of a few
    integer ops, the same resolution jax.random.gumbel has in float32.
    """
    words = jax.vmap(lambda key: jax.random.bits(key, (2,), jnp.uint32))(keys)
    ids = jnp.arange(vocab, dtype=jnp.uint32)[None, :]
    bits = _lowbias32(_lowbias32(ids ^ words[:, :1]) ^ words[:, 1:])
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
    """`summarize` of head(hidden) for hidden [N, D], one chunk of tokens at a time."""
    count = hidden.shape[0]
    chunks = -(-count // chunk)
    pad = chunks * chunk - count
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(chunks, chunk, -1)
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
