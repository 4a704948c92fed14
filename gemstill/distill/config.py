"""Profile sections of the student stages: `student`, `distill` and `training` (validated before any compute)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gemstill.config import Gemma3Config
from gemstill.errors import GemstillError


class Schedule(BaseModel):
    """A value moving from `start` to `end` over the run, linearly or along a half cosine."""

    model_config = ConfigDict(extra="forbid")
    start: float
    end: float
    shape: Literal["linear", "cosine"] = "linear"

    def fraction(self, progress: Any) -> Any:
        """The interpolation weight of `end` at progress in [0, 1] (works on floats and traced arrays)."""
        if self.shape == "linear":
            return progress
        import jax.numpy as jnp

        return 0.5 - 0.5 * jnp.cos(jnp.pi * progress)


def schedule_value(value: float | Schedule, step: Any, total_steps: int) -> Any:
    """The value at a 0-based step (a Python int or a traced array) of a run of total_steps steps."""
    if not isinstance(value, Schedule):
        return value
    progress = step / max(total_steps - 1, 1)
    return value.start + (value.end - value.start) * value.fraction(progress)


class StudentConfig(BaseModel):
    """The student's architecture (a published variant and/or explicit fields) and where its weights start."""

    model_config = ConfigDict(extra="forbid")
    variant: str | None = None  # e.g. gemma3-270m: the base the architecture fields override
    architecture: dict[str, Any] = {}  # Gemma3Config fields; vocab_size defaults to the teacher's
    init: Literal["teacher", "random"] = "teacher"  # teacher: copy mapped teacher blocks, embeddings, norms
    # how teacher blocks wider than the student's are copied: importance keeps each block's FFN units measured to
    # matter most on the layer_map sample (gemstill.distill.width); truncate keeps leading slices of every width
    projection: Literal["none", "truncate", "importance"] = "none"
    # pattern: the student's own local/global pattern; teacher: each copied block keeps its teacher block's type
    # (and so its window and RoPE base), the rest follow the pattern
    layer_types: Literal["pattern", "teacher"] = "pattern"
    seed: int = 0

    def gemma_config(self, teacher: Gemma3Config) -> Gemma3Config:
        """The student's config; unset fields come from the variant, else from the teacher."""
        from gemstill.config import variant

        base = variant(self.variant) if self.variant else teacher
        fields = {**base.to_dict(), "vocab_size": teacher.vocab_size, **self.architecture}
        if fields["num_layers"] != base.num_layers and "layer_types" not in self.architecture:
            fields["layer_types"] = None  # the base's per-layer list does not fit another depth
        try:
            return Gemma3Config.from_dict(fields)
        except TypeError as err:
            raise GemstillError(f"student.architecture: {err}") from None


class HiddenLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(0.0, ge=0)
    kind: Literal["mse", "cosine"] = "cosine"


class AttentionLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(0.0, ge=0)


class DistillConfig(BaseModel):
    """The distillation objective: alpha * T^2 * divergence + (1 - alpha) * CE, plus intermediate-layer terms."""

    model_config = ConfigDict(extra="forbid")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    tail: Literal["bucket", "renormalize"] = "bucket"
    alpha: float | Schedule = 0.5  # weight of the distillation term; 0 is the cross-entropy baseline
    beta: float | Schedule = 0.5  # generalized JSD only, strictly between 0 and 1
    temperature: float | Schedule = 1.0
    hidden: HiddenLossConfig = HiddenLossConfig()
    attention: AttentionLossConfig = AttentionLossConfig()
    # run the teacher inside the training step (needed by the hidden and attention terms)
    online_teacher: bool = False

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        for name in ("alpha", "beta", "temperature"):
            value = getattr(self, name)
            ends = (value.start, value.end) if isinstance(value, Schedule) else (value,)
            if name == "alpha" and not all(0.0 <= v <= 1.0 for v in ends):
                raise ValueError("distill.alpha must lie in [0, 1]")
            if name == "beta" and not all(0.0 < v < 1.0 for v in ends):
                raise ValueError("distill.beta must lie strictly between 0 and 1")
            if name == "temperature" and not all(v > 0 and math.isfinite(v) for v in ends):
                raise ValueError("distill.temperature must be positive")
        if (self.hidden.weight > 0 or self.attention.weight > 0) and not self.online_teacher:
            raise ValueError(
                "distill.hidden/attention losses need teacher activations: set distill.online_teacher: true"
            )
        return self


