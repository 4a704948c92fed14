"""Gemma 3 text decoder in Flax NNX: one forward pass serves scoring, training, distillation and cached decoding.

Attention masks are derived from token positions alone: a key at position kp is visible to a query at position
qp iff 0 <= qp - kp (< window on local layers), and a key position of -1 marks padding or an empty cache
slot. The same rule therefore covers plain forward passes, left-padded batches and the ring-buffer KV cache
of the sliding-window layers, so there is no second code path for decoding.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from gemstill.config import Gemma3Config
from gemstill.kernels._mesh import plan as mesh_plan
from gemstill.kernels.dispatch import attention
from gemstill.kernels.masks import attention_mask
from gemstill.quant.packed import PackedWeight

_MASKED = -2.3819763e38  # large finite negative: fully masked rows (padding) stay NaN-free


class RMSNorm(nnx.Module):
    """Gemma's RMSNorm: normalise in float32, multiply by (1 + scale), cast back."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any):
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float, scale: float) -> jax.Array:
    """Rotate-half (NeoX) RoPE on [B, T, heads, head_dim]; `scale` is the linear position-interpolation factor."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)) / scale
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim / 2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def weight(param: nnx.Param, dtype: Any) -> jax.Array:
    """A parameter's array in `dtype`; a PackedWeight (a quantized checkpoint) is dequantized here, inside the
    jitted pass, so only one layer's float weights exist at a time."""
    value = param.get_value()
    if isinstance(value, PackedWeight):
        value = value.dequantize()
    return value.astype(dtype)


def _lecun(fan_in: int) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=fan_in**-0.5)


@flax.struct.dataclass
class LayerCache:
    """KV cache of one layer: a ring buffer of `size` slots; `pos` is the position stored in a slot (-1: none)."""

    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]
    pos: jax.Array  # [B, S] int32

    def write(self, k: jax.Array, v: jax.Array, pos: jax.Array, start: jax.Array) -> LayerCache:
        """Store T new entries at slots start, start+1, ... modulo the size; only the last `size` can survive."""
        size, steps = self.k.shape[1], k.shape[1]
        if steps > size:
            k, v, pos = k[:, -size:], v[:, -size:], pos[:, -size:]
            start = start + (steps - size)
            steps = size
        slots = (start + jnp.arange(steps)) % size
        return LayerCache(
            k=self.k.at[:, slots].set(k.astype(self.k.dtype)),
            v=self.v.at[:, slots].set(v.astype(self.v.dtype)),
            pos=self.pos.at[:, slots].set(pos),
        )


@flax.struct.dataclass
class Cache:
    """KV caches of all layers plus the number of slots written so far (shared by the batch)."""

    layers: tuple[LayerCache, ...]
    end_index: jax.Array  # int32 scalar


def cache_sizes(config: Gemma3Config, max_len: int) -> tuple[int, ...]:
    """Slots per layer: local layers keep only a window-sized ring buffer, global layers the whole context."""
    return tuple(max_len if w is None else min(w, max_len) for w in config.layer_windows)


