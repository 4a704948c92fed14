"""Flash-attention kernels (Pallas, interpreted on CPU) against the model's attention math.

Compared only on query rows with at least one visible key (the kernels return 0 for an all-masked row, the
model's dense softmax the mean of V; such rows are padding). Tolerances: float32 outputs 2e-5, gradients
1e-4 (absolute, on unit-scale inputs); bfloat16 3e-2 of the largest magnitude (the splash-attention tests use
about 3e-3 on bf16-free float32 outputs; bf16 rounding of p before p @ V dominates here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gemstill.kernels import attention as attn
from gemstill.kernels import dispatch
from gemstill.kernels._dispatch import interpret_races_found
from hypothesis import given, settings
from hypothesis import strategies as st

from gemstill.config import Gemma3Config
from gemstill.model import Attention, apply_rope


def _case(seed, batch, steps, prefix, heads, kv_heads, head_dim, pad, split, dtype=jnp.float32):
    """q for `steps` queries after `prefix` earlier keys; row 0 left-padded by `pad`; documents split at `split`."""
    length = prefix + steps
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, steps, heads, head_dim)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim)).astype(dtype)
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    real = index >= jnp.array([pad] + [0] * (batch - 1))[:, None]
    segments = None
    if split is not None:
        segments = (index >= split).astype(jnp.int32)
    start = jnp.where(segments == 1, split, 0) if segments is not None else 0
    positions = jnp.cumsum(real & (index >= start), axis=1, dtype=jnp.int32) - 1
    kv_positions = jnp.where(real, positions, -1)
    meta = {
        "q_positions": positions[:, prefix:],
        "kv_positions": kv_positions,
        "q_segments": None if segments is None else segments[:, prefix:],
        "kv_segments": segments,
    }
    return q, k, v, meta


def _check(q, k, v, meta, window, softcap, block_q, block_kv, implementation="interpret", atol=2e-5, gtol=1e-4):
    opts = {**meta, "window": window, "softcap": softcap}
    seen = jnp.any(
        attn.visible(meta["q_positions"], meta["kv_positions"], window, meta["q_segments"], meta["kv_segments"]), -1
    )
    rows = seen[:, :, None, None]

    def kernel(q, k, v):
        return dispatch.attention(q, k, v, **opts, implementation=implementation, block_q=block_q, block_kv=block_kv)

    def reference(q, k, v):
        return attn.attention_reference(q, k, v, **opts)

    got, want = kernel(q, k, v), reference(q, k, v)
    scale = max(1.0, float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
    np.testing.assert_allclose(
        np.asarray(jnp.where(rows, got, 0), np.float32),
        np.asarray(jnp.where(rows, want, 0), np.float32),
        atol=atol * scale,
    )
    assert not bool(jnp.any(jnp.where(rows, 0, got)))  # no visible key: zeros
    cotangent = jax.random.normal(jax.random.key(9), q.shape) * rows

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent), argnums=(0, 1, 2))(
            q, k, v
        )

    for g, w in zip(grads(kernel), grads(reference), strict=True):
        assert g.dtype == w.dtype
        scale = max(1.0, float(jnp.max(jnp.abs(w.astype(jnp.float32)))))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=gtol * scale)


@settings(max_examples=4, deadline=None)
@given(
    data=st.data(),
    heads=st.sampled_from([(2, 1), (4, 2), (2, 2)]),  # MQA, GQA, MHA
    steps=st.integers(1, 30),
    prefix=st.sampled_from([0, 0, 5]),
    window=st.sampled_from([None, 1, 3, 9, 64]),  # 64: larger than any sequence here
    softcap=st.sampled_from([None, 3.0]),
    blocks=st.sampled_from([(8, 8), (8, 16), (16, 8)]),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_reference(data, heads, steps, prefix, window, softcap, blocks, seed):
    length = prefix + steps
    pad = data.draw(st.integers(0, length // 2), label="pad")
    split = data.draw(st.one_of(st.none(), st.integers(pad + 1, length)), label="split") if prefix == 0 else None
    q, k, v, meta = _case(seed, 2, steps, prefix, *heads, 8, pad, split)
    _check(q, k, v, meta, window, softcap, *blocks)


def test_bfloat16():
    q, k, v, meta = _case(1, 1, 24, 0, 4, 2, 16, 3, None, jnp.bfloat16)
    _check(q, k, v, meta, 7, None, 8, 8, atol=3e-2, gtol=3e-2)


def test_tpu_interpret_mode_without_races():
    """TPU semantics (SMEM scalar prefetch, DMAs, 2 cores on the parallel axes) with race detection on."""
    q, k, v, meta = _case(2, 1, 16, 0, 2, 1, 8, 0, None)
    opts = {**meta, "window": 5, "softcap": None, "block_q": 8, "block_kv": 8}

    def kernel(q, k, v):
        return jax.block_until_ready(dispatch.attention(q, k, v, **opts, implementation="interpret_tpu"))

    np.testing.assert_allclose(kernel(q, k, v), dispatch.attention(q, k, v, **opts, implementation="xla"), atol=2e-5)
    assert not interpret_races_found()
    got = jax.block_until_ready(jax.grad(lambda *a: jnp.sum(kernel(*a) ** 2), argnums=(0, 1, 2))(q, k, v))
    assert not interpret_races_found()
    want = jax.grad(
        lambda *a: jnp.sum(attn.attention_reference(*a, **meta, window=5, softcap=None) ** 2), argnums=(0, 1, 2)
    )(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)


def _layout(positions, window, block):
    steps = positions.shape[1]
    q = jnp.zeros((1, steps, 1, 8))
    config = attn._Config(block, block, window, None, True)
    zeros = jnp.zeros_like(positions)
    lay = attn._layout(q, q, q, (positions, positions, zeros, zeros), config)
    return lay, attn._steps(lay, config)


def test_window_grid_spans_only_the_band():
    """Local layer: 3 of 8 kv steps per q block, and exactly the blocks that hold a visible key are needed."""
    positions = jnp.arange(128, dtype=jnp.int32)[None]
    lay, (kv_steps, q_steps, fits) = _layout(positions, 16, 16)
    assert (kv_steps, q_steps, bool(fits)) == (3, 3, True)
    mask = attn.visible(positions, positions, 16)[0].reshape(8, 16, 8, 16)
    np.testing.assert_array_equal(np.asarray(lay.need).reshape(8, 8), np.asarray(jnp.any(mask, axis=(1, 3))))
    # global: every kv block up to the diagonal, the full grid
    lay, (kv_steps, _, fits) = _layout(positions, None, 16)
    assert kv_steps == 8 and int(lay.need.sum()) == 36


def test_positions_slower_than_indices_fall_back_to_full_range():
    positions = (jnp.arange(64, dtype=jnp.int32) // 4)[None]  # each position 4 times: a window reaches 4x further
    _, (kv_steps, _, fits) = _layout(positions, 7, 8)
    assert kv_steps == 3 and not bool(fits)
    q, k, v, _ = _case(4, 1, 64, 0, 2, 1, 8, 0, None)
    meta = {"q_positions": positions, "kv_positions": positions, "q_segments": None, "kv_segments": None}
    _check(q, k, v, meta, 7, None, 8, 8)


def test_reference_is_the_model_attention():
    config = Gemma3Config(
        num_layers=1,
        embed_dim=16,
        hidden_dim=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        sliding_window=4,
        vocab_size=64,
        attn_logit_softcap=5.0,
    )
    layer = Attention(config, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 10, 16))
    positions = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
    key_positions = positions.at[1, :2].set(-1)
    segments = (positions >= 6).astype(jnp.int32)
    want, _, _ = layer(x, positions, key_positions, None, None, False, segments)

    q = jnp.einsum("btd,dnh->btnh", x, layer.q_proj[...])
    k = jnp.einsum("btd,dkh->btkh", x, layer.k_proj[...])
    v = jnp.einsum("btd,dkh->btkh", x, layer.v_proj[...])
    q = apply_rope(layer.q_norm(q), positions, layer.rope_base, layer.rope_scale) * config.query_scale
    k = apply_rope(layer.k_norm(k), positions, layer.rope_base, layer.rope_scale)
    out = dispatch.attention(
        q,
        k,
        v,
        q_positions=positions,
        kv_positions=key_positions,
        q_segments=segments,
        kv_segments=segments,
        window=4,
        softcap=5.0,
    )  # auto on CPU: the reference
    got = jnp.einsum("btnh,nhd->btd", out, layer.o_proj[...])
    np.testing.assert_allclose(got, want, atol=1e-6)
