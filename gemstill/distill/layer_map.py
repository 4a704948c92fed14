"""Which student layer learns from which teacher layer: uniform, last, explicit, adaptive (CKA) or angular
(the teacher blocks kept are all but the run that changes the residual stream least, gemstill.distill.angular).

A mapping is a list of (student layer, teacher layer) pairs sorted by student layer with the teacher layer
non-decreasing (monotone in depth). Layer i means the output of block i (hidden_states[i + 1]).

With num_pairs P smaller than the student's S layers, the student layers that get a teacher are spread evenly
over the depth and end at the last one: s_k = round((k + 1) * S / P) - 1 for k < P (S=6, P=2: layers 2 and 5).
"""

from __future__ import annotations

import io
import itertools
import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from gemstill.distill.angular import angular_distances, kept_blocks
from gemstill.distill.cka import DEFAULT_MAX_TOKENS, choose_layers, cka_matrix, sample_batches, sampled_hidden_states
from gemstill.errors import GemstillError
from gemstill.fsutil import atomic_write_bytes
from gemstill.model import Gemma3

__all__ = [
    "MEASURED",
    "LayerMap",
    "LayerMapConfig",
    "check_pairs",
    "choose_layers",
    "make_layer_map",
    "spread_layers",
    "validate_mapping",
]

Strategy = Literal["uniform", "last", "explicit", "adaptive", "angular"]
MEASURED: tuple[str, ...] = ("adaptive", "angular")  # strategies that run the teacher on a data sample


