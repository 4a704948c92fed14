"""Run profiles: the parameters of one concrete run (teacher, data, stage settings, hardware, precision, store)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gemstill.config import Gemma3Config
from gemstill.data.config import DataConfig, TokenizerTrainingConfig
from gemstill.distill.config import (
    DistillConfig,
    PretrainConfig,
    QATConfig,
    QuantizeConfig,
    StudentConfig,
    TrainingConfig,
)
from gemstill.distill.layer_map import LayerMapConfig
from gemstill.errors import GemstillError
from gemstill.export import ExportTarget, default_exports
from gemstill.pipeline.yamlio import read_yaml, validate
from gemstill.reasoning.config import ReasoningConfig, TeacherGenerateConfig
from gemstill.shipped import resolve_yaml
from gemstill.teacher_cache.config import TeacherCacheConfig


class ScratchTeacher(BaseModel):
    """A teacher trained here from nothing: its architecture, tokenizer and pretraining."""

    model_config = ConfigDict(extra="forbid")
    architecture: dict[str, Any]
    tokenizer: TokenizerTrainingConfig = TokenizerTrainingConfig()
    training: PretrainConfig = PretrainConfig()

    @model_validator(mode="after")
    def _architecture_is_valid(self) -> ScratchTeacher:
        self.gemma_config()  # raises on unknown keys or bad values
        return self

    def gemma_config(self) -> Gemma3Config:
        arch = dict(self.architecture)
        arch.setdefault("vocab_size", self.tokenizer.vocab_size)
        try:
            return Gemma3Config.from_dict(arch)
        except TypeError as err:
            raise ValueError(f"architecture: {err}") from None
        except GemstillError as err:
            raise ValueError(str(err)) from None


class TeacherConfig(BaseModel):
    """Exactly one of: `model` (a checkpoint spec such as gemma3-270m or gguf:PATH), or `scratch`."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    scratch: ScratchTeacher | None = None
    # the published size of `model` (e.g. gemma3-4b): memory estimates where the checkpoint is not reachable
    variant: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.model is None) == (self.scratch is None):
            raise ValueError("give exactly one of teacher.model (a checkpoint spec) or teacher.scratch")
        from gemstill.config import variant
        from gemstill.loading import parse_spec

        try:
            if self.model is not None:
                parse_spec(self.model)
            if self.variant is not None:
                variant(self.variant)
        except GemstillError as err:
            raise ValueError(str(err)) from None
        return self


class Mesh(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: int = Field(1, ge=1)
    fsdp: int = Field(1, ge=1)
    tensor: int = Field(1, ge=1)

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid")
    platform: Literal["cpu", "gpu", "tpu"] = "cpu"
    mesh: Mesh = Mesh()
    memory_per_device_gib: float | None = Field(None, gt=0)  # checked against the per-stage estimates
    # stages whose inputs are done run side by side, up to this many at once (each holds its own model in memory)
    concurrent_stages: int = Field(1, ge=1, le=16)


class Precision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: Literal["float32", "bfloat16"] = "float32"
    compute: Literal["float32", "bfloat16"] = "float32"


class EvaluateConfig(BaseModel):
    """Which sequences the evaluate stage scores (the held-out validation split by default)."""

    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "validation"] = "validation"
    max_sequences: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    # a corpus no model trained on (any data source), tokenized with the teacher's tokenizer and scored for the
    # teacher, student and baseline beside the split: does distillation pay off outside the training domain?
    out_of_domain: DataConfig | None = None


class NightlyConfig(BaseModel):
    """The nightly evaluation flow: its suites, and how far a metric may worsen from the previous night (in its
    own units, absolute) before the flow run fails naming it."""

    model_config = ConfigDict(extra="forbid")
    suites: list[Literal["heldout", "reasoning"]] = Field(default_factory=lambda: ["heldout", "reasoning"])
    max_regression: dict[str, float] = Field(
        default_factory=lambda: {"val_nll": 0.05, "kl_to_teacher": 0.05, "accuracy": 0.05}
    )


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    pipeline: str  # a file name in pipelines/ (without .yaml) or a path
    store: str = "runs/store"  # local directory (relative to the working directory) or an fsspec URL
    teacher: TeacherConfig
    data: DataConfig = DataConfig()
    teacher_cache: TeacherCacheConfig = TeacherCacheConfig()
    student: StudentConfig = StudentConfig()
    layer_map: LayerMapConfig = LayerMapConfig()
    distill: DistillConfig = DistillConfig()
    training: TrainingConfig = TrainingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    reasoning: ReasoningConfig = ReasoningConfig()
    teacher_generate: TeacherGenerateConfig = TeacherGenerateConfig()
    nightly: NightlyConfig = NightlyConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    qat: QATConfig = QATConfig()
    export: list[ExportTarget] = Field(default_factory=default_exports)
    hardware: Hardware = Hardware()
    precision: Precision = Precision()

    def pipeline_path(self) -> Path:
        return resolve_yaml("pipelines", self.pipeline)


def resolve_profile_path(name_or_path: str) -> Path:
    """A profile by name (see gemstill.shipped for where it is looked up) or a path to a YAML file."""
    return resolve_yaml("profiles", name_or_path)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """Set dotted keys (e.g. {"teacher_cache.k": 32}); values given as strings are parsed as YAML scalars."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise GemstillError(f"{path}: override '{dotted}': '{part}' is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError as err:
            reason = " ".join(str(getattr(err, "problem", None) or err).split())
            raise GemstillError(
                f"override '{dotted}': {value!r} is not a YAML value ({reason}); quote it or fix its brackets"
            ) from None
    return data


def load_profile(name_or_path: str, overrides: dict[str, Any] | None = None) -> tuple[Profile, Path]:
    path = resolve_profile_path(name_or_path)
    data = apply_overrides(read_yaml(path), overrides or {}, path)
    return validate(Profile, data, path), path
