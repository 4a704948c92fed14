"""Width pruning by measurement: which feed-forward units and attention heads of a teacher block a narrower
student keeps.

Minitron (Muralidharan et al. 2024) found that pruning width (FFN units, heads, embedding channels) by
activation importance beats dropping whole blocks. Here the FFN units: a unit's importance in block t is its
mean contribution to the block's output, E|a_i| * ||down_i|| over the real calibration tokens, with a_i =
gelu_tanh(gate_i . x) * (up_i . x) and down_i the row of the down projection that carries it to the residual
stream. A unit that is rarely active, or whose output row is small, changes the stream little; the student keeps
the `hidden_dim` units with the largest importance (in the teacher's order, so a full width copies exactly).

A query head's importance is the mean L2 norm of what it adds to the attention output, ||v_n W_o[n]|| over the
real tokens (Minitron's head score). Heads that share a key/value head form a group; every group keeps the same
number of heads (the most important of that group), so the student's grouped-query layout stays valid.

An embedding channel's importance is its mean magnitude where the model reads the residual stream: at the output
of every block's two input norms (before attention, before the FFN) and of the final norm (Minitron's
LayerNorm-output score). Channels are shared by every block, so one set is kept for the whole student.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemstill import distributed
from gemstill.config import Gemma3Config
from gemstill.distill.cka import calibration_arrays
from gemstill.distill.layer_map import LayerMap
from gemstill.errors import GemstillError
from gemstill.model import Gemma3, weight


class _Pass(NamedTuple):
    """The model's own forward pass over one calibration batch, as the importance sums read it."""

    mask: jax.Array  # [B, T] real tokens
    final_hidden: jax.Array  # [B, T, D] the final norm's output
    blocks: list[tuple[Any, jax.Array, jax.Array]]  # per block: the block, its input, the stream after attention
    attend_args: tuple  # (positions, key positions, ..., segment ids) for a block's attention


def _calibration_pass(graphdef, state, tokens, positions, segment_ids) -> _Pass:
    model = nnx.merge(graphdef, state)
    mask = segment_ids > 0
    out = model(tokens, positions, mask=mask, segment_ids=segment_ids, return_logits=False, return_hidden=True)
    args = (positions, jnp.where(mask, positions, -1).astype(jnp.int32), None, None, False, segment_ids)
    blocks = [
        (block, x, block.attend(x, *args)[0]) for block, x in zip(model.layers, out.hidden_states[:-1], strict=True)
    ]
    return _Pass(mask, out.final_hidden, blocks, args)


def _real_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    """[..., K] values summed over the batch's real tokens: [K]."""
    return jnp.sum(jnp.where(mask[..., None], values.astype(jnp.float32), 0.0), axis=(0, 1))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _unit_sums(graphdef: nnx.GraphDef, state: nnx.State, tokens, positions, segment_ids) -> jax.Array:
    """[T, F] sum over the batch's real tokens of |a_i| in every block (each block fed the model's own states)."""
    seen = _calibration_pass(graphdef, state, tokens, positions, segment_ids)
    return jnp.stack(
        [_real_sum(jnp.abs(block.feed_forward_units(after)), seen.mask) for block, _, after in seen.blocks]
    )


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _head_sums(graphdef: nnx.GraphDef, state: nnx.State, tokens, positions, segment_ids) -> jax.Array:
    """[T, N] sum over the batch's real tokens of each query head's contribution norm (the model's own states)."""
    seen = _calibration_pass(graphdef, state, tokens, positions, segment_ids)
    sums = []
    for block, x, _ in seen.blocks:
        values = block.attn.head_values(block.pre_attn_norm(x), *seen.attend_args)[0]
        added = jnp.einsum("btnh,nhd->btnd", values, weight(block.attn.o_proj, values.dtype))
        sums.append(_real_sum(jnp.linalg.norm(added.astype(jnp.float32), axis=-1), seen.mask))
    return jnp.stack(sums)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _channel_sums(graphdef: nnx.GraphDef, state: nnx.State, tokens, positions, segment_ids) -> jax.Array:
    """[D] sum over the batch's real tokens of |channel| at every input norm's output and the final norm's."""
    seen = _calibration_pass(graphdef, state, tokens, positions, segment_ids)
    read = [seen.final_hidden]
    for block, x, after in seen.blocks:
        read += [block.pre_attn_norm(x), block.pre_ffw_norm(after)]
    return _real_sum(sum(jnp.abs(r.astype(jnp.float32)) for r in read) / len(read), seen.mask)


def _token_mean(model: Gemma3, batches: Sequence[Mapping[str, np.ndarray]], sums_of) -> np.ndarray:
    """The per-token mean of `sums_of(graphdef, state, tokens, positions, segment_ids)` over the real tokens; the
    batches are split over processes and devices (gemstill.distributed.map_batches), summed in batch order."""
    graphdef, state = nnx.split(model)
    replicas = distributed.on_each_device(state)
    arrays = [calibration_arrays(batch) for batch in batches]

    def compute(i: int, device: jax.Device) -> jax.Array:
        placed = {name: jax.device_put(a, device) for name, a in arrays[i].items()}
        return sums_of(graphdef, replicas[device], placed["tokens"], placed["positions"], placed["segment_ids"])

    parts = distributed.map_batches("width importance", len(arrays), compute)
    count = sum(int(np.sum(a["segment_ids"] > 0)) for a in arrays)
    if not parts or count == 0:
        raise GemstillError(
            "width importance needs calibration tokens; the sample has none: give more sample sequences"
        )
    total = parts[0]
    for sums in parts[1:]:
        total = total + sums
    return total / count


