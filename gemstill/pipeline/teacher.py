"""The teacher a profile names: its config (without reading weights) and the identity its cache keys hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemstill.config import Gemma3Config, variant
from gemstill.pipeline.context import StageContext
from gemstill.pipeline.profile import Profile

# gemstill.loading imports the model (and JAX): imported where used, so making a plan stays light


def teacher_config(profile: Profile) -> Gemma3Config:
    """The teacher's architecture at the profile's precision: from scratch settings, the checkpoint, or the named
    variant when the checkpoint is not on this machine (so a plan can be made before the weights arrive)."""
    from gemstill.loading import load_checkpoint_config

    teacher = profile.teacher
    if teacher.scratch is not None:
        config = teacher.scratch.gemma_config()
    elif teacher.variant is not None and not _reachable(teacher.model):
        config = variant(teacher.variant)
    else:
        config = load_checkpoint_config(teacher.model)
    return config.replace(param_dtype=profile.precision.params, dtype=profile.precision.compute)


def teacher_identity(profile: Profile) -> dict[str, Any]:
    """What the teacher checkpoint is, by content (empty for a teacher pretrained in the pipeline)."""
    from gemstill.loading import spec_identity

    return spec_identity(profile.teacher.model) if profile.teacher.model else {}


def teacher_spec(ctx: StageContext) -> str:
    """The teacher's checkpoint spec: the profile's model, or the one pretrain_teacher trained."""
    return ctx.profile.teacher.model or f"orbax:{ctx.input('pretrain_teacher') / 'model'}"


def load_teacher(ctx: StageContext):
    """The teacher model at the profile's precision."""
    from gemstill.loading import load_model

    precision = ctx.profile.precision
    return load_model(teacher_spec(ctx), param_dtype=precision.params, dtype=precision.compute)


def _reachable(spec: str) -> bool:
    from gemstill.loading import parse_spec

    scheme, location = parse_spec(spec)
    return scheme == "alias" or Path(location).exists()
