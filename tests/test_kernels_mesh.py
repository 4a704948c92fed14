"""The Pallas kernels (interpreted) under a device mesh equal the XLA path, forward and gradients.

8 CPU devices exist only if XLA is told before jax starts, so the mesh checks run in a child process (this file as
a script), as in test_sharding. Inputs sit where training puts them (rows over data x fsdp, the embedding by its
parameter rule) and both paths run jitted on them. Tolerances, relative to max(1, largest XLA value): forward
2e-5, gradients 1e-4, as in test_kernels_lm_head / test_kernels_attention (float32; the kernels and the device
split only reorder sums). Each check also asserts the kernel ran under shard_map on per-device shapes, so a
silent fall back to the unsplit call cannot pass.
"""

from __future__ import annotations

from contextlib import nullcontext

import jax
import jax.numpy as jnp
import pytest
from eight_devices import report, run_in_child
from gemstill.kernels import _mesh
from gemstill.kernels.auto import _error, _value_and_grads
from gemstill.kernels.dispatch import attention, head_stats_dispatch
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemstill.distill.sharding import AXES, batch_sharding, make_mesh, param_specs

FORWARD_TOL, GRAD_TOL = 2e-5, 1e-4


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def _shard_map_inputs(fn, *args) -> list[tuple[int, ...]] | None:
    """Per-device input shapes of the first shard_map in fn's jaxpr that holds a pallas_call; None if none does."""
    for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr):
        inner = eqn.params.get("jaxpr")
        if eqn.primitive.name == "shard_map" and any(e.primitive.name == "pallas_call" for e in _eqns(inner)):
            return [tuple(v.aval.shape) for v in inner.invars]
    return None


def _compare(kernel, xla, args) -> None:
    """kernel and xla agree on values and gradients (random linear function of the outputs), both jitted."""
    (got, got_grads), (want, want_grads) = (_value_and_grads(fn, args, seed=3) for fn in (kernel, xla))
    assert _error(got, want) <= FORWARD_TOL, _error(got, want)
    assert _error(got_grads, want_grads) <= GRAD_TOL, _error(got_grads, want_grads)


# ---------------------------------------------------------------- checks run in the 8-device child process


def _lm_head(sizes: tuple[int, int, int], context: bool) -> None:
    """Tokens split over data x fsdp, the table (sharded tensor x fsdp) passed whole; mesh given or in context."""
    mesh = make_mesh(*sizes)
    tokens, vocab, dim = 64, 256, 16
    keys = jax.random.split(jax.random.key(0), 4)
    rows = batch_sharding(mesh)
    hidden = jax.device_put(jax.random.normal(keys[0], (tokens, dim)), rows)
    table_spec = param_specs({"embedding": (vocab, dim)}, mesh)["embedding"]
    table = jax.device_put(jax.random.normal(keys[1], (vocab, dim)) * 0.7, NamedSharding(mesh, table_spec))
    ids = jax.device_put(jax.random.randint(keys[2], (tokens, 3), 0, vocab), rows)
    labels = jax.device_put(jax.random.randint(keys[3], (tokens,), 0, vocab), rows)
    opts = {"temperature": 1.5, "softcap": 4.0, "mesh": None if context else mesh}

    def run(implementation):
        return lambda h, t: head_stats_dispatch(h, t, ids, labels, **opts, implementation=implementation)

    with jax.set_mesh(mesh) if context else nullcontext():
        ways = sizes[0] * sizes[1]
        assert _shard_map_inputs(run("interpret"), hidden, table)[:2] == [(tokens // ways, dim), (vocab, dim)]
        _compare(run("interpret"), run("xla"), (hidden, table))


def _attention_inputs(batch: int, mesh):
    steps, heads, kv_heads, head_dim = 16, 4, 2, 8
    keys = jax.random.split(jax.random.key(1), 3)
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = batch_sharding(mesh) if batch % ways == 0 else NamedSharding(mesh, P())
    q = jax.device_put(jax.random.normal(keys[0], (batch, steps, heads, head_dim)), rows)
    k, v = (jax.device_put(jax.random.normal(key, (batch, steps, kv_heads, head_dim)), rows) for key in keys[1:])
    index = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), (batch, steps))
    segments = (index >= 5).astype(jnp.int32)  # two packed documents, positions restarting at the second
    positions = jnp.where(segments == 1, index - 5, index)
    return (q, k, v), jax.device_put(positions, rows), jax.device_put(segments, rows)


