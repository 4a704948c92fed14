"""Per-token log-probabilities of given text: the LM head runs in token chunks so [T x 262,144] never exists."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemstill.errors import GemstillError
from gemstill.model import Gemma3

_CHUNK = 128  # tokens per LM-head chunk, across the batch: 128 x 262,144 float32 logits = 128 MiB at most
_LENGTH_BUCKET = 128  # the scored length T - 1 is padded to a multiple of this (itself a multiple of _CHUNK)


def _target_logprobs(graphdef, state, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """log p(tokens[:, i+1] | tokens[:, :i+1]) for i < T-1, as [B, T-1] float32.

    The LM head and its log-softmax run on _CHUNK tokens of the flattened batch at a time (not B x _CHUNK), so
    a chunk's logits stay cache-sized whatever the batch: batch 4 x 512 scores ~15% faster on CPU, same bits.
    """
    model = nnx.merge(graphdef, state)
    hidden = model(tokens, mask=mask, return_logits=False).final_hidden[:, :-1]
    batch, steps, dim = hidden.shape
    chunks = batch * steps // _CHUNK
    hidden = hidden.reshape(chunks, 1, _CHUNK, dim)  # model.logits takes [B, T, D]
    targets = tokens[:, 1:].reshape(chunks, 1, _CHUNK)

    def one_chunk(args):
        h, t = args
        logits = model.logits(h)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    return jax.lax.map(one_chunk, (hidden, targets)).reshape(batch, steps)


class Scorer:
    """Scores token sequences with one compiled function per padded length."""

    def __init__(self, model: Gemma3):
        self.config = model.config
        graphdef, self.state = nnx.split(model)
        self._score = jax.jit(functools.partial(_target_logprobs, graphdef))

    def logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """For each sequence (BOS first), the log-probability of every token after the first."""
        if any(len(s) < 2 for s in sequences):
            raise GemstillError("scoring needs at least one token after BOS; give a non-empty text")
        longest = max(len(s) for s in sequences)
        if longest > self.config.max_context:
            raise GemstillError(
                f"text of {longest} tokens exceeds the model's context of {self.config.max_context}; shorten it"
            )
        # right padding; the scored length (T - 1) is a multiple of the bucket, so of the LM-head chunk
        steps = math.ceil((longest - 1) / _LENGTH_BUCKET) * _LENGTH_BUCKET
        tokens = np.zeros((len(sequences), steps + 1), np.int32)
        mask = np.zeros_like(tokens, bool)
        for row, seq in enumerate(sequences):
            tokens[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        scores = np.asarray(self._score(self.state, jnp.asarray(tokens), jnp.asarray(mask)))
        return [scores[row, : len(seq) - 1] for row, seq in enumerate(sequences)]


def perplexity(logprobs: np.ndarray) -> float:
    return float(np.exp(-np.mean(logprobs)))
