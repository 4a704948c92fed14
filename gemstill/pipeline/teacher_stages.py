"""The teacher-side stages: prepare_data, pretrain_teacher and teacher_cache (thin glue over gemstill.data,
gemstill.pretrain and gemstill.teacher_cache), with the memory they need."""

from __future__ import annotations

from typing import Any

import numpy as np

from gemstill.errors import GemstillError
from gemstill.memory import estimate
from gemstill.pipeline.context import StageContext
from gemstill.pipeline.mesh import profile_mesh
from gemstill.pipeline.profile import Profile
from gemstill.pipeline.teacher import load_teacher, teacher_config


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
    return pretrain(
        config,
        scratch.training,
        ctx.input("prepare_data"),
        ctx.workdir,
        log=ctx.log,
        mesh=profile_mesh(ctx.profile),
        persist=ctx.persist,
        report_progress=ctx.progress,
    )


def teacher_cache_stage(ctx: StageContext) -> dict[str, Any]:
    from gemstill.teacher_cache.writer import build_teacher_cache

    teacher = load_teacher(ctx)
    return build_teacher_cache(
        ctx.profile.teacher_cache,
        ctx.training_data(),
        teacher,
        ctx.workdir,
        log=ctx.log,
        persist=ctx.persist,
        report_progress=ctx.progress,
    )


def pretrain_memory(profile: Profile) -> dict[str, int]:
    scratch = profile.teacher.scratch
    if scratch is None:
        return {}
    config = teacher_config(profile)
    mem = estimate(config)
    mesh = profile.hardware.mesh
    tokens = scratch.training.batch_size * profile.data.seq_len // (mesh.data * mesh.fsdp)
    # params + fp32 gradients + two AdamW moments, split over fsdp x tensor; activations kept for the backward
    # pass, layer by layer, for this device's rows
    weights = mem.param_bytes // np.dtype(config.jnp_param_dtype).itemsize
    state = (mem.param_bytes + 3 * 4 * weights) // (mesh.fsdp * mesh.tensor)
    activations = tokens * mem.activation_bytes_per_token * (config.num_layers + 1)
    return {"params_and_optimizer": state, "activations": activations, "total": state + activations}


def teacher_cache_memory(profile: Profile) -> dict[str, int]:
    from gemstill.teacher_cache.compute import CHUNK

    config = teacher_config(profile)
    mem = estimate(config)
    # every device holds the whole teacher and computes whole batches (the shards a one-device run writes)
    forward = mem.chunked_head_forward_bytes(profile.teacher_cache.batch_size, profile.data.seq_len, CHUNK)
    return {"params": mem.param_bytes, "forward": forward, "total": mem.param_bytes + forward}