class LayerMapConfig(BaseModel):
    """How to map student layers to teacher layers (the profile's layer-map section)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = "uniform"
    pairs: list[tuple[int, int]] | None = None  # explicit (student layer, teacher layer) pairs
    num_pairs: int | None = None  # how many student layers get a teacher layer; None: every student layer
    sample_sequences: int = 16  # adaptive/angular: sequences of the sample the statistics are computed on
    max_tokens: int = DEFAULT_MAX_TOKENS  # adaptive/angular: at most this many real tokens (fixed-seed subset)
    # score every strategy's student at init on sample_sequences validation sequences (loads the teacher)
    compare_init: bool = False


def _round_div(num: int, den: int) -> int:
    """round(num / den) with halves rounded up, in exact integer arithmetic."""
    return (2 * num + den) // (2 * den)


def spread_layers(count: int, total: int) -> list[int]:
    """`count` of `total` layers spread evenly over the depth, ending at the last: round((k+1)*total/count) - 1."""
    return [_round_div((k + 1) * total, count) - 1 for k in range(count)]


def _pair_count(config: LayerMapConfig, student_layers: int) -> int:
    if config.pairs is not None:
        return len(config.pairs)
    return student_layers if config.num_pairs is None else config.num_pairs


def check_pairs(pairs: Sequence[tuple[int, int]], student_layers: int, teacher_layers: int) -> None:
    """Refuse pairs out of range, repeating a student layer, unsorted or going backwards in teacher depth."""
    if not pairs:
        raise GemstillError("layer map: no (student, teacher) pairs; give at least one")
    if len(pairs) > student_layers:
        raise GemstillError(
            f"layer map: {len(pairs)} pairs but the student has only {student_layers} layers; give at most one per "
            "student layer"
        )
    if len(pairs) > teacher_layers:
        raise GemstillError(
            f"layer map: {len(pairs)} pairs but the teacher has only {teacher_layers} layers; give at most "
            f"{teacher_layers} pairs"
        )
    seen: set[int] = set()
    for student, teacher in pairs:
        if not 0 <= student < student_layers:
            raise GemstillError(
                f"layer map: pair ({student}, {teacher}) names student layer {student}, outside 0..{student_layers - 1}"
            )
        if not 0 <= teacher < teacher_layers:
            raise GemstillError(
                f"layer map: pair ({student}, {teacher}) names teacher layer {teacher}, outside 0..{teacher_layers - 1}"
            )
        if student in seen:
            raise GemstillError(
                f"layer map: student layer {student} appears in more than one pair; each student layer learns from "
                "one teacher layer"
            )
        seen.add(student)
    for (s0, t0), (s1, t1) in itertools.pairwise(pairs):
        if s1 < s0:
            raise GemstillError(f"layer map: pairs must be sorted by student layer, ({s0}, {t0}) precedes ({s1}, {t1})")
        if t1 < t0:
            raise GemstillError(
                f"layer map: pairs ({s0}, {t0}) and ({s1}, {t1}) go backwards in teacher depth; mappings must be "
                "monotone (teacher layer non-decreasing with student layer)"
            )


def validate_mapping(config: LayerMapConfig, student_layers: int, teacher_layers: int) -> None:
    """Refuse a layer-map config that cannot work for these depths, before any compute."""
    if student_layers < 1 or teacher_layers < 1:
        raise GemstillError(
            f"layer map: student ({student_layers}) and teacher ({teacher_layers}) need at least one layer each"
        )
    if config.strategy == "explicit" and config.pairs is None:
        raise GemstillError(
            "layer map: strategy 'explicit' needs pairs: [[student, teacher], ...]; give them or pick strategy "
            "uniform, last or adaptive"
        )
    if config.strategy != "explicit" and config.pairs is not None:
        raise GemstillError(
            f"layer map: pairs are only read by strategy 'explicit' (got {config.strategy!r}); set strategy: "
            "explicit or drop pairs"
        )
    if config.num_pairs is not None:
        if not 1 <= config.num_pairs <= student_layers:
            raise GemstillError(
                f"layer map: num_pairs={config.num_pairs} must be between 1 and the student's {student_layers} layers"
            )
        if config.pairs is not None and config.num_pairs != len(config.pairs):
            raise GemstillError(
                f"layer map: num_pairs={config.num_pairs} but {len(config.pairs)} explicit pairs; drop num_pairs"
            )
    if config.strategy in MEASURED and (config.sample_sequences < 1 or config.max_tokens < 2):
        raise GemstillError(
            f"layer map: {config.strategy} needs sample_sequences >= 1 and max_tokens >= 2, got "
            f"{config.sample_sequences} and {config.max_tokens}"
        )
    if config.strategy in ("last", "angular") and student_layers > teacher_layers:
        raise GemstillError(
            f"layer map: strategy '{config.strategy}' needs a student no deeper than the teacher ({student_layers} > "
            f"{teacher_layers} layers); use strategy uniform"
        )
    count = _pair_count(config, student_layers)
    if count > teacher_layers:
        raise GemstillError(
            f"layer map: {count} pairs but the teacher has only {teacher_layers} layers; set num_pairs <= "
            f"{teacher_layers}"
        )
    if config.pairs is not None:
        check_pairs(sorted(config.pairs), student_layers, teacher_layers)


class LayerMap(BaseModel):
    """A chosen mapping, with the teacher's CKA similarity when the adaptive strategy computed it."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy
    pairs: list[tuple[int, int]]
    student_layers: int
    teacher_layers: int
    similarity: list[list[float]] | None = None
    angular_distance: list[list[float]] | None = None  # angular: [T + 1, T + 1] between hidden states
    # student.projection importance: per copied teacher block, the FFN units (ascending) its narrower copy keeps
    ffn_units: dict[int, list[int]] | None = None
    # and the query heads (ascending) its copy keeps when the student has fewer heads
    heads: dict[int, list[int]] | None = None
    # and the embedding channels (ascending) the whole student keeps when its embed_dim is narrower
    channels: list[int] | None = None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "layer_map.json") -> LayerMap:
        """Parse and re-check a saved layer map: a hand-edited file gets the same checks as a config."""
        try:
            result = cls.model_validate_json(text)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the file"
            raise GemstillError(
                f"{source}: damaged layer map ({where}: {first['msg']}); re-run the layer_map stage "
                "(gemstill run PROFILE --refresh layer_map) or fix the file"
            ) from None
        check_pairs(result.pairs, result.student_layers, result.teacher_layers)
        return result

    def save(self, out_dir: Path) -> list[Path]:
        """Write layer_map.json, and layer_map.png (CKA heatmap when known, else the pairs as a diagram)."""
        out_dir = Path(out_dir)
        written = [atomic_write_bytes(out_dir / "layer_map.json", self.to_json().encode())]
        written.append(atomic_write_bytes(out_dir / "layer_map.png", _plot(self)))
        return written


