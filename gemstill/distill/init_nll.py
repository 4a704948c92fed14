"""How good a student is before training: the held-out NLL at initialization of each layer-map strategy.

A student copied from the teacher starts wherever its kept blocks leave it; measured here, on the same
sequences for every candidate, so the layer_map stage can show which choice of blocks starts nearest the teacher.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gemstill.config import Gemma3Config
from gemstill.distill.evaluate import Candidate, evaluate_models
from gemstill.distill.layer_map import LayerMap, LayerMapConfig, make_layer_map, validate_mapping
from gemstill.distill.student_init import init_student_from_teacher, with_teacher_types
from gemstill.errors import GemstillError
from gemstill.model import Gemma3

CANDIDATES = ("uniform", "last", "adaptive", "angular")


def candidate_maps(
    settings: LayerMapConfig,
    student_layers: int,
    teacher_model: Gemma3,
    sample: Mapping[str, np.ndarray],
    chosen: LayerMap,
) -> dict[str, LayerMap]:
    """The chosen map and every other strategy that fits these depths (same num_pairs and sample)."""
    maps = {chosen.strategy: chosen}
    teacher_layers = teacher_model.config.num_layers
    every_block = student_layers == teacher_layers and settings.num_pairs in (None, student_layers)
    for strategy in CANDIDATES:
        if strategy in maps:
            continue
        if every_block and settings.strategy != "explicit":  # each strategy pairs block s with teacher block s
            maps[strategy] = chosen.model_copy(
                update={"strategy": strategy, "similarity": None, "angular_distance": None}
            )
            continue
        candidate = settings.model_copy(update={"strategy": strategy, "pairs": None})
        try:
            validate_mapping(candidate, student_layers, teacher_layers)
        except GemstillError:
            continue  # e.g. 'last' for a student deeper than its teacher
        maps[strategy] = make_layer_map(candidate, student_layers, teacher_layers, teacher_model, sample)
    return maps


def init_nll(
    student: Gemma3Config,
    teacher: Gemma3Config,
    teacher_flat: Mapping[str, Any],
    maps: Mapping[str, LayerMap],
    data_dir: Path,
    sequences: int,
    seed: int,
    projection: str = "none",
    teacher_types: bool = False,
    progress: Callable[[str], None] = print,
) -> dict[str, float]:
    """Validation NLL of the teacher and of each map's student at init, on the first `sequences` sequences.

    Maps that copy the same blocks (and FFN units, heads and channels) build the same student: it is scored once and the
    score shared (a student as deep as its teacher gets one map from every strategy)."""
    students, same_as = [], {}
    built: dict[str, str] = {}
    for name, layer_map in maps.items():
        identity = json.dumps(
            [layer_map.pairs, layer_map.ffn_units, layer_map.heads, layer_map.channels], sort_keys=True
        )
        if identity in built:
            same_as[name] = built[identity]
            continue
        built[identity] = name
        pairs = [tuple(pair) for pair in layer_map.pairs]
        config = with_teacher_types(student, teacher, pairs) if teacher_types else student
        init = init_student_from_teacher(
            config,
            teacher,
            teacher_flat,
            pairs,
            seed,
            projection,
            layer_map.ffn_units,
            layer_map.heads,
            layer_map.channels,
        )
        students.append(Candidate(name=name, config=config, params=init.params))
    rows = evaluate_models(
        Candidate(name="teacher", config=teacher, params=teacher_flat),
        students,
        data_dir,
        max_sequences=sequences,
        progress=progress,
    )
    nll = {row["model"]: row["val_nll"] for row in rows}
    return nll | {name: nll[source] for name, source in same_as.items()}
