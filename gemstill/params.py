"""Parameters as a flat {dotted name: array} dict: the common currency of every checkpoint format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemstill.config import Gemma3Config
from gemstill.errors import GemstillError
from gemstill.model import Gemma3, abstract_model
from gemstill.quant.packed import PackedWeight

LAYER_PARAMS = (
    "pre_attn_norm.scale",
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.o_proj",
    "attn.q_norm.scale",
    "attn.k_norm.scale",
    "post_attn_norm.scale",
    "pre_ffw_norm.scale",
    "mlp.gate",
    "mlp.up",
    "mlp.down",
    "post_ffw_norm.scale",
)


def expected_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Every parameter name of a model with this config, with its shape."""
    d, f, n, k, h = (config.embed_dim, config.hidden_dim, config.num_heads, config.num_kv_heads, config.head_dim)
    per_layer = {
        "pre_attn_norm.scale": (d,),
        "attn.q_proj": (d, n, h),
        "attn.k_proj": (d, k, h),
        "attn.v_proj": (d, k, h),
        "attn.o_proj": (n, h, d),
        "attn.q_norm.scale": (h,),
        "attn.k_norm.scale": (h,),
        "post_attn_norm.scale": (d,),
        "pre_ffw_norm.scale": (d,),
        "mlp.gate": (d, f),
        "mlp.up": (d, f),
        "mlp.down": (f, d),
        "post_ffw_norm.scale": (d,),
    }
    shapes = {"embedding": (config.vocab_size, d), "final_norm.scale": (d,)}
    for i in range(config.num_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def to_flat(model: Gemma3) -> dict[str, jax.Array]:
    """The model's parameters keyed by dotted path (e.g. "layers.3.attn.q_proj")."""
    flat = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        flat[".".join(str(p) for p in path)] = value.get_value()
    return flat


def check_flat(config: Gemma3Config, flat: Mapping[str, object], source: str) -> None:
    """Refuse a parameter set that does not fit the config, naming the first problem."""
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise GemstillError(
            f"{source}: {len(missing)} parameters missing (first: {missing[0]}); the checkpoint is incomplete "
            "or not a Gemma 3 text model"
        )
    extra = sorted(set(flat) - set(shapes))
    if extra:
        raise GemstillError(f"{source}: unexpected parameter {extra[0]}; the checkpoint does not match its config")
    for name, shape in shapes.items():
        value = flat[name]
        got = value.shape if isinstance(value, PackedWeight) else tuple(np.shape(value))
        if got != shape:
            raise GemstillError(
                f"{source}: parameter {name} has shape {got}, the config needs {shape}; "
                "the checkpoint and its config disagree"
            )


def from_flat(config: Gemma3Config, flat: Mapping[str, object], source: str = "checkpoint") -> Gemma3:
    """Build a model holding these parameters (cast to the config's param dtype), after checking every shape."""
    check_flat(config, flat, source)
    model = abstract_model(config)
    dtype = config.jnp_param_dtype
    state = nnx.state(model, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        value = flat[".".join(str(p) for p in path)]
        variable.set_value(value if isinstance(value, PackedWeight) else jnp.asarray(value, dtype=dtype))
    nnx.update(model, state)
    return model


def count_params(config: Gemma3Config) -> dict[str, int]:
    """Parameter counts: embedding (tied head included once) and everything else."""
    shapes = expected_shapes(config)
    embedding = int(np.prod(shapes["embedding"]))
    total = sum(int(np.prod(s)) for s in shapes.values())
    return {"embedding": embedding, "non_embedding": total - embedding, "total": total}


class ParamBinder:
    """Rebinds a flat {name: array} dict to the model's structure: the functional form jit/grad/optax want."""

    def __init__(self, model: Gemma3):
        self.graphdef, self._template = nnx.split(model)

    def __call__(self, flat: Mapping[str, jax.Array]) -> Gemma3:
        nested: dict = {}
        for name, value in flat.items():
            node = nested
            *parents, leaf = (int(p) if p.isdigit() else p for p in name.split("."))
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        state = jax.tree.map(lambda x: x, self._template)  # fresh containers: the template is never mutated
        nnx.replace_by_pure_dict(state, nested)
        return nnx.merge(self.graphdef, state)


def check_finite(flat: Mapping[str, Any], source: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first tensor: a damaged file (flipped bytes) or a diverged
    run would otherwise score NaN and pass as a result. Packed weights are checked by their scales."""
    for name, value in flat.items():
        array = value.scales if isinstance(value, PackedWeight) else value
        finite = np.isfinite(array).all() if isinstance(array, np.ndarray) else bool(jnp.all(jnp.isfinite(array)))
        if not finite:
            raise GemstillError(
                f"{source}: tensor {name} holds NaN or Inf; the checkpoint is damaged or its training diverged: "
                "recompute or re-download it"
            )
