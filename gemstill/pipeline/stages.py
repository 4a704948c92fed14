"""The built-in stage tasks: what each runs, which profile sections its cache key hashes, its code, its memory."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from gemstill.errors import GemstillError
from gemstill.memory import estimate
from gemstill.pipeline import quant_stages, reasoning_stages, student_stages
from gemstill.pipeline.context import StageContext
from gemstill.pipeline.profile import Profile

StageFn = Callable[[StageContext], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class StageTask:
    fn: StageFn
    reads: tuple[str, ...]  # dotted profile paths the key hashes
    code: tuple[str, ...]  # modules whose source is part of the key (the code version)
    memory: Callable[[Profile], dict[str, int]] = lambda profile: {}
    validate: Callable[[Profile], None] = lambda profile: None  # checks run when the plan is made, before compute


def _teacher_spec_identity(profile: Profile) -> dict[str, Any]:
    from gemstill.loading import spec_identity

    return spec_identity(profile.teacher.model) if profile.teacher.model else {}


def prepare_data_stage(ctx: StageContext) -> dict[str, Any]:
    from gemstill.data.prepare import prepare_data
    from gemstill.loading import load_tokenizer

    teacher = ctx.profile.teacher
    tokenizer = load_tokenizer(teacher.model) if teacher.model else None
    train_tokenizer = teacher.scratch.tokenizer if teacher.scratch else None
    return prepare_data(ctx.profile.data, ctx.workdir, tokenizer, train_tokenizer, log=ctx.log)


def pretrain_teacher_stage(ctx: StageContext) -> dict[str, Any]:
    from gemstill.pretrain import pretrain

    scratch = ctx.profile.teacher.scratch
    if scratch is None:
        raise GemstillError("stage pretrain_teacher needs teacher.scratch in the profile; or drop the stage")
    precision = ctx.profile.precision
    config = scratch.gemma_config().replace(param_dtype=precision.params, dtype=precision.compute)
    return pretrain(config, scratch.training, ctx.input("prepare_data"), ctx.workdir, log=ctx.log)


def teacher_cache_stage(ctx: StageContext) -> dict[str, Any]:
    from gemstill.pipeline.student_stages import load_teacher
    from gemstill.teacher_cache.writer import build_teacher_cache

    teacher = load_teacher(ctx)
    return build_teacher_cache(ctx.profile.teacher_cache, ctx.training_data(), teacher, ctx.workdir, log=ctx.log)


def teacher_config(profile: Profile):
    from gemstill.config import variant
    from gemstill.loading import load_checkpoint_config

    teacher = profile.teacher
    if teacher.scratch is not None:
        config = teacher.scratch.gemma_config()
    elif teacher.variant is not None and not _reachable(teacher.model):
        config = variant(teacher.variant)
    else:
        config = load_checkpoint_config(teacher.model)
    return config.replace(param_dtype=profile.precision.params, dtype=profile.precision.compute)


def _reachable(spec: str) -> bool:
    from pathlib import Path

    from gemstill.loading import parse_spec

    scheme, location = parse_spec(spec)
    return scheme == "alias" or Path(location).exists()


def _pretrain_memory(profile: Profile) -> dict[str, int]:
    scratch = profile.teacher.scratch
    if scratch is None:
        return {}
    config = teacher_config(profile)
    mem = estimate(config)
    tokens = scratch.training.batch_size * profile.data.seq_len // profile.hardware.mesh.data
    # params + fp32 gradients + two AdamW moments; activations kept for the backward pass, layer by layer
    state = mem.param_bytes + 3 * 4 * (mem.param_bytes // np.dtype(config.jnp_param_dtype).itemsize)
    activations = tokens * mem.activation_bytes_per_token * (config.num_layers + 1)
    return {"params_and_optimizer": state, "activations": activations, "total": state + activations}


def _teacher_cache_memory(profile: Profile) -> dict[str, int]:
    from gemstill.teacher_cache.compute import CHUNK

    config = teacher_config(profile)
    mem = estimate(config)
    sequences = max(profile.teacher_cache.batch_size // profile.hardware.mesh.data, 1)
    forward = mem.chunked_head_forward_bytes(sequences, profile.data.seq_len, CHUNK)
    return {"params": mem.param_bytes, "forward": forward, "total": mem.param_bytes + forward}


BUILTIN: dict[str, StageTask] = {
    "prepare_data": StageTask(
        fn=prepare_data_stage,
        reads=("data", "teacher.model", "teacher.scratch.tokenizer", "_teacher_identity", "_data_identity"),
        code=(
            "gemstill.data.prepare",
            "gemstill.data.generated",
            "gemstill.data.sources",
            "gemstill.data.python_docs",
            "gemstill.data.format",
            "gemstill.tokenizer",
        ),
    ),
    "pretrain_teacher": StageTask(
        fn=pretrain_teacher_stage,
        reads=("teacher.scratch", "precision"),
        code=("gemstill.pretrain", "gemstill.model", "gemstill.params"),
        memory=_pretrain_memory,
    ),
    "teacher_cache": StageTask(
        fn=teacher_cache_stage,
        reads=("teacher", "teacher_cache", "precision", "_teacher_identity"),
        code=(
            "gemstill.teacher_cache.compute",
            "gemstill.teacher_cache.writer",
            "gemstill.model",
            "gemstill.loading",
        ),
        memory=_teacher_cache_memory,
    ),
}

_STUDENT_READS = ("teacher", "student", "layer_map", "training", "precision", "hardware.mesh", "_teacher_identity")
_STUDENT_CODE = (
    "gemstill.distill.train",
    "gemstill.distill.head",
    "gemstill.distill.losses",
    "gemstill.distill.optim",
    "gemstill.distill.config",
    "gemstill.distill.student_init",
    "gemstill.distill.checkpointing",
    "gemstill.distill.sharding",
    "gemstill.kernels.lm_head",
    "gemstill.kernels.attention",
    "gemstill.model",
    "gemstill.params",
)
BUILTIN.update(
    {
        "layer_map": StageTask(
            fn=student_stages.layer_map_stage,
            reads=("teacher", "student", "layer_map", "precision", "_teacher_identity"),
            code=("gemstill.distill.layer_map", "gemstill.distill.cka", "gemstill.model"),
            validate=student_stages.validate_student,
        ),
        "train_student": StageTask(
            fn=student_stages.train_student_stage,
            reads=(*_STUDENT_READS, "distill", "teacher_cache.temperature"),
            code=_STUDENT_CODE,
            memory=student_stages.train_student_memory,
            validate=student_stages.validate_student,
        ),
        "train_baseline": StageTask(
            fn=student_stages.train_baseline_stage,
            reads=_STUDENT_READS,
            code=_STUDENT_CODE,
            memory=student_stages.train_baseline_memory,
            validate=student_stages.validate_student,
        ),
        "evaluate": StageTask(
            fn=student_stages.evaluate_stage,
            reads=("teacher", "evaluate", "quantize", "qat.formats", "precision", "_teacher_identity"),
            code=("gemstill.distill.evaluate", "gemstill.model", "gemstill.quant", "gemstill.pipeline.quant_stages"),
        ),
        "evaluate_reasoning": StageTask(
            fn=reasoning_stages.evaluate_reasoning_stage,
            reads=(
                "teacher",
                "reasoning",
                "quantize",
                "qat.formats",
                "precision",
                "_teacher_identity",
                "_problem_files",
            ),
            code=(
                "gemstill.pipeline.reasoning_stages",
                "gemstill.reasoning.suite",
                "gemstill.reasoning.cot",
                "gemstill.reasoning.tot",
                "gemstill.reasoning.models",
                "gemstill.reasoning.problems",
                "gemstill.reasoning.records",
                "gemstill.reasoning.report",
                "gemstill.data.game24_tot",
                "gemstill.sampler",
                "gemstill.model",
            ),
        ),
        "teacher_generate": StageTask(
            fn=reasoning_stages.teacher_generate_stage,
            reads=("teacher", "data", "teacher_generate", "precision", "_teacher_identity", "_data_identity"),
            code=(
                "gemstill.pipeline.reasoning_stages",
                "gemstill.reasoning.teacher_solutions",
                "gemstill.reasoning.models",
                "gemstill.reasoning.suite",
                "gemstill.data.prepare",
                "gemstill.data.generated",
                "gemstill.data.format",
                "gemstill.sampler",
                "gemstill.model",
            ),
        ),
        "quantize": StageTask(
            fn=quant_stages.quantize_stage,
            reads=("quantize",),
            code=("gemstill.pipeline.quant_stages", "gemstill.quant", "gemstill.checkpoints.gguf_file"),
            validate=quant_stages.validate_quantization,
        ),
        "qat": StageTask(
            fn=quant_stages.qat_stage,
            reads=("quantize.embedding", "qat", "distill", "training", "teacher_cache.temperature", "hardware.mesh"),
            code=("gemstill.pipeline.quant_stages", "gemstill.quant", "gemstill.checkpoints.gguf_file", *_STUDENT_CODE),
            memory=student_stages.train_baseline_memory,  # the student's training step, no online teacher
            validate=quant_stages.validate_quantization,
        ),
        "export": StageTask(
            fn=quant_stages.export_stage,
            reads=("export", "quantize.embedding", "qat.formats", "teacher", "_teacher_identity"),
            code=(
                "gemstill.pipeline.quant_stages",
                "gemstill.export",
                "gemstill.quant",
                "gemstill.checkpoints.gguf_file",
                "gemstill.checkpoints.hf",
                "gemstill.tokenizer",
            ),
        ),
    }
)


# derived values a key may hash besides profile sections
def _data_identity(profile: Profile) -> Any:
    """What the data depends on besides its settings: the Python version for the stdlib docstring corpus."""
    import platform

    return platform.python_version() if profile.data.source == "python-docs" else None


def _problem_files(profile: Profile) -> Any:
    """The content of the reasoning problem files: editing one re-runs the reasoning evaluation."""
    from pathlib import Path

    from gemstill.fingerprint import file_sha256

    return {path: file_sha256(Path(path)) if Path(path).is_file() else None for path in profile.reasoning.problems}


DERIVED: dict[str, Callable[[Profile], Any]] = {
    "_teacher_identity": _teacher_spec_identity,
    "_data_identity": _data_identity,
    "_problem_files": _problem_files,
}


def resolve_task(name: str, extra_reads: list[str]) -> StageTask:
    """A built-in task by name, or a custom stage function given as "package.module:function"."""
    if name in BUILTIN:
        base = BUILTIN[name]
        return dataclasses.replace(base, reads=base.reads + tuple(extra_reads))
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise GemstillError(f"unknown task '{name}'; use one of {sorted(BUILTIN)} or 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise GemstillError(f"task '{name}' cannot be imported ({err}); check the module path") from None
    return StageTask(fn=fn, reads=tuple(extra_reads), code=(module_name,))
