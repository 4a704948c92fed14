"""Settings of the teacher logit cache stage (the profile's `teacher_cache` section)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TeacherCacheConfig(BaseModel):
    """What is kept per token (k ids and their log-probs), how it is stored, and how the work is cut up."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(64, ge=1, le=4096)
    mode: Literal["topk", "sampled"] = "topk"  # sampled: k distinct ids drawn by teacher probability (Gumbel-top-k)
    temperature: float = Field(1.0, gt=0)  # the teacher distribution is softmax(logits / temperature)
    values: Literal["float16", "bfloat16"] = "float16"  # storage dtype of the kept log-probs
    sequences_per_shard: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0  # sampled mode: ids of sequence i depend on (seed, i) only
    splits: list[Literal["train", "validation"]] = ["train", "validation"]