def _title(layer_map: LayerMap, width: int) -> str:
    pairs = ", ".join(f"{s}←{t}" for s, t in layer_map.pairs)
    return "\n".join(textwrap.wrap(f"{layer_map.strategy} layer map (student←teacher): {pairs}", width=width))


def _plot(layer_map: LayerMap) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    if layer_map.similarity is not None or layer_map.angular_distance is not None:
        cka = layer_map.similarity is not None
        sim = np.asarray(layer_map.similarity if cka else layer_map.angular_distance)
        size = max(4.5, 0.22 * sim.shape[0] + 3)
        figure, axes = plt.subplots(figsize=(size + 1, size), dpi=110)
        image = axes.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0 if cka else None)
        figure.colorbar(image, ax=axes, label="linear CKA" if cka else "angular distance / pi")
        offset = 0 if cka else 1  # the distance matrix starts at the embedding's output (hidden state 0)
        for teacher in sorted({t for _, t in layer_map.pairs}):
            corner = (teacher + offset - 0.5, teacher + offset - 0.5)
            axes.add_patch(Rectangle(corner, 1, 1, fill=False, edgecolor="red", linewidth=2))
        axes.set_xlabel("teacher layer" if cka else "hidden state (0: embedding, i: after block i - 1)")
        axes.set_ylabel("teacher layer" if cka else "hidden state")
        axes.set_title(_title(layer_map, 70), fontsize=9)
    else:
        height = max(3.0, 0.25 * max(layer_map.student_layers, layer_map.teacher_layers) + 1.5)
        figure, axes = plt.subplots(figsize=(4.5, height), dpi=110)
        for side, count in ((0, layer_map.student_layers), (1, layer_map.teacher_layers)):
            axes.scatter([side] * count, range(count), color="tab:blue", s=18, zorder=3)
        for student, teacher in layer_map.pairs:
            axes.plot([0, 1], [student, teacher], color="red", linewidth=1.2)
        axes.set_xticks([0, 1], ["student layer", "teacher layer"])
        axes.set_ylabel("layer")
        axes.set_xlim(-0.3, 1.3)
        axes.set_title(_title(layer_map, 45), fontsize=9)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def make_layer_map(
    config: LayerMapConfig,
    student_layers: int,
    teacher_layers: int,
    teacher_model: Gemma3 | None = None,
    sample: Mapping[str, np.ndarray] | None = None,
) -> LayerMap:
    """The mapping `config` asks for; adaptive and angular need the teacher model and a sample
    (tokens/positions/segment_ids)."""
    validate_mapping(config, student_layers, teacher_layers)
    similarity = distances = None
    if config.strategy == "explicit":
        pairs = sorted(config.pairs or [])
    else:
        students = spread_layers(_pair_count(config, student_layers), student_layers)
        if config.strategy == "uniform":
            pairs = [(s, _round_div((s + 1) * teacher_layers, student_layers) - 1) for s in students]
        elif config.strategy == "last":
            pairs = [(s, teacher_layers - student_layers + s) for s in students]
        else:
            if teacher_model is None or sample is None:
                raise GemstillError(
                    f"layer map: strategy '{config.strategy}' needs the teacher model and a data sample"
                )
            if teacher_model.config.num_layers != teacher_layers:
                raise GemstillError(
                    f"layer map: the teacher model has {teacher_model.config.num_layers} layers, not {teacher_layers}"
                )
            states = sampled_hidden_states(
                teacher_model, sample_batches(sample, config.sample_sequences), config.max_tokens
            )
            if config.strategy == "adaptive":
                sim = cka_matrix(states[1:])
                pairs = list(zip(students, choose_layers(sim, len(students)), strict=True))
                similarity = sim.tolist()
            else:
                distance = angular_distances(states)
                kept = kept_blocks(distance, student_layers)
                pairs = [(s, kept[s]) for s in students]
                distances = distance.tolist()
    check_pairs(pairs, student_layers, teacher_layers)
    return LayerMap(
        strategy=config.strategy,
        pairs=pairs,
        student_layers=student_layers,
        teacher_layers=teacher_layers,
        similarity=similarity,
        angular_distance=distances,
    )