def init_cache(config: Gemma3Config, batch: int, max_len: int, dtype: Any = None) -> Cache:
    dtype = dtype or config.jnp_dtype
    layers = tuple(
        LayerCache(
            k=jnp.zeros((batch, size, config.num_kv_heads, config.head_dim), dtype),
            v=jnp.zeros((batch, size, config.num_kv_heads, config.head_dim), dtype),
            pos=jnp.full((batch, size), -1, jnp.int32),
        )
        for size in cache_sizes(config, max_len)
    )
    return Cache(layers=layers, end_index=jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
    """Grouped-query attention with QK-norm; K/V heads are shared by groups, never repeated in memory."""

    def __init__(self, config: Gemma3Config, window: int | None, *, rngs: nnx.Rngs):
        d, n, k, h, pd = (
            config.embed_dim,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.jnp_param_dtype,
        )
        self.q_proj = nnx.Param(_lecun(d)(rngs.params(), (d, n, h), pd))
        self.k_proj = nnx.Param(_lecun(d)(rngs.params(), (d, k, h), pd))
        self.v_proj = nnx.Param(_lecun(d)(rngs.params(), (d, k, h), pd))
        self.o_proj = nnx.Param(_lecun(n * h)(rngs.params(), (n, h, d), pd))
        self.q_norm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=pd)
        self.k_norm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=pd)
        self.window = window
        self.rope_base = config.global_rope_base if window is None else config.local_rope_base
        self.rope_scale = config.global_rope_scale if window is None else 1.0
        self.query_scale = config.query_scale
        self.softcap = config.attn_logit_softcap

    def __call__(
        self, x: jax.Array, *args: Any, **kwargs: Any
    ) -> tuple[jax.Array, LayerCache | None, jax.Array | None]:
        """The attention output [B, T, D]: head_values(x, ...) mixed by o_proj (same arguments)."""
        out, new_cache, head_probs = self.head_values(x, *args, **kwargs)
        return jnp.einsum("btnh,nhd->btd", out, weight(self.o_proj, x.dtype)), new_cache, head_probs

    def head_values(
        self,
        x: jax.Array,
        positions: jax.Array,
        key_positions: jax.Array,
        cache: LayerCache | None,
        cache_start: jax.Array | None,
        return_probs: bool,
        segments: jax.Array | None = None,
        attention_impl: str | None = None,
    ) -> tuple[jax.Array, LayerCache | None, jax.Array | None]:
        """Each query head's attended values [B, T, heads, head_dim], before o_proj mixes them into the stream."""
        dtype = x.dtype
        q = jnp.einsum("btd,dnh->btnh", x, weight(self.q_proj, dtype))
        k = jnp.einsum("btd,dkh->btkh", x, weight(self.k_proj, dtype))
        v = jnp.einsum("btd,dkh->btkh", x, weight(self.v_proj, dtype))
        q = apply_rope(self.q_norm(q), positions, self.rope_base, self.rope_scale)
        k = apply_rope(self.k_norm(k), positions, self.rope_base, self.rope_scale)
        q = q * jnp.asarray(self.query_scale, dtype)

        if cache is None:
            keys, values, key_pos, new_cache = k, v, key_positions, None
        else:
            keys = jnp.concatenate([cache.k.astype(dtype), k], axis=1)
            values = jnp.concatenate([cache.v.astype(dtype), v], axis=1)
            key_pos = jnp.concatenate([cache.pos, key_positions], axis=1)
            new_cache = cache.write(k, v, key_positions, cache_start)

        batch, steps, heads, head_dim = q.shape
        if attention_impl is not None and cache is None and not return_probs:
            out = attention(
                q,
                keys,
                values,
                q_positions=positions,
                kv_positions=key_pos,
                q_segments=segments,
                kv_segments=segments,
                window=self.window,
                softcap=self.softcap,
                implementation=attention_impl,
            )
            return out, None, None
        kv_heads = keys.shape[2]
        grouped = q.reshape(batch, steps, kv_heads, heads // kv_heads, head_dim)
        logits = jnp.einsum("btkgh,bskh->bkgts", grouped, keys, preferred_element_type=jnp.float32)
        if self.softcap is not None:
            logits = jnp.tanh(logits / self.softcap) * self.softcap
        mask = attention_mask(positions, key_pos, self.window, segments)
        logits = jnp.where(mask[:, None, None], logits, _MASKED)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(dtype), values).reshape(batch, steps, heads, head_dim)
        head_probs = probs.reshape(batch, heads, steps, -1) if return_probs else None
        return out, new_cache, head_probs


