"""Start a student from the teacher's weights: embedding, final norm and the mapped blocks, copied.

A student whose blocks begin as copies of the teacher layers they will learn from starts near a useful
function instead of from noise. Blocks not in the mapping keep their random initialization.

Widths must match, unless projection="truncate": then each copied tensor keeps its leading slice along every
axis (the first embed_dim dims, hidden units, heads, kv heads and head dims). That is a simple, explicit
projection, not a learned one; with grouped-query attention it also regroups query heads onto kv heads.
With projection="importance" a narrower hidden_dim keeps, per copied block, the FFN units measured to matter
most, fewer num_heads the query heads measured to matter most, and a narrower embed_dim the embedding channels
measured to matter most (gemstill.distill.width); head_dim and num_kv_heads must equal the teacher's.

Dropping embedding channels changes two constants of the model: the embedding's scale sqrt(embed_dim) and the
mean an RMSNorm divides by. The copy compensates both with f = sqrt(teacher embed_dim / student embed_dim): the
embedding rows are multiplied by f, and the block norms' gains (1 + scale) by f (the final norm's gain is left as
it is, since the tied LM head reads the embedding already multiplied by f). A student dropping channels that are
zero everywhere in the teacher's residual stream then computes exactly the teacher's logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from gemstill.config import Gemma3Config
from gemstill.errors import GemstillError
from gemstill.model import build_model
from gemstill.params import LAYER_PARAMS, check_flat, to_flat

Projection = Literal["none", "truncate", "importance"]
_WIDTHS = ("embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim")


class StudentInit(NamedTuple):
    """The student's flat parameters, and notes a person should read (e.g. local/global mismatches)."""

    params: dict[str, jax.Array]
    notes: list[str]


def check_widths(student: Gemma3Config, teacher: Gemma3Config, projection: Projection) -> None:
    if student.vocab_size != teacher.vocab_size:
        raise GemstillError(
            f"student vocab_size {student.vocab_size} differs from the teacher's {teacher.vocab_size}; the student "
            "must share the teacher's tokenizer and vocabulary"
        )
    wider = [
        f"{n} {getattr(student, n)} > {getattr(teacher, n)}"
        for n in _WIDTHS
        if getattr(student, n) > getattr(teacher, n)
    ]
    if wider:
        raise GemstillError(
            f"student layers wider than the teacher's ({', '.join(wider)}); copying cannot fill them, set "
            "student.init: random"
        )
    narrower = {
        n: f"{n} {getattr(student, n)} < {getattr(teacher, n)}"
        for n in _WIDTHS
        if getattr(student, n) < getattr(teacher, n)
    }
    if narrower and projection == "none":
        raise GemstillError(
            f"student layers narrower than the teacher's ({', '.join(narrower.values())}); set student.init: random "
            "or configure student.projection: importance (FFN units, query heads, embedding channels) or truncate"
        )
    other = [text for name, text in narrower.items() if name not in ("hidden_dim", "num_heads", "embed_dim")]
    if other and projection == "importance":
        raise GemstillError(
            f"student.projection: importance prunes FFN units, query heads and embedding channels only, but the "
            f"student is also narrower in {', '.join(other)}; keep those widths equal to the teacher's or use "
            "projection: truncate"
        )


