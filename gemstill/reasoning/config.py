"""The `reasoning` section of a profile: which methods score which problems, and how hard each searches."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["cot", "sc", "tot"]
PromptStyle = Literal["chat", "few-shot"]


class SelfConsistencyConfig(BaseModel):
    """k sampled chains per problem, majority vote over their final answers (Wang et al. 2023)."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(5, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_k: int | None = Field(None, ge=1)


class ToTConfig(BaseModel):
    """Breadth-first tree-of-thought search on Game of 24 (Yao et al. 2023): propose, value, keep the best b."""

    model_config = ConfigDict(extra="forbid")
    breadths: list[int] = Field(default_factory=lambda: [1, 5], min_length=1)
    depth: int = Field(3, ge=1, le=3)
    value: Literal["sample", "loglik"] = Field(
        "sample", description="sample: n value words at value_temperature; loglik: the value words' likelihoods"
    )
    value_samples: int = Field(3, ge=1)
    value_temperature: float = Field(0.7, gt=0)
    propose_tokens: int = Field(160, ge=8, description="tokens of one propose call (all its steps)")


class ReasoningConfig(BaseModel):
    """What the evaluate_reasoning stage, the nightly flow and `gemstill eval reasoning` run."""

    model_config = ConfigDict(extra="forbid")
    methods: list[Method] = Field(default_factory=lambda: ["cot", "sc", "tot"], min_length=1)
    prompt: PromptStyle = "chat"
    shots: int = Field(2, ge=0, le=8, description="worked examples before each question (prompt: few-shot)")
    problems: list[str] = Field(
        default_factory=list,
        description="problem files (GSM8K or Game-of-24 jsonl) scored besides the prepared held-out problems",
    )
    models: list[str] | None = Field(
        None,
        min_length=1,
        description="the evaluate_reasoning stage's models by row name (teacher, student, baseline, "
        "student-q4_0-qat, ...); None: every model among the stage's inputs",
    )
    limit: int | None = Field(64, ge=1, description="problems per kind at most (the first ones, in file order)")
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(64, ge=1, description="prompts per generate call")
    sc: SelfConsistencyConfig = SelfConsistencyConfig()
    tot: ToTConfig = ToTConfig()
    seed: int = 0


class TeacherGenerateConfig(BaseModel):
    """Chain-of-thought distillation data: the teacher samples solutions for the training prompts and the ones
    a verifier accepts become the student's training split (the teacher_generate stage)."""

    model_config = ConfigDict(extra="forbid")
    prompts: Literal["all", "verifiable"] = Field(
        "all",
        description="all: every [user, model] training chat; verifiable: only those whose answer code checks "
        "(the others keep their reference answers)",
    )
    samples: int = Field(4, ge=1, description="solutions sampled per prompt")
    temperature: float = Field(0.7, ge=0, description="0 is greedy (then samples above 1 repeat one solution)")
    top_k: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(128, ge=1, description="tokens per solution; a longer one is cut and rejected")
    batch_size: int = Field(64, ge=1, description="prompts per generate call")
    keep: Literal["verified", "all"] = Field(
        "verified",
        description="verified: where code checks the answer keep only accepted solutions (rejection sampling); "
        "all: keep every solution. A prompt without a verifier keeps every solution either way",
    )
    per_prompt: int = Field(1, ge=1, description="distinct kept solutions per prompt at most")
    unsolved: Literal["drop", "reference"] = Field(
        "drop", description="a verified prompt with no accepted solution: drop it, or keep its reference solution"
    )
    max_prompts: int | None = Field(None, ge=1, description="the first N prompts only (the rest keep references)")
    seed: int = 0
