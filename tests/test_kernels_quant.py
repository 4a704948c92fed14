"""Quantized matmul kernels (Pallas, interpreted on CPU) against the dequantized float32 reference.

Tolerances, relative to the largest |output|: float32 activations 1e-5 (only summation order differs);
bfloat16 activations 1e-2 (the output is rounded to bf16, 2^-8 relative). Quantizers: every weight within half
a quantization step (scale / 2) of the original.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from gemstill.kernels.dispatch import quant_matmul
from gemstill.kernels.quant_matmul import (
    dequantize,
    quant_matmul_reference,
    quantize_int4,
    quantize_int8,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def _quantize(w, bits, group):
    return quantize_int8(w) if bits == 8 else quantize_int4(w, group)


def _close(actual, expected, rel):
    scale = max(1e-6, float(jnp.max(jnp.abs(expected.astype(jnp.float32)))))
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=rel * scale)


@settings(max_examples=6, deadline=None)
@given(
    rows=st.integers(1, 20),
    features=st.integers(1, 200),
    outputs=st.integers(1, 150),
    bits=st.sampled_from([8, 4]),
    group=st.sampled_from([16, 32]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_dequantized_reference(rows, features, outputs, bits, group, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(keys[0], (rows, features)).astype(dtype)
    qw = _quantize(jax.random.normal(keys[1], (features, outputs)), bits, group)
    blocks = {"block_m": 8, "block_n": 128, "block_k": 64}
    got = quant_matmul(x, qw, implementation="interpret", **blocks)
    want = quant_matmul_reference(x, qw)
    assert got.shape == (rows, outputs) and got.dtype == x.dtype
    rel = 1e-5 if dtype == "float32" else 1e-2
    _close(got, want, rel)
    _close(quant_matmul(x, qw, implementation="xla"), want, rel if bits == 8 else 2e-2)
    grad = jax.grad(lambda x: jnp.sum(quant_matmul(x, qw, implementation="interpret", **blocks).astype(jnp.float32)))
    want_grad = jax.grad(lambda x: jnp.sum(quant_matmul_reference(x, qw).astype(jnp.float32)))
    _close(grad(x), want_grad(x), rel)


@settings(max_examples=6, deadline=None)
@given(
    features=st.integers(1, 70),
    outputs=st.integers(1, 9),
    bits=st.sampled_from([8, 4]),
    group=st.sampled_from([2, 8, 32]),
    seed=st.integers(0, 2**16),
)
def test_quantizers_round_to_the_nearest_step(features, outputs, bits, group, seed):
    w = jax.random.normal(jax.random.key(seed), (features, outputs)) * 3.0
    qw = _quantize(w, bits, group)
    back = dequantize(qw)
    assert back.shape == w.shape
    if bits == 8:
        assert qw.values.dtype == jnp.int8 and qw.scales.shape == (1, outputs)
        step = jnp.broadcast_to(qw.scales, w.shape)
    else:
        padded = -(-features // group) * group
        assert qw.values.dtype == jnp.uint8 and qw.values.shape == (padded // 2, outputs)  # two values per byte
        step = jnp.repeat(qw.scales, group, axis=0)[:features]
    assert bool(jnp.all(jnp.abs(back - w) <= step / 2 + 1e-6 * jnp.abs(w) + 1e-7))
    assert bool(jnp.all(jnp.max(jnp.abs(back), axis=0) > 0))  # the largest weight per channel/group survives
