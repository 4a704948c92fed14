"""Declarative pipelines: a DAG of stages, the task each runs, what it needs, retries, timeout, caching."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gemstill.errors import GemstillError
from gemstill.pipeline.yamlio import read_yaml, validate


class Retries(BaseModel):
    """Retry a failed stage `count` times, waiting backoff_seconds * 2**attempt, randomized by +-jitter."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(0, ge=0, le=20)
    backoff_seconds: float = Field(1.0, ge=0)
    jitter: float = Field(0.0, ge=0, le=1)


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str  # a built-in task name, or "package.module:function" for a custom stage
    needs: list[str] = []
    reads: list[str] = []  # extra profile sections the stage's key hashes (custom stages declare theirs here)
    retries: Retries = Retries()
    timeout_seconds: float | None = Field(None, gt=0)
    cache: Literal["content", "never"] = "content"  # never: recompute on every run
    # where the stage runs when the flow runs from a deployment: the deployment `gemstill-stage/<work_pool>`
    # (flows/stage.py) started through run_deployment with these job variables; infrastructure, so not in the key
    work_pool: str | None = Field(None, min_length=1)
    job_variables: dict[str, Any] = {}

    @model_validator(mode="after")
    def _job_variables_need_a_pool(self) -> StageSpec:
        if self.job_variables and self.work_pool is None:
            raise ValueError("job_variables configure a work pool's jobs: set work_pool too")
        return self


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    stages: dict[str, StageSpec]

    def order(self) -> list[str]:
        """Stages in dependency order (ties broken by file order)."""
        done: list[str] = []
        remaining = list(self.stages)
        while remaining:
            ready = [s for s in remaining if all(n in done for n in self.stages[s].needs)]
            done.append(ready[0])
            remaining.remove(ready[0])
        return done

    def downstream(self, stage: str) -> set[str]:
        """The stage and everything that depends on it, directly or not."""
        found = {stage}
        changed = True
        while changed:
            changed = False
            for name, spec in self.stages.items():
                if name not in found and found.intersection(spec.needs):
                    found.add(name)
                    changed = True
        return found

    def upstream(self, stage: str) -> list[str]:
        return self.stages[stage].needs


def _check_graph(spec: PipelineSpec, path: Path | str) -> None:
    if not spec.stages:
        raise GemstillError(f"{path}: 'stages' is empty; a pipeline needs at least one stage")
    for name, stage in spec.stages.items():
        for need in stage.needs:
            if need not in spec.stages:
                raise GemstillError(f"{path}: stages.{name}.needs names '{need}', which is not a stage in this file")
    visiting: set[str] = set()
    finished: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in finished:
            return
        if name in visiting:
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            raise GemstillError(f"{path}: stages form a cycle ({cycle}); remove one of those needs")
        visiting.add(name)
        for need in spec.stages[name].needs:
            visit(need, [*trail, name])
        visiting.discard(name)
        finished.add(name)

    for name in spec.stages:
        visit(name, [])


def load_pipeline(path: Path) -> PipelineSpec:
    spec = validate(PipelineSpec, read_yaml(path), path)
    _check_graph(spec, path)
    return spec
