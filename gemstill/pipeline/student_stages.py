"""The student stages: layer_map, train_student and train_baseline (thin glue over gemstill.distill)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from gemstill import distributed
from gemstill.config import Gemma3Config
from gemstill.errors import GemstillError
from gemstill.pipeline.context import StageContext
from gemstill.pipeline.mesh import profile_mesh
from gemstill.pipeline.profile import Profile
from gemstill.pipeline.teacher import load_teacher, teacher_config

if TYPE_CHECKING:
    pass


def student_config(profile: Profile, teacher: Gemma3Config) -> Gemma3Config:
    precision = profile.precision
    return profile.student.gemma_config(teacher).replace(param_dtype=precision.params, dtype=precision.compute)


def validate_student(profile: Profile) -> None:
    """Checks that need the teacher's size, run when a plan is made (before any compute)."""
    from gemstill.distill.layer_map import validate_mapping
    from gemstill.distill.student_init import check_widths

    teacher = teacher_config(profile)
    student = student_config(profile, teacher)
    validate_mapping(profile.layer_map, student.num_layers, teacher.num_layers)
    if profile.student.init == "teacher":
        check_widths(student, teacher, profile.student.projection)
    elif profile.student.layer_types == "teacher":
        raise GemstillError(
            "student.layer_types: teacher copies types of teacher blocks; it needs student.init: teacher"
        )
    elif profile.layer_map.compare_init:
        raise GemstillError(
            "layer_map.compare_init scores students copied from the teacher; it needs student.init: teacher"
            " (or set layer_map.compare_init: false)"
        )


def layer_map_stage(ctx: StageContext) -> dict[str, Any]:
    from gemstill.data.format import read_split
    from gemstill.distill.cka import sample_batches
    from gemstill.distill.layer_map import MEASURED, make_layer_map
    from gemstill.distill.width import WIDTHS, measure_widths

    settings = ctx.profile.layer_map
    student_settings = ctx.profile.student
    compare = settings.compare_init and student_settings.init == "teacher"
    prune = student_settings.init == "teacher" and student_settings.projection == "importance"
    if settings.strategy in MEASURED or compare or prune:
        teacher = load_teacher(ctx)
        config, model = teacher.config, teacher.model
        sample = read_split(ctx.input("prepare_data"), "train")
    else:
        config, model, sample = teacher_config(ctx.profile), None, None
    student = student_config(ctx.profile, config)
    layer_map = make_layer_map(settings, student.num_layers, config.num_layers, model, sample)
    widths = None
    if prune:
        widths = measure_widths(model, sample_batches(sample, settings.sample_sequences), student)
        layer_map = widths.apply(layer_map)
        labels = {metric: label for _, _, metric, label in WIDTHS}
        for metric, kept in widths.kept(config).items():
            ctx.log(f"layer_map: the student keeps the {kept} {labels[metric]} measured to matter most")
    if distributed.is_leader():  # every process of a multi-process run measured the same map; one writes it
        layer_map.save(ctx.workdir)
    ctx.log(f"layer_map: {settings.strategy} pairs (student, teacher): {layer_map.pairs}")
    metrics: dict[str, Any] = {"strategy": settings.strategy, "pairs": json.dumps(layer_map.pairs)}
    if widths is not None:
        metrics |= widths.kept(config)
    if compare:
        from gemstill.distill.init_nll import candidate_maps, init_nll
        from gemstill.fsutil import atomic_write_bytes
        from gemstill.params import to_flat

        maps = candidate_maps(settings, student.num_layers, model, sample, layer_map)
        if widths is not None:
            maps = {name: widths.apply(candidate) for name, candidate in maps.items()}
        nll = init_nll(
            student,
            config,
            to_flat(model),
            maps,
            ctx.input("prepare_data"),
            settings.sample_sequences,
            student_settings.seed,
            student_settings.projection,
            teacher_types=student_settings.layer_types == "teacher",
            progress=ctx.log,
        )
        table = {name: {"pairs": maps[name].pairs, "init_nll": nll[name]} for name in maps}
        if distributed.is_leader():
            atomic_write_bytes(ctx.workdir / "init_nll.json", json.dumps({"teacher": nll["teacher"], **table}).encode())
        for name in maps:
            ctx.log(
                f"layer_map: {name} student's validation NLL at init {nll[name]:.3f} (teacher {nll['teacher']:.3f})"
            )
        metrics |= {f"init_nll_{name}": nll[name] for name in maps}
        metrics |= {"teacher_nll": nll["teacher"], "student_init_nll": nll[settings.strategy]}
    return metrics


