"""How parameters, optimizer state and batches are laid out over a (data, fsdp, tensor) device mesh.

Parameters are sharded by name: the model dimension D over "fsdp" (ZeRO-3 style: gathered per use, stored
sliced), the vocabulary / heads / MLP hidden dimension over "tensor" (Megatron style), norms replicated. An axis
whose size the mesh axis does not divide stays replicated on that axis (e.g. one KV head under tensor=2), so every
config runs on every mesh, only less evenly. Batches are split over data x fsdp. Optimizer state follows its
parameter, so Adam moments never sit whole on one device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemstill.errors import GemstillError

AXES = ("data", "fsdp", "tensor")

# parameter-name suffix -> mesh axis of each array dimension (None: replicated on that dimension)
_RULES: dict[str, tuple[str | None, ...]] = {
    "embedding": ("tensor", "fsdp"),  # [V, D]
    "attn.q_proj": ("fsdp", "tensor", None),  # [D, N, H]
    "attn.k_proj": ("fsdp", "tensor", None),  # [D, K, H]
    "attn.v_proj": ("fsdp", "tensor", None),  # [D, K, H]
    "attn.o_proj": ("tensor", None, "fsdp"),  # [N, H, D]
    "mlp.gate": ("fsdp", "tensor"),  # [D, F]
    "mlp.up": ("fsdp", "tensor"),  # [D, F]
    "mlp.down": ("tensor", "fsdp"),  # [F, D]
}


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") over all given (default: all visible) devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = (data, fsdp, tensor)
    if any(s < 1 for s in sizes):
        raise GemstillError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: every size must be at least 1")
    if data * fsdp * tensor != len(devices):
        raise GemstillError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, but "
            f"{len(devices)} {devices[0].platform if devices else ''} devices exist; set hardware.mesh in the "
            f"profile so data * fsdp * tensor = {len(devices)}"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), AXES)


def _rule(name: str) -> tuple[str | None, ...] | None:
    for suffix, rule in _RULES.items():
        if name == suffix or name.endswith("." + suffix):
            return rule
    return None


def _fit(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """The spec with every axis the mesh does not divide evenly dropped to replicated."""
    return P(*(a if a is None or dim % mesh.shape[a] == 0 else None for a, dim in zip(axes, shape, strict=True)))


def param_specs(shapes: Mapping[str, Sequence[int]], mesh: Mesh) -> dict[str, P]:
    """PartitionSpec of each parameter, by name suffix (prefixes like "student." are fine; unknown: replicated)."""
    specs = {}
    for name, shape in shapes.items():
        rule = _rule(name)
        if rule is None:
            specs[name] = P(*(None,) * len(shape))
            continue
        if len(shape) != len(rule):
            raise GemstillError(
                f"parameter {name} has shape {tuple(shape)} but a {name.rsplit('.', 1)[-1]} parameter has "
                f"{len(rule)} dimensions; the parameter names and shapes do not belong to a Gemma 3 model"
            )
        specs[name] = _fit(rule, shape, mesh)
    return specs


def shardings_for(tree_of_specs: Any, mesh: Mesh) -> Any:
    """The same tree with each PartitionSpec turned into a NamedSharding on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_of_specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [B, L] batch arrays: examples split over data x fsdp, positions whole."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def _padded(spec: P, rank: int) -> tuple[str | None, ...]:
    entries = tuple(spec)
    return entries + (None,) * (rank - len(entries)) if len(entries) <= rank else entries


def _state_spec(leaf_shape: tuple[int, ...], param_shape: tuple[int, ...] | None, spec: P, mesh: Mesh) -> P:
    """Spec of one optimizer-state leaf that belongs to a parameter with spec `spec`."""
    replicated = P(*(None,) * len(leaf_shape))
    if param_shape is None:  # shape unknown: reuse the spec when the ranks agree, else replicate
        entries = _padded(spec, len(leaf_shape))
        return _fit(entries, leaf_shape, mesh) if len(entries) == len(leaf_shape) else replicated
    entries = _padded(spec, len(param_shape))
    if leaf_shape == param_shape:  # Adam mu / nu, momentum, unfactored second moments
        return _fit(entries, leaf_shape, mesh)
    if len(leaf_shape) == len(param_shape) - 1:  # Adafactor row / column statistics: one axis reduced away
        for drop in range(len(param_shape)):
            if param_shape[:drop] + param_shape[drop + 1 :] == leaf_shape:
                return _fit(entries[:drop] + entries[drop + 1 :], leaf_shape, mesh)
    return replicated


def optimizer_state_shardings(
    opt_state_shapes: Any,
    param_shardings: Mapping[str, NamedSharding],
    mesh: Mesh,
    param_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Any:
    """NamedShardings for an optax state (arrays or ShapeDtypeStructs, e.g. from jax.eval_shape(opt.init, params)).

    optax keeps per-parameter state as trees shaped like the parameters (mu, nu, v_row, ...): inside those, a leaf
    shaped like its parameter gets the parameter's sharding, a leaf with one axis reduced away (Adafactor's factored
    statistics) the same sharding minus that axis, anything else (counts, hyperparameters) is replicated. Pass
    `param_shapes` to make the matching exact; without it, a leaf of the parameter's rank reuses its sharding.
    """
    param_struct = jax.tree.structure(dict(param_shardings))
    names = list(param_shardings)
    shapes = {n: tuple(param_shapes[n]) for n in names} if param_shapes is not None else {n: None for n in names}

    def is_param_tree(node: Any) -> bool:
        return isinstance(node, Mapping) and jax.tree.structure(dict(node)) == param_struct

    def shard(node: Any) -> Any:
        if is_param_tree(node):
            return type(node)(
                {
                    n: NamedSharding(
                        mesh, _state_spec(tuple(np.shape(node[n])), shapes[n], param_shardings[n].spec, mesh)
                    )
                    for n in names
                }
            )
        return NamedSharding(mesh, P(*(None,) * len(np.shape(node))))

    return jax.tree.map(shard, opt_state_shapes, is_leaf=is_param_tree)


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Place every array of `tree` with the matching sharding (same tree structure)."""
    return jax.device_put(tree, shardings)
