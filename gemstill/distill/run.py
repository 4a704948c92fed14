"""What one training run is: the model it trains and where from, the objective, the teacher (if any), and the
arrays it starts with. The distilled student, the cross-entropy baseline, QAT and the from-scratch teacher's
pretraining are all a `Run` handed to the same `train()`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

from gemstill.config import Gemma3Config
from gemstill.distill.config import DistillConfig, TrainingConfig
from gemstill.distill.optim import is_frozen
from gemstill.quant.weights import fake_quant_params

PROJECTION = "projections."  # name prefix of the learned hidden-state projections among the trainable arrays


@dataclasses.dataclass(frozen=True)
class Teacher:
    """What training needs of the teacher: its config and (online mode) its parameters."""

    config: Gemma3Config
    params: Mapping[str, jax.Array] | None  # None: logits come from the cache only
    cache_dir: Path | None  # None: no logit targets (the cross-entropy baseline)
    cache_temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class FakeQuant:
    """Quantization-aware training: the student's forward pass sees its weights fake-quantized in `fmt`."""

    fmt: str  # int8, q8_0 or q4_0 (gemstill.quant)
    embedding: bool  # also the tied embedding / LM head


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything fixed about one training run. `student` is the model trained (the teacher itself when it is
    pretrained here, with `teacher` None)."""

    student: Gemma3Config
    init_params: Mapping[str, jax.Array]
    pairs: tuple[tuple[int, int], ...]  # (student layer, teacher layer) for the intermediate terms
    objective: DistillConfig
    training: TrainingConfig
    teacher: Teacher | None  # None: no teacher at all (pretraining from scratch)
    title: str = "student"
    fake_quant: FakeQuant | None = None  # QAT: train through the quantizer (straight-through gradients)
    learning_rate_key: str = "training.optimizer.learning_rate"  # the profile key a NaN stop tells a person to lower

    @property
    def cache_dir(self) -> Path | None:
        """The teacher cache the logit targets come from; None trains on cross-entropy only."""
        return self.teacher.cache_dir if self.teacher is not None else None

    @property
    def online_teacher_params(self) -> Mapping[str, jax.Array] | None:
        """The teacher's parameters when an intermediate term runs the teacher inside the step, else None."""
        intermediate = self.objective.hidden.weight > 0 or self.objective.attention.weight > 0
        return self.teacher.params if self.teacher is not None and intermediate else None


def needs_projection(run: Run) -> bool:
    """Whether hidden-state matching needs a learned map from the student's width to the teacher's."""
    return (
        run.teacher is not None
        and run.objective.hidden.weight > 0
        and run.student.embed_dim != run.teacher.config.embed_dim
    )


def initial_params(run: Run) -> dict[str, jax.Array]:
    """Trainable arrays, flat: the student's parameters, plus "projections.{layer}" [Ds, Dt] per mapped layer when
    the student and teacher widths differ."""
    params = {name: jnp.array(value, copy=True) for name, value in run.init_params.items()}  # the step donates them
    if run.fake_quant is not None:  # frozen weights never move: put them on the grid once, not in every step
        frozen = {k: v for k, v in params.items() if is_frozen(k, run.training.freeze)}
        params.update(fake_quant_params(run.student, frozen, run.fake_quant.fmt, run.fake_quant.embedding))
    if needs_projection(run):
        ds, dt = run.student.embed_dim, run.teacher.config.embed_dim
        key = jax.random.key(run.training.seed + 7)
        for s, _ in run.pairs:
            params[f"{PROJECTION}{s}"] = jax.random.normal(jax.random.fold_in(key, s), (ds, dt), jnp.float32) * ds**-0.5
    return params


def student_params(params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The model's own arrays among the trainable ones (without the hidden-state projections)."""
    return {name: value for name, value in params.items() if not name.startswith(PROJECTION)}
