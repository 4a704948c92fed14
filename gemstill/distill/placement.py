"""Where a training run's arrays live: one device, or sharded over a (data, fsdp, tensor) mesh by
gemstill.distill.sharding."""

from __future__ import annotations

from typing import Any

import jax
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
        return shard_tree(params, shardings), shardings

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
