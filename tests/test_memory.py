"""The memory estimate against what JAX itself reports: exact for parameters and KV cache, and within
[0.7, 1.5]x of XLA's compiled memory analysis for a forward pass (activations depend on XLA's fusion)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemstill.config import VARIANTS, Gemma3Config, variant
from gemstill.memory import estimate
from gemstill.model import abstract_model, init_cache
from gemstill.params import count_params


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_param_bytes_match_eval_shape(name):
    config = variant(name).replace(param_dtype="bfloat16")
    state = nnx.state(abstract_model(config), nnx.Param)
    assert estimate(config).param_bytes == _nbytes(state)


def test_published_parameter_counts():
    """Embedding / other split as published (Gemma 3 report, rounded to 0.1M)."""
    counts = count_params(variant("270m"))
    assert round(counts["embedding"] / 1e5) == 1678 and round(counts["non_embedding"] / 1e5) == 1003
    counts = count_params(variant("1b"))
    assert round(counts["embedding"] / 1e6) == 302 and round(counts["non_embedding"] / 1e6) == 698


@pytest.mark.parametrize("context", [100, 4096])
def test_kv_cache_bytes_match_sampler_cache(context):
    config = variant("4b").replace(dtype="bfloat16")
    cache = jax.eval_shape(lambda: init_cache(config, batch=1, max_len=context))
    keys_and_values = _nbytes([(layer.k, layer.v) for layer in cache.layers])
    assert estimate(config).kv_cache_bytes(context) == keys_and_values


@pytest.mark.parametrize(
    ("config", "tokens"),
    [
        (variant("270m"), 256),
        (variant("270m"), 1024),
        (Gemma3Config(6, 256, 1024, 4, 1, 64, 128, vocab_size=4096), 512),
    ],
)
def test_forward_estimate_near_compiled_memory_analysis(config, tokens):
    graphdef, state = nnx.split(abstract_model(config))

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids).logits

    compiled = jax.jit(forward).lower(state, jax.ShapeDtypeStruct((1, tokens), jnp.int32)).compile()
    analysis = compiled.memory_analysis()
    measured = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    ratio = measured / estimate(config).forward_bytes(tokens)
    assert 0.7 <= ratio <= 1.5, ratio
