"""Where a training run's arrays live: one device, or sharded over a (data, fsdp, tensor) mesh by
gemstill.distill.sharding, whose devices may belong to several processes (gemstill.distributed).

Across processes an array is global: parameters (the same value in every process) are built from each process's
copy of its own shards, and batches from the rows each process read itself (`process_rows`), with
jax.make_array_from_process_local_data."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemstill.distill.config import TrainingConfig
from gemstill.distill.sharding import optimizer_state_shardings, param_specs, shard_tree, shardings_for
from gemstill.errors import GemstillError


class Placement:
    """Places parameters, optimizer state and batches for one run (a no-op without a mesh)."""

    def __init__(self, mesh: Mesh | None, training: TrainingConfig):
        self.mesh = mesh
        if mesh is not None:
            micro = training.batch_size // training.grad_accum
            ways = mesh.shape["data"] * mesh.shape["fsdp"]
            if micro % ways:
                raise GemstillError(
                    f"micro-batch of {micro} sequences cannot be split over data x fsdp = {ways} devices; make "
                    "training.batch_size / training.grad_accum a multiple of it"
                )

    def params(self, params: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], Any]:
        if self.mesh is None:
            return params, None
        shardings = shardings_for(param_specs({k: v.shape for k, v in params.items()}, self.mesh), self.mesh)
        if jax.process_count() == 1:
            return shard_tree(params, shardings), shardings
        return jax.tree.map(everywhere, params, shardings), shardings

    def optimizer_state(self, optimizer: optax.GradientTransformation, params: dict[str, jax.Array], shardings: Any):
        if self.mesh is None:
            return optimizer.init(params), None
        shapes = {k: v.shape for k, v in params.items()}
        state_shardings = optimizer_state_shardings(
            jax.eval_shape(optimizer.init, params), shardings, self.mesh, shapes
        )
        return jax.jit(optimizer.init, out_shardings=state_shardings)(params), state_shardings

    def batch(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec(None, ("data", "fsdp")))

    def replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def rows(self) -> NamedSharding | None:
        """Sharding of [B, L] evaluation batches: rows split over data x fsdp."""
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))

    def key(self, seed: int) -> jax.Array:
        """A PRNG key input of a jitted function (global, replicated, where the mesh spans processes)."""
        key = jax.random.key(seed)
        if self.mesh is None or jax.process_count() == 1:
            return key
        return jax.random.wrap_key_data(everywhere(jax.random.key_data(key), self.replicated()))

    def scalar(self, value: Any) -> Any:
        """A step number or other scalar input of a jitted function, global where the mesh spans processes."""
        if self.mesh is None or jax.process_count() == 1:
            return jax.numpy.asarray(value)
        return everywhere(np.asarray(value), self.replicated())


def everywhere(value: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds whole (each process places its own devices' shards)."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def process_rows(sharding: NamedSharding | None, rows: int, axis: int, rank: int) -> slice:
    """Which of the `rows` along `axis` (of a rank-`rank` batch array) this process's devices hold, so it reads
    only those: all of them in a one-process run."""
    if sharding is None or jax.process_count() == 1:
        return slice(0, rows)
    shape = tuple(rows if d == axis else 1 for d in range(rank))
    spans = {index[axis].indices(rows)[:2] for index in sharding.addressable_devices_indices_map(shape).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) < hi - lo:
        raise GemstillError(
            f"this process's devices hold rows {sorted(spans)} of axis {axis}: not one block; order the mesh's "
            "devices by process (the default)"
        )
    return slice(lo, hi)


def place_rows(local: dict[str, np.ndarray], sharding: NamedSharding | None, rows: int, axis: int) -> dict:
    """Batch arrays whose `axis` holds `rows` rows in all, from this process's block of them (process_rows)."""
    if sharding is None:
        return {name: jax.numpy.asarray(v) for name, v in local.items()}
    if jax.process_count() == 1:
        return {name: jax.device_put(v, sharding) for name, v in local.items()}
    return {
        name: jax.make_array_from_process_local_data(
            sharding, v, tuple(rows if d == axis else n for d, n in enumerate(v.shape))
        )
        for name, v in local.items()
    }