class OptimizerConfig(BaseModel):
    """AdamW (decoupled weight decay) or Adafactor (factored second moments), warmup then cosine decay."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["adamw", "adafactor"] = "adamw"
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    final_lr_fraction: float = Field(0.0, ge=0, le=1)  # cosine decays to this fraction of the peak
    clip_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    # adafactor
    decay_rate: float = Field(0.8, gt=0, le=1)
    eps_factored: float = Field(1e-30, gt=0)
    multiply_by_parameter_scale: bool = True  # relative step sizes, parameter RMS floored at 1e-3 (optax's eps2)
    clipping_threshold: float = Field(1.0, gt=0)


class TrainingConfig(BaseModel):
    """Steps, batch, optimizer and the memory/speed knobs of one training run."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)  # sequences per optimizer step, over all micro-batches
    grad_accum: int = Field(1, ge=1)  # micro-batches per step (batch_size must divide evenly)
    optimizer: OptimizerConfig = OptimizerConfig()
    # parameters held fixed: exact names or dotted prefixes (e.g. "embedding" keeps the teacher's tied embedding
    # and LM head; its gradient is then never computed and it has no optimizer state)
    freeze: list[str] = []
    layer_drop: float = Field(0.0, ge=0, lt=1)  # progressive layer dropout: drop rate of the last layer
    remat: Literal["block", "dots", "dots_no_batch"] | None = None
    loss_chunk: int = Field(1024, ge=8)  # tokens per LM-head tile in the chunked loss
    # attention and the fused LM-head loss: auto = Pallas kernels on TPU, XLA elsewhere; interpret runs the kernels
    # in Pallas' interpreter (any backend, slow: for checks)
    kernels: Literal["auto", "xla", "pallas", "interpret", "interpret_tpu"] = "auto"
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1)
    log_every: int = Field(10, ge=1)  # also how often metrics leave the device (and NaN is checked)
    prefetch: int = Field(2, ge=0, le=16)  # steps of input read and placed ahead by a thread; 0: synchronous

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"training.batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        return self


PRETRAIN_SECTION = "teacher.scratch.training"
_MOVED = ("learning_rate", "warmup_steps", "weight_decay", "clip_norm")  # top-level keys of the old section


class PretrainConfig(TrainingConfig):
    """The `training` section (every knob of it) with pretraining's defaults: a larger batch and learning rate,
    and validation at every checkpoint so the model kept is the best-validated one."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-3, warmup_steps=20)
    checkpoint_every: int = Field(100, ge=1)
    eval_every: int = Field(100, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        moved = [key for key in _MOVED if isinstance(data, dict) and key in data]
        if moved:
            raise ValueError(
                f"{PRETRAIN_SECTION}.{moved[0]} is now {PRETRAIN_SECTION}.optimizer.{moved[0]} (the section has "
                "the training section's schema); move it under optimizer"
            )
        return data


QuantFormat = Literal["int8", "q8_0", "q4_0"]


class QuantizeConfig(BaseModel):
    """Post-training quantization (round to nearest) into each format, and which tensors every quantized variant
    (PTQ or QAT) covers: every linear layer, plus the tied embedding / LM head when `embedding`."""

    model_config = ConfigDict(extra="forbid")
    formats: list[QuantFormat] = ["q8_0", "q4_0"]
    embedding: bool = True


class QATConfig(BaseModel):
    """Quantization-aware distillation: continue the trained student with its weights fake-quantized in each
    format, on the same distillation loss and training loop as train_student (these fields override `training`)."""

    model_config = ConfigDict(extra="forbid")
    formats: list[QuantFormat] = ["q4_0"]
    steps: int = Field(50, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    checkpoint_every: int | None = Field(None, ge=1)  # default: the training section's
    eval_every: int | None = Field(None, ge=1)

    def training_config(self, base: TrainingConfig) -> TrainingConfig:
        optimizer = base.optimizer.model_copy(
            update={"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}
        )
        update: dict[str, Any] = {"steps": self.steps, "optimizer": optimizer}
        for name in ("checkpoint_every", "eval_every"):
            update[name] = getattr(self, name) or min(getattr(base, name), self.steps)
        return base.model_copy(update=update)