def _attention(sizes: tuple[int, int, int], context: bool, with_segments: bool, batch: int = 8) -> None:
    """Examples over data x fsdp, heads over tensor (2 kv heads); a local window over packed documents."""
    mesh = make_mesh(*sizes)
    qkv, positions, segments = _attention_inputs(batch, mesh)
    seg = segments if with_segments else None
    opts = {"q_positions": positions, "kv_positions": positions, "q_segments": seg, "kv_segments": seg}
    opts |= {"window": 6, "softcap": None, "mesh": None if context else mesh}

    def run(implementation):
        return lambda q, k, v: attention(q, k, v, **opts, implementation=implementation, block_q=8, block_kv=8)

    with jax.set_mesh(mesh) if context else nullcontext():
        local = _shard_map_inputs(run("interpret"), *qkv)
        rows = batch // (sizes[0] * sizes[1]) if batch % (sizes[0] * sizes[1]) == 0 else batch  # else: rows whole
        if sizes[2] == 1 and rows == batch:  # nothing to split: the plain call, no shard_map
            assert local is None
        else:
            assert local[:2] == [(rows, 16, 4 // sizes[2], 8), (rows, 16, 2 // sizes[2], 8)]
        _compare(run("interpret"), run("xla"), qkv)


CHECKS = {
    "lm_head_222_explicit_mesh": lambda: _lm_head((2, 2, 2), context=False),
    "lm_head_data8_context_mesh": lambda: _lm_head((8, 1, 1), context=True),
    "attention_222_explicit_mesh": lambda: _attention((2, 2, 2), context=False, with_segments=True),
    "attention_data8_context_mesh": lambda: _attention((8, 1, 1), context=True, with_segments=False),
    # batches the data x fsdp axes do not divide: heads alone split over tensor, or the plain call
    "attention_222_batch_6_heads_only": lambda: _attention((2, 2, 2), context=False, with_segments=True, batch=6),
    "attention_data8_batch_3_unsplit": lambda: _attention((8, 1, 1), context=False, with_segments=True, batch=3),
}


@pytest.fixture(scope="module")
def eight_device_results() -> dict[str, str]:
    return run_in_child(__file__, CHECKS)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_kernels_on_eight_devices_equal_xla(check: str, eight_device_results: dict[str, str]) -> None:
    assert eight_device_results[check] == "", eight_device_results[check]


# ---------------------------------------------------------------- in process


def test_plan_splits_rows_over_data_fsdp_and_heads_over_tensor() -> None:
    assert set(_mesh.BATCH_AXES) | {_mesh.HEADS_AXIS} <= set(AXES)
    mesh = AbstractMesh((2, 2, 2), AXES)
    assert _mesh.plan(mesh, 4, kv_heads=2) == (mesh, ("data", "fsdp"), "tensor")
    assert _mesh.plan(mesh, 4, kv_heads=1) == (mesh, ("data", "fsdp"), None)  # one kv head: heads stay whole
    assert _mesh.plan(mesh, 6, kv_heads=2) == (mesh, None, "tensor")  # 6 rows do not split 4 ways
    assert _mesh.plan(mesh, 6) is None
    data = AbstractMesh((8, 1, 1), AXES)
    assert _mesh.plan(data, 8) == (data, ("data",), None)
    assert _mesh.plan(AbstractMesh((1, 1, 1), AXES), 8) is None
    assert _mesh.plan(None, 8) is None  # no mesh given and none set


if __name__ == "__main__":  # the child process of eight_device_results
    assert jax.device_count() == 8
    report(CHECKS)