def _fit(value: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """The leading slice of `value` with this shape (the whole array when shapes already match)."""
    return jnp.asarray(value[tuple(slice(0, n) for n in shape)], dtype=dtype)


def _count_problem(what: str, indices: Sequence[int], need: int, below: int) -> str | None:
    """What is wrong with a chosen index list that must hold `need` distinct indices below `below` (None: nothing)."""
    if len(indices) != need or len(set(indices)) != need or not all(0 <= i < below for i in indices):
        return f"{len(indices)} {what}, need {need} distinct ones below {below}"
    return None


def _block_indices(
    what: str,
    chosen: Mapping[int, Sequence[int]] | None,
    pairs: Sequence[tuple[int, int]],
    projection: Projection,
    need: int,
    below: int,
    group: int | None = None,
) -> dict[int, jax.Array]:
    """Per copied teacher block, the indices (FFN units or query heads: `what`) its student copy keeps; empty
    unless projection="importance". `need` of them, distinct, below `below`; with `group`, as many from each run
    of `group` consecutive indices (the query heads sharing one key/value head)."""
    if projection != "importance":
        if chosen:
            raise GemstillError(f"student init: {what} were chosen but student.projection is not importance")
        return {}
    picked = {int(t): sorted(int(i) for i in indices) for t, indices in (chosen or {}).items()}
    missing = sorted({t for _, t in pairs if t not in picked})
    if missing and need != below:
        raise GemstillError(
            f"student init: no {what} chosen for teacher block(s) {missing}; re-run the layer_map stage "
            "(gemstill run PROFILE --refresh layer_map)"
        )
    size = group or below
    for t, indices in picked.items():
        per_group = {sum(1 for i in indices if i // size == g) for g in range(below // size)}
        problem = _count_problem(what, indices, need, below)
        if problem is None and len(per_group) != 1:
            problem = f"{what} {indices}, not as many from each of its {below // size} key/value groups"
        if problem is not None:
            raise GemstillError(f"student init: teacher block {t} keeps {problem}; re-run the layer_map stage")
    return {t: jnp.asarray(indices, jnp.int32) for t, indices in picked.items()}


def _channel_indices(
    student: Gemma3Config, teacher: Gemma3Config, projection: Projection, channels: Sequence[int] | None
) -> jax.Array | None:
    """The embedding channels the student keeps (None: all of them, unless projection="importance" chose some)."""
    if projection != "importance":
        if channels:
            raise GemstillError("student init: embedding channels were chosen but student.projection is not importance")
        return None
    if channels is None:
        if student.embed_dim != teacher.embed_dim:
            raise GemstillError(
                "student init: no embedding channels chosen for a narrower embed_dim; re-run the layer_map stage "
                "(gemstill run PROFILE --refresh layer_map)"
            )
        return None
    problem = _count_problem("embedding channels", list(channels), student.embed_dim, teacher.embed_dim)
    if problem is not None:
        raise GemstillError(f"student init: chose {problem}; re-run the layer_map stage")
    return jnp.asarray(sorted(channels), jnp.int32)


# the axis of each parameter that runs over the embedding channels
_CHANNEL_AXIS = {
    "embedding": 1,
    "final_norm.scale": 0,
    "pre_attn_norm.scale": 0,
    "post_attn_norm.scale": 0,
    "pre_ffw_norm.scale": 0,
    "post_ffw_norm.scale": 0,
    "attn.q_proj": 0,
    "attn.k_proj": 0,
    "attn.v_proj": 0,
    "attn.o_proj": 2,
    "mlp.gate": 0,
    "mlp.up": 0,
    "mlp.down": 1,
}
_BLOCK_NORMS = ("pre_attn_norm.scale", "post_attn_norm.scale", "pre_ffw_norm.scale", "post_ffw_norm.scale")


def _keep_channels(name: str, value: jax.Array, channels: jax.Array, factor: float) -> jax.Array:
    """`value` of parameter `name` on the kept embedding channels, with the compensation of the module docstring."""
    suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
    if suffix not in _CHANNEL_AXIS:  # q_norm and k_norm run over head_dim
        return value
    value = jnp.take(jnp.asarray(value), channels, axis=_CHANNEL_AXIS[suffix])
    if suffix == "embedding":
        return value * factor
    if suffix in _BLOCK_NORMS:
        return (1.0 + value.astype(jnp.float32)) * factor - 1.0
    return value


def _kind(window: int | None) -> str:
    return "global" if window is None else f"sliding-window ({window})"


def _window_notes(student: Gemma3Config, teacher: Gemma3Config, pairs: Sequence[tuple[int, int]]) -> list[str]:
    """A note per pair copying a local layer into a global one or back: the copy then attends differently."""
    notes = []
    for s, t in pairs:
        s_window, t_window = student.layer_windows[s], teacher.layer_windows[t]
        if (s_window is None) != (t_window is None):
            notes.append(
                f"student layer {s} is {_kind(s_window)} but copies teacher layer {t}, which is {_kind(t_window)}"
            )
    return notes


def with_teacher_types(
    student: Gemma3Config, teacher: Gemma3Config, mapping_pairs: Sequence[tuple[int, int]]
) -> Gemma3Config:
    """The student config whose block s has the type of the teacher block t it copies (window and RoPE base
    follow the type); student blocks without a teacher keep their pattern's type."""
    types = list(student.types)
    for s, t in mapping_pairs:
        types[s] = teacher.types[t]
    return student.replace(layer_types=tuple(types))


def init_student_from_teacher(
    student_config: Gemma3Config,
    teacher_config: Gemma3Config,
    teacher_flat: Mapping[str, jax.Array],
    mapping_pairs: Sequence[tuple[int, int]],
    seed: int,
    projection: Projection = "none",
    ffn_units: Mapping[int, Sequence[int]] | None = None,
    heads: Mapping[int, Sequence[int]] | None = None,
    channels: Sequence[int] | None = None,
) -> StudentInit:
    """A random student (build_model(student_config, seed)) with the teacher's embedding, final norm and mapped blocks.

    Each (student s, teacher t) pair copies every parameter of teacher block t into student block s. With
    projection="importance", `ffn_units` names per teacher block t the hidden units its copy keeps (gate and up
    columns, down rows) and `heads` the query heads it keeps (q_proj heads, o_proj rows); teacher blocks they do
    not name keep all of them (the widths then must match). `channels` are the embedding channels every copied
    tensor keeps (with projection="importance" and a narrower embed_dim).
    """
    check_widths(student_config, teacher_config, projection)
    check_flat(teacher_config, teacher_flat, "teacher parameters")
    for s, t in mapping_pairs:
        if not (0 <= s < student_config.num_layers and 0 <= t < teacher_config.num_layers):
            raise GemstillError(
                f"student init: pair ({s}, {t}) is outside the student's {student_config.num_layers} or the "
                f"teacher's {teacher_config.num_layers} layers; fix the layer map"
            )
    if len({s for s, _ in mapping_pairs}) != len(mapping_pairs):
        raise GemstillError("student init: a student layer appears in two pairs; each copies one teacher layer")
    params = dict(to_flat(build_model(student_config, seed)))
    dtype = student_config.jnp_param_dtype
    # (student name, teacher name, teacher block or None): the block says whose kept FFN units apply
    copies = [("embedding", "embedding", None), ("final_norm.scale", "final_norm.scale", None)]
    for s, t in mapping_pairs:
        copies += [(f"layers.{s}.{name}", f"layers.{t}.{name}", t) for name in LAYER_PARAMS]
    units = _block_indices(
        "FFN units", ffn_units, mapping_pairs, projection, student_config.hidden_dim, teacher_config.hidden_dim
    )
    group = teacher_config.num_heads // teacher_config.num_kv_heads
    kept_heads = _block_indices(
        "query heads", heads, mapping_pairs, projection, student_config.num_heads, teacher_config.num_heads, group
    )
    kept_channels = _channel_indices(student_config, teacher_config, projection, channels)
    factor = (teacher_config.embed_dim / student_config.embed_dim) ** 0.5
    # (parameter suffix, axis it is indexed on, the chosen indices per teacher block)
    selections = [
        (".mlp.gate", 1, units),
        (".mlp.up", 1, units),
        (".mlp.down", 0, units),
        (".attn.q_proj", 1, kept_heads),
        (".attn.o_proj", 0, kept_heads),
    ]
    for target, source, block in copies:
        value = teacher_flat[source]
        for suffix, axis, chosen in selections:
            if block in chosen and source.endswith(suffix):
                value = jnp.take(jnp.asarray(value), chosen[block], axis=axis)
        if kept_channels is not None:
            value = _keep_channels(source, value, kept_channels, factor)
        params[target] = _fit(value, params[target].shape, dtype)
    return StudentInit(params=params, notes=_window_notes(student_config, teacher_config, mapping_pairs))
