"""The fused LM-head kernels (Pallas, interpreted on CPU) against head_stats_reference and the chunked XLA path.

Tolerances: float32 forward 2e-5 absolute + 1e-5 relative (the kernels only reorder float32 sums); gradients
1e-4 absolute + 1e-4 relative; bfloat16 inputs 2e-2 relative (the kernels feed bf16 dz to the MXU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gemstill.kernels import lm_head
from gemstill.kernels._dispatch import interpret_races_found
from gemstill.kernels.chunked_head import head_stats, head_stats_reference
from gemstill.kernels.dispatch import head_stats_dispatch, resolve
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _inputs(seed: int, tokens: int, vocab: int, dim: int, kept: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (tokens, dim)).astype(dtype)
    table = (jax.random.normal(keys[1], (vocab, dim)) * 0.7).astype(dtype)
    ids = jax.random.randint(keys[2], (tokens, kept), 0, vocab)
    labels = jax.random.randint(keys[3], (tokens,), 0, vocab)
    # repeated ids: the label among the kept ids and a kept id twice, so one-hot gradients must accumulate
    ids = ids.at[:, 0].set(labels).at[:, -1].set(ids[:, 0])
    return hidden, table, ids, labels


def _grads(fn, hidden, table, seed: int):
    """Gradients of a random linear function of all four outputs."""
    shapes = jax.eval_shape(fn, hidden, table)
    weights = [
        jax.random.normal(k, s.shape) for k, s in zip(jax.random.split(jax.random.key(seed), 4), shapes, strict=True)
    ]

    def scalar(h, t):
        return sum(jnp.sum(w * x) for w, x in zip(weights, fn(h, t), strict=True))

    return jax.grad(scalar, argnums=(0, 1))(hidden, table)


def _close(actual, expected, atol: float, rtol: float) -> None:
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), atol=atol, rtol=rtol)


@settings(max_examples=3, deadline=None)
@given(
    tokens=st.integers(1, 40),
    vocab=st.integers(100, 400),
    dim=st.sampled_from([8, 16]),
    kept=st.integers(2, 4),
    temperature=st.floats(0.5, 3.0),
    softcap=st.sampled_from([None, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_fused_matches_reference(tokens, vocab, dim, kept, temperature, softcap, seed):
    hidden, table, ids, labels = _inputs(seed, tokens, vocab, dim, kept)
    opts = {"temperature": temperature, "softcap": softcap}

    def fused(h, t):
        return head_stats_dispatch(h, t, ids, labels, **opts, implementation="interpret", block_n=16, block_v=128)

    def reference(h, t):
        return head_stats_reference(h, t, ids, labels, **opts)

    def chunked(h, t):
        return head_stats(h, t, ids, labels, **opts, chunk=8)

    _close(fused(hidden, table), reference(hidden, table), atol=2e-5, rtol=1e-5)
    _close(fused(hidden, table), chunked(hidden, table), atol=2e-5, rtol=1e-5)
    _close(_grads(fused, hidden, table, seed), _grads(reference, hidden, table, seed), atol=1e-4, rtol=1e-4)


def test_bfloat16_inputs():
    hidden, table, ids, labels = _inputs(3, 24, 300, 16, 3, jnp.bfloat16)
    opts = {"temperature": 2.0, "softcap": None}

    def fused(h, t):
        return head_stats_dispatch(h, t, ids, labels, **opts, implementation="interpret", block_n=8, block_v=128)

    def reference(h, t):
        return head_stats_reference(h, t, ids, labels, **opts)

    _close(fused(hidden, table), reference(hidden, table), atol=2e-2, rtol=2e-2)
    got, want = _grads(fused, hidden, table, 5), _grads(reference, hidden, table, 5)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
    for g, w in zip(got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=2e-2 * scale)


def test_tpu_interpret_mode_without_races():
    """TPU semantics (simulated VMEM/SMEM, DMAs, 2 cores splitting the parallel axis) with race detection."""
    hidden, table, ids, labels = _inputs(7, 20, 260, 8, 2)

    def fused(h, t):
        out = head_stats_dispatch(
            h, t, ids, labels, temperature=1.5, implementation="interpret_tpu", block_n=8, block_v=128
        )
        return jax.block_until_ready(out)

    stats = fused(hidden, table)
    assert not interpret_races_found()
    _close(stats, head_stats_reference(hidden, table, ids, labels, temperature=1.5), atol=2e-5, rtol=1e-5)
    grads = jax.block_until_ready(_grads(fused, hidden, table, 1))
    assert not interpret_races_found()
    want = _grads(lambda h, t: head_stats_reference(h, t, ids, labels, temperature=1.5), hidden, table, 1)
    _close(grads, want, atol=1e-4, rtol=1e-4)


def test_race_detector_flags_a_racy_kernel():
    """Control for the test above: a reduction wrongly marked parallel must be reported as a race."""

    def accumulate(x_ref, o_ref):
        o_ref[...] += x_ref[...]

    call = pl.pallas_call(
        accumulate,
        grid=(4,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=resolve("interpret_tpu")[1],
    )
    jax.block_until_ready(call(jnp.ones((32, 128))))
    assert interpret_races_found()


def test_auto_uses_chunked_xla_on_cpu():
    hidden, table, ids, labels = _inputs(1, 10, 120, 8, 2)
    auto = head_stats_dispatch(hidden, table, ids, labels, temperature=2.0, chunk=4)
    xla = head_stats(hidden, table, ids, labels, temperature=2.0, chunk=4)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(auto, xla, strict=True))
    with pytest.raises(ValueError, match="implementation"):
        head_stats_dispatch(hidden, table, ids, labels, implementation="cuda")


def test_token_layout_pads_to_whole_tiles_and_gather_chunks():
    for count, block in [(1, 8), (300, 256), (5000, 256), (1025, 16)]:
        padded, gather = lm_head._token_layout(count, block)
        assert padded >= count and padded % block == 0 and padded % gather == 0 and gather % block == 0
        assert padded - count < max(gather, block)