class MLP(nnx.Module):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs):
        d, f, pd = config.embed_dim, config.hidden_dim, config.jnp_param_dtype
        self.gate = nnx.Param(_lecun(d)(rngs.params(), (d, f), pd))
        self.up = nnx.Param(_lecun(d)(rngs.params(), (d, f), pd))
        self.down = nnx.Param(_lecun(f)(rngs.params(), (f, d), pd))

    def activations(self, x: jax.Array) -> jax.Array:
        """The hidden units' values gelu_tanh(gate(x)) * up(x), [..., hidden_dim]: what down() mixes."""
        dtype = x.dtype
        return jax.nn.gelu(x @ weight(self.gate, dtype), approximate=True) * (x @ weight(self.up, dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.activations(x) @ weight(self.down, x.dtype)


class Block(nnx.Module):
    """One decoder layer with Gemma 3's four norms (pre and post, around attention and MLP)."""

    def __init__(self, config: Gemma3Config, layer: int, *, rngs: nnx.Rngs):
        dim, eps, pd = config.embed_dim, config.rms_norm_eps, config.jnp_param_dtype
        self.pre_attn_norm = RMSNorm(dim, eps=eps, param_dtype=pd)
        self.attn = Attention(config, config.layer_windows[layer], rngs=rngs)
        self.post_attn_norm = RMSNorm(dim, eps=eps, param_dtype=pd)
        self.pre_ffw_norm = RMSNorm(dim, eps=eps, param_dtype=pd)
        self.mlp = MLP(config, rngs=rngs)
        self.post_ffw_norm = RMSNorm(dim, eps=eps, param_dtype=pd)

    def attend(self, x, positions, key_positions, cache, cache_start, return_probs, segments=None, attention_impl=None):
        """The residual stream after the attention half of the block (the feed-forward half's input)."""
        attn_out, new_cache, probs = self.attn(
            self.pre_attn_norm(x), positions, key_positions, cache, cache_start, return_probs, segments, attention_impl
        )
        return x + self.post_attn_norm(attn_out), new_cache, probs

    def feed_forward_units(self, x: jax.Array) -> jax.Array:
        """The MLP's hidden-unit values for the residual stream `x` after attention (see MLP.activations)."""
        return self.mlp.activations(self.pre_ffw_norm(x))

    def __call__(
        self, x, positions, key_positions, cache, cache_start, return_probs, segments=None, attention_impl=None
    ):
        x, new_cache, probs = self.attend(
            x, positions, key_positions, cache, cache_start, return_probs, segments, attention_impl
        )
        x = x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
        return x, new_cache, probs


@flax.struct.dataclass
class ModelOutput:
    """What a forward pass returns; fields not requested are None."""

    logits: jax.Array | None  # [B, T, V] float32
    final_hidden: jax.Array  # [B, T, D] after the final norm: the LM head's input
    hidden_states: tuple[jax.Array, ...] | None  # embeddings, then the output of every block
    attention_probs: dict[int, jax.Array] | None  # layer -> [B, heads, T, S]
    cache: Cache | None


class Gemma3(nnx.Module):
    """The Gemma 3 text decoder with tied input/output embeddings."""

    def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embedding = nnx.Param(
            nnx.initializers.normal(stddev=config.embed_dim**-0.5)(
                rngs.params(), (config.vocab_size, config.embed_dim), config.jnp_param_dtype
            )
        )
        self.layers = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.embed_dim, eps=config.rms_norm_eps, param_dtype=config.jnp_param_dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        dtype = self.config.jnp_dtype
        table = self.embedding.get_value()
        rows = table.rows(tokens) if isinstance(table, PackedWeight) else table[tokens]
        return rows.astype(dtype) * jnp.asarray(self.config.embed_scale, dtype)

    def logits(self, final_hidden: jax.Array) -> jax.Array:
        """The tied LM head, in float32 (with the final soft cap when configured)."""
        table = weight(self.embedding, final_hidden.dtype)
        logits = jnp.einsum("btd,vd->btv", final_hidden, table, preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcap
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        return_logits: bool = True,
        return_hidden: bool = False,
        attention_prob_layers: tuple[int, ...] = (),
        layer_scale: jax.Array | None = None,
        remat: str | None = None,
        attention_impl: str | None = None,
    ) -> ModelOutput:
        """Run the decoder on tokens [B, T].

        mask [B, T] marks real tokens (False: padding); positions default to the count of real tokens before
        each one, so left-padded prompts start at position 0. segment_ids [B, T] keep packed documents apart
        (give positions that restart per document). With a cache, the T new tokens attend to the cached ones
        and are written into it.

        Training only (no cache): layer_scale [num_layers] float implements progressive layer dropout: 0 skips the
        block (its residual update is not computed at all), s > 0 multiplies its residual update by s (1 / keep
        probability, so inference needs no rescaling). remat ("block", "dots" or "dots_no_batch") rematerializes
        each block in the backward pass under that jax.checkpoint policy. attention_impl (None: the dense code
        here) routes cache-free attention through gemstill.kernels.dispatch.attention ("auto", "xla", "pallas", ...).
        """
        if cache is not None and (layer_scale is not None or remat is not None):
            raise ValueError("layer_scale and remat are for training forward passes, not cached decoding")
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for packed training batches, not cached decoding")
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        if positions is None:
            positions = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
            if cache is not None:
                positions = positions + _next_positions(cache)[:, None]
        key_positions = jnp.where(mask, positions, -1).astype(jnp.int32)
        x = _rows_split(self.embed(tokens))
        hidden = [x] if return_hidden else None
        probs: dict[int, jax.Array] = {}
        new_layers = []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            start = None if cache is None else cache.end_index
            if cache is None and (layer_scale is not None or remat is not None):
                scale = None if layer_scale is None else layer_scale[i]
                x, layer_probs = _train_block(
                    block,
                    x,
                    positions,
                    key_positions,
                    segment_ids,
                    i in attention_prob_layers,
                    scale,
                    remat,
                    attention_impl,
                )
                new_layer_cache = None
            else:
                x, new_layer_cache, layer_probs = block(
                    x,
                    positions,
                    key_positions,
                    layer_cache,
                    start,
                    i in attention_prob_layers,
                    segment_ids,
                    attention_impl,
                )
            x = _rows_split(x)
            new_layers.append(new_layer_cache)
            if hidden is not None:
                hidden.append(x)
            if layer_probs is not None:
                probs[i] = layer_probs
        final = self.final_norm(x)
        new_cache = None
        if cache is not None:
            new_cache = Cache(layers=tuple(new_layers), end_index=cache.end_index + tokens.shape[1])
        return ModelOutput(
            logits=self.logits(final) if return_logits else None,
            final_hidden=final,
            hidden_states=tuple(hidden) if hidden is not None else None,
            attention_probs=probs or None,
            cache=new_cache,
        )


REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _rows_split(x: jax.Array) -> jax.Array:
    """Under a mesh in effect (training sets one), keep activations [B, ...] split by rows over data x fsdp.
    Without it XLA's partitioner, seeing the weights split on their model dimension over fsdp, may run the whole
    batch on every device (measured on CPU: 8x the activation memory at fsdp=8)."""
    split = mesh_plan(None, x.shape[0])
    if split is None or split.batch is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(split.batch))


def _train_block(
    block: Block,
    x: jax.Array,
    positions: jax.Array,
    key_positions: jax.Array,
    segments: jax.Array | None,
    return_probs: bool,
    scale: jax.Array | None,
    remat: str | None,
    attention_impl: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """One block of a training pass, optionally rematerialized and/or skipped (scale 0) by a real branch."""
    graphdef, state = nnx.split(block)

    def run(state: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        block = nnx.merge(graphdef, state)
        out, _, probs = block(x, positions, key_positions, None, None, return_probs, segments, attention_impl)
        return out, probs

    if remat is not None:
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; use one of {sorted(REMAT_POLICIES)}")
        run = jax.checkpoint(run, policy=REMAT_POLICIES[remat])
    if scale is None:
        return run(state, x)

    def keep(state: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        out, probs = run(state, x)
        return x + (out - x) * scale.astype(x.dtype), probs

    def skip(state: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        shapes = jax.eval_shape(run, state, x)[1]
        return x, None if shapes is None else jnp.zeros(shapes.shape, shapes.dtype)

    return jax.lax.cond(scale > 0, keep, skip, state, x)


def _next_positions(cache: Cache) -> jax.Array:
    """Per sequence, the position the next token takes: one past the largest position in any global cache."""
    pos = jnp.max(jnp.stack([layer.pos.max(axis=1) for layer in cache.layers]), axis=0)
    return pos + 1


def build_model(config: Gemma3Config, seed: int = 0) -> Gemma3:
    return Gemma3(config, rngs=nnx.Rngs(seed))


def abstract_model(config: Gemma3Config) -> Gemma3:
    """A model whose parameters are shapes only: the cheap starting point for loading a checkpoint."""
    return nnx.eval_shape(lambda: Gemma3(config, rngs=nnx.Rngs(0)))
