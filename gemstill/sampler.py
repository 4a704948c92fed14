"""Batched generation with a KV cache: one jitted prefill over left-padded prompts, then a jitted decode step.

Sliding-window layers keep only a window-sized ring buffer (see model.LayerCache), which is the memory saving
the 5:1 local/global design was made for.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemstill.errors import GemstillError
from gemstill.model import Cache, Gemma3, init_cache

PAD_ID = 0
_PROMPT_BUCKET = 32  # prompts are padded to a multiple of this, so a new length rarely recompiles prefill


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen: temperature 0 is greedy; top-k / top-p filter before sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GemstillError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GemstillError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GemstillError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GemstillError(f"top_p must be in (0, 1], got {self.top_p}")


def choose_tokens(
    logits: jax.Array, rng: jax.Array, temperature: float, top_k: int | None, top_p: float | None
) -> jax.Array:
    """Next token per row of logits [B, V] (float32)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
        keep_count = jnp.sum(cumulative - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, keep_count - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _prefill(graphdef, state, tokens, mask, cache: Cache):
    model = nnx.merge(graphdef, state)
    out = model(tokens, mask=mask, cache=cache, return_logits=False)
    return model.logits(out.final_hidden[:, -1:])[:, 0], out.cache


def _decode(graphdef, state, tokens, positions, cache: Cache):
    model = nnx.merge(graphdef, state)
    out = model(tokens[:, None], positions[:, None], cache=cache, return_logits=False)
    return model.logits(out.final_hidden)[:, 0], out.cache


_choose = jax.jit(choose_tokens, static_argnums=(2, 3, 4))
# the graph definition is a static argument, so models of one structure (a student and its baseline) share the
# compiled prefill and decode step instead of compiling their own
_prefill_jit = jax.jit(_prefill, static_argnums=0)
_decode_jit = jax.jit(_decode, static_argnums=0, donate_argnums=(4,))


class Sampler:
    """Generates continuations for a batch of token-id prompts of different lengths."""

    def __init__(self, model: Gemma3):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self._prefill = functools.partial(_prefill_jit, self.graphdef)
        self._decode = functools.partial(_decode_jit, self.graphdef)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stop_ids: Sequence[int] = (),
        on_step: Callable[[np.ndarray], None] | None = None,
    ) -> list[list[int]]:
        """New tokens per prompt, ending at (and including) the first stop id.

        on_step, when given, receives the tokens of every step as they are chosen (for streaming).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GemstillError("every prompt needs at least one token (the BOS token counts)")
        longest = max(len(p) for p in prompts)
        padded_len = -(-longest // _PROMPT_BUCKET) * _PROMPT_BUCKET
        total = longest + params.max_new_tokens
        if total > self.config.max_context:
            raise GemstillError(
                f"prompt of {longest} tokens + {params.max_new_tokens} new tokens exceeds the model's context of "
                f"{self.config.max_context}; shorten the prompt or lower --max-new-tokens"
            )
        batch = len(prompts)
        tokens = np.full((batch, padded_len), PAD_ID, np.int32)
        mask = np.zeros((batch, padded_len), bool)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the same slot
            tokens[row, padded_len - len(prompt) :] = prompt
            mask[row, padded_len - len(prompt) :] = True
        cache = init_cache(self.config, batch, padded_len + params.max_new_tokens)
        logits, cache = self._prefill(self.state, jnp.asarray(tokens), jnp.asarray(mask), cache)
        positions = jnp.asarray([len(p) for p in prompts], jnp.int32)
        rng = jax.random.key(params.seed)
        stops = np.asarray(list(stop_ids), np.int32)
        done = np.zeros(batch, bool)
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in range(params.max_new_tokens):
            rng, step_rng = jax.random.split(rng)
            next_tokens = _choose(logits, step_rng, params.temperature, params.top_k, params.top_p)
            chosen = np.asarray(next_tokens)
            for row in np.flatnonzero(~done):
                outputs[row].append(int(chosen[row]))
            if on_step is not None:
                on_step(np.where(done, -1, chosen))
            done |= np.isin(chosen, stops)
            if done.all() or step == params.max_new_tokens - 1:  # the last token needs no decode step after it
                break
            logits, cache = self._decode(self.state, next_tokens, positions, cache)
            positions = positions + 1
        return outputs