def _student_run(ctx: StageContext, baseline: bool):
    """The training Run of the distilled student or of the cross-entropy baseline (same init, data, steps)."""
    from gemstill.distill.config import DistillConfig
    from gemstill.distill.layer_map import LayerMap
    from gemstill.distill.run import Run, Teacher
    from gemstill.distill.student_init import init_student_from_teacher, with_teacher_types
    from gemstill.model import build_model
    from gemstill.params import to_flat

    profile = ctx.profile
    teacher = load_teacher(ctx)
    teacher_flat = to_flat(teacher.model)
    student = student_config(profile, teacher.config)
    path = ctx.input("layer_map") / "layer_map.json"
    layer_map = LayerMap.from_json(path.read_text(), source=str(path))
    pairs = tuple((int(s), int(t)) for s, t in layer_map.pairs)
    if profile.student.init == "teacher":
        if profile.student.layer_types == "teacher":
            student = with_teacher_types(student, teacher.config, pairs)
            ctx.log(f"student init: layer types {student.types} from the teacher blocks copied")
        init = init_student_from_teacher(
            student,
            teacher.config,
            teacher_flat,
            pairs,
            profile.student.seed,
            profile.student.projection,
            layer_map.ffn_units,
            layer_map.heads,
            layer_map.channels,
        )
        params = init.params
        for note in init.notes:
            ctx.log(f"student init: {note}")
    else:
        params = to_flat(build_model(student, profile.student.seed))
    objective = DistillConfig(alpha=0.0) if baseline else profile.distill
    online = not baseline and objective.online_teacher
    return Run(
        student=student,
        init_params=params,
        pairs=pairs,
        objective=objective,
        training=profile.training,
        teacher=Teacher(
            config=teacher.config,
            params=teacher_flat if online else None,
            cache_dir=None if baseline else ctx.input("teacher_cache"),
            cache_temperature=1.0 if baseline else profile.teacher_cache.temperature,  # the baseline reads no cache
        ),
        title="baseline" if baseline else "student",
    )


def _train(ctx: StageContext, baseline: bool) -> dict[str, Any]:
    from gemstill.distill.train import train

    run = _student_run(ctx, baseline)
    data_dir = ctx.training_data()
    mesh = profile_mesh(ctx.profile)
    tokenizer_model = (data_dir / "tokenizer.model").read_bytes()
    metrics = train(
        run,
        data_dir,
        ctx.workdir,
        tokenizer_model,
        log=ctx.log,
        mesh=mesh,
        persist=ctx.persist,
        report_progress=ctx.progress,
    )
    return metrics | _init_nll(ctx)


def _init_nll(ctx: StageContext) -> dict[str, float]:
    """The student's validation NLL at init, as the layer_map stage measured it (layer_map.compare_init), kept in
    the training stage's manifest and in init_nll.json beside its model, where the evaluate report reads it."""
    from gemstill.fsutil import atomic_write_bytes

    measured = ctx.input("layer_map") / "init_nll.json"  # written only by compare_init, on a student.init: teacher
    if not measured.is_file():
        return {}
    table = json.loads(measured.read_text())
    chosen = {"init_nll": table[ctx.profile.layer_map.strategy]["init_nll"], "teacher_init_nll": table["teacher"]}
    atomic_write_bytes(ctx.workdir / "init_nll.json", json.dumps(chosen).encode())
    return chosen


def train_student_stage(ctx: StageContext) -> dict[str, Any]:
    return _train(ctx, baseline=False)


def train_baseline_stage(ctx: StageContext) -> dict[str, Any]:
    return _train(ctx, baseline=True)


def train_student_memory(profile: Profile) -> dict[str, int]:
    return _train_memory(profile, online_teacher=profile.distill.online_teacher)


def train_baseline_memory(profile: Profile) -> dict[str, int]:
    return _train_memory(profile, online_teacher=False)


def _train_memory(profile: Profile, online_teacher: bool) -> dict[str, int]:
    """Per-device estimate of a training step: sharded state, one micro-batch's activations, one loss tile."""
    import numpy as np

    from gemstill.memory import estimate

    teacher = teacher_config(profile)
    student = student_config(profile, teacher)
    mem = estimate(student)
    mesh = profile.hardware.mesh
    weights = mem.param_bytes // np.dtype(student.jnp_param_dtype).itemsize
    slots = 3 if profile.training.optimizer.name == "adamw" else 1  # fp32 gradients + moments (Adafactor: ~factored)
    state = (mem.param_bytes + slots * 4 * weights) // (mesh.fsdp * mesh.tensor)
    training = profile.training
    micro = max(training.batch_size // training.grad_accum // (mesh.data * mesh.fsdp), 1)
    tokens = micro * profile.data.seq_len
    kept_layers = 1 if training.remat == "block" else student.num_layers
    activations = tokens * mem.body_bytes_per_token * (kept_layers + 1) + micro * mem.attention_score_bytes(
        profile.data.seq_len
    )
    head = 3 * min(training.loss_chunk, tokens) * mem.logit_bytes_per_token  # logits, exp, gradient of one tile
    teacher_bytes = estimate(teacher).param_bytes // (mesh.fsdp * mesh.tensor) if online_teacher else 0
    total = state + activations + head + teacher_bytes
    return {"state": state, "activations": activations, "loss_tile": head, "teacher": teacher_bytes, "total": total}