def head_importance(model: Gemma3, batches: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
    """[T, N] importance of every query head of every block: E||v_n W_o[n]|| over real tokens."""
    return _token_mean(model, batches, _head_sums)


def channel_importance(model: Gemma3, batches: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
    """[D] importance of every embedding channel: its mean |value| over the real tokens at the outputs of the
    blocks' input norms and of the final norm, averaged over those 2 * layers + 1 places."""
    return _token_mean(model, batches, _channel_sums)


def kept_heads(importance: np.ndarray, num_heads: int, num_kv_heads: int) -> list[int]:
    """The `num_heads` query heads one block keeps, ascending: the same number from each key/value group, the
    most important of each (ties: the lower index)."""
    total = importance.shape[-1]
    if num_heads < 1 or num_heads % num_kv_heads or num_heads > total:
        raise GemstillError(
            f"cannot keep {num_heads} of {total} query heads in {num_kv_heads} key/value groups; use a multiple of "
            f"{num_kv_heads} up to {total}"
        )
    group, per_group = total // num_kv_heads, num_heads // num_kv_heads
    kept = []
    for g in range(num_kv_heads):
        members = np.arange(g * group, (g + 1) * group)
        kept += [int(members[i]) for i in kept_units(importance[members], per_group)]
    return sorted(kept)


def with_kept_heads(layer_map: LayerMap, importance: np.ndarray, num_heads: int, num_kv_heads: int) -> LayerMap:
    """`layer_map` with, for each teacher block it copies, the query heads its narrower copy keeps."""
    heads = {t: kept_heads(importance[t], num_heads, num_kv_heads) for _, t in layer_map.pairs}
    return layer_map.model_copy(update={"heads": heads})


def ffn_importance(model: Gemma3, batches: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
    """[T, F] importance of every FFN unit of every block: E|a_i| over real tokens times ||down_i||."""
    mean_units = _token_mean(model, batches, _unit_sums)
    down_norms = np.stack(
        [np.linalg.norm(np.asarray(weight(block.mlp.down, jnp.float32)), axis=-1) for block in model.layers]
    )
    return mean_units * down_norms


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


def with_kept_channels(layer_map: LayerMap, importance: np.ndarray, width: int) -> LayerMap:
    """`layer_map` with the `width` embedding channels the student keeps (the same in every block)."""
    return layer_map.model_copy(update={"channels": kept_units(importance, width)})


# each width importance can prune: (WidthChoice field, config field, manifest metric, what a person reads)
WIDTHS = (
    ("ffn", "hidden_dim", "ffn_units_kept", "FFN units"),
    ("heads", "num_heads", "heads_kept", "query heads"),
    ("channels", "embed_dim", "channels_kept", "embedding channels"),
)


@dataclasses.dataclass(frozen=True)
class WidthChoice:
    """What a student narrower than its teacher keeps, measured once on the teacher and applied to any layer map
    (the layer_map stage's own map and every strategy compare_init scores). None: that width is not pruned."""

    student: Gemma3Config
    ffn: np.ndarray | None = None  # [T, F] unit importance
    heads: np.ndarray | None = None  # [T, N] query-head importance
    channels: np.ndarray | None = None  # [D] embedding-channel importance

    def apply(self, layer_map: LayerMap) -> LayerMap:
        if self.ffn is not None:
            layer_map = with_ffn_units(layer_map, self.ffn, self.student.hidden_dim)
        if self.heads is not None:
            layer_map = with_kept_heads(layer_map, self.heads, self.student.num_heads, self.student.num_kv_heads)
        if self.channels is not None:
            layer_map = with_kept_channels(layer_map, self.channels, self.student.embed_dim)
        return layer_map

    def for_student(self, student: Gemma3Config, teacher: Gemma3Config) -> WidthChoice:
        """These measurements for `student`: only the widths in which it is narrower than `teacher` are pruned."""
        kept = {
            field: getattr(self, field) if getattr(student, width) < getattr(teacher, width) else None
            for field, width, _, _ in WIDTHS
        }
        return WidthChoice(student, **kept)

    def kept(self, teacher: Gemma3Config) -> dict[str, str]:
        """Per pruned width, "kept/teacher's", e.g. {"ffn_units_kept": "576/2048"}."""
        return {
            metric: f"{getattr(self.student, width)}/{getattr(teacher, width)}"
            for field, width, metric, _ in WIDTHS
            if getattr(self, field) is not None
        }


def measure_widths(model: Gemma3, batches: Sequence[Mapping[str, np.ndarray]], student: Gemma3Config) -> WidthChoice:
    """The importance of every width in which `student` is narrower than the teacher `model` (only those are
    measured: each is a pass over the calibration batches)."""
    measures = {"ffn": ffn_importance, "heads": head_importance, "channels": channel_importance}
    narrower = {
        field: measures[field](model, batches)
        for field, width, _, _ in WIDTHS
        if getattr(student, width) < getattr(model.config, width)
    }
    return WidthChoice(student, **narrower)
