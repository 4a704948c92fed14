"""Width pruning by measurement: which feed-forward units of a teacher block a narrower student keeps.

Minitron (Muralidharan et al. 2024) found that pruning width (FFN units, heads, embedding channels) by
activation importance beats dropping whole blocks. Here the FFN units: a unit's importance in block t is its
mean contribution to the block's output, E|a_i| * ||down_i|| over the real calibration tokens, with a_i =
gelu_tanh(gate_i . x) * (up_i . x) and down_i the row of the down projection that carries it to the residual
stream. A unit that is rarely active, or whose output row is small, changes the stream little; the student keeps
the `hidden_dim` units with the largest importance (in the teacher's order, so a full width copies exactly).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemstill.distill.cka import calibration_arrays
from gemstill.distill.layer_map import LayerMap
from gemstill.errors import GemstillError
from gemstill.model import Gemma3, weight


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _unit_sums(
    graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array
) -> jax.Array:
    """[T, F] sum over the batch's real tokens of |a_i| in every block (each block fed the model's own states)."""
    model = nnx.merge(graphdef, state)
    mask = segment_ids > 0
    out = model(tokens, positions, mask=mask, segment_ids=segment_ids, return_logits=False, return_hidden=True)
    key_positions = jnp.where(mask, positions, -1).astype(jnp.int32)
    sums = []
    for block, x in zip(model.layers, out.hidden_states[:-1], strict=True):
        after_attention, _, _ = block.attend(x, positions, key_positions, None, None, False, segment_ids)
        units = jnp.abs(block.feed_forward_units(after_attention).astype(jnp.float32))
        sums.append(jnp.sum(jnp.where(mask[..., None], units, 0.0), axis=(0, 1)))
    return jnp.stack(sums)


def ffn_importance(model: Gemma3, batches: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
    """[T, F] importance of every FFN unit of every block: E|a_i| over real tokens times ||down_i||."""
    graphdef, state = nnx.split(model)
    total, count = None, 0
    for batch in batches:
        arrays = {name: jnp.asarray(a) for name, a in calibration_arrays(batch).items()}
        sums = np.asarray(_unit_sums(graphdef, state, arrays["tokens"], arrays["positions"], arrays["segment_ids"]))
        total = sums if total is None else total + sums
        count += int(np.sum(np.asarray(batch["segment_ids"]) > 0))
    if total is None or count == 0:
        raise GemstillError("FFN importance needs calibration tokens; the sample has none, give more sample sequences")
    down_norms = np.stack(
        [np.linalg.norm(np.asarray(weight(block.mlp.down, jnp.float32)), axis=-1) for block in model.layers]
    )
    return (total / count) * down_norms


def kept_units(importance: np.ndarray, width: int) -> list[int]:
    """The `width` most important units of one block, ascending (ties: the lower index)."""
    if not 1 <= width <= importance.shape[-1]:
        raise GemstillError(f"cannot keep {width} of {importance.shape[-1]} FFN units")
    order = np.argsort(-np.asarray(importance, np.float64), kind="stable")
    return sorted(int(unit) for unit in order[:width])


def with_ffn_units(layer_map: LayerMap, importance: np.ndarray, width: int) -> LayerMap:
    """`layer_map` with, for each teacher block it copies, the `width` most important FFN units kept."""
    units = {t: kept_units(importance[t], width) for _, t in layer_map.pairs}
    return layer_map.model_copy(update={"ffn_units": units})
