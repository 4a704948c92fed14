"""Where a plan stands in its store: every stage's state, key, artifact path, metrics and memory estimate, and the
teacher cache's summary numbers; what `gemstill status` and `gemstill cache stats` print."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from gemstill.errors import GemstillError
from gemstill.pipeline.plan import Plan
from gemstill.pipeline.store import CorruptResult


def stage_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per stage, in dependency order: {stage, state, key, path, metrics (from the committed manifest, {}
    when not done), memory_bytes (the task's estimate, {} when it has none)}, and for a corrupt one `problem`.

    state: done, corrupt (committed, but a file does not match its manifest: named in `problem`, with the command
    that recomputes it), stale (done only with other settings) or missing. Reading changes nothing in the store."""
    rows = []
    for name, stage in plan.stages.items():
        manifest = plan.store.manifest(name, stage.key) or {}
        state = plan.state(name)
        row = {
            "stage": name,
            "state": state,
            "key": stage.key,
            "path": f"{plan.store.root.rstrip('/')}/{name}/{stage.key}",
            "metrics": manifest.get("metrics", {}),
            "memory_bytes": plan.memory(name),
        }
        if state == "done" and (problem := plan.store.verify(name, stage.key)) is not None:
            row["state"] = "corrupt"
            row["problem"] = f"{problem}; recompute it: gemstill run {plan.profile.name} --refresh {name}"
        rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class TeacherCacheStats:
    """The plan's teacher cache: its stage key, local directory and cache_stats rows (one per split)."""

    key: str
    directory: Path
    rows: list[dict[str, Any]]


def teacher_cache_dir(plan: Plan, profile: str | None = None) -> tuple[str, Path]:
    """(key, local directory) of the plan's first teacher_cache stage; refuses a pipeline without one or a cache
    not built yet. `profile` is the name the user gave (for the message; default: the profile's own name)."""
    names = [n for n, s in plan.stages.items() if s.spec.task == "teacher_cache"]
    if not names:
        raise GemstillError(f"pipeline {plan.pipeline.name} has no teacher_cache stage")
    key = plan.stages[names[0]].key
    directory = plan.store.local_dir(names[0], key)
    if plan.store.manifest(names[0], key) is not None:  # committed: served only if it matches its manifest
        try:
            directory = plan.store.fetch(names[0], key)
        except CorruptResult as corrupt:
            raise corrupt.naming(plan.profile.name) from None
    if not (directory / "catalog.duckdb").is_file():
        profile = profile or plan.profile.name
        raise GemstillError(f"the teacher cache of profile {profile} has not been built; run: gemstill run {profile}")
    return key, directory


def teacher_cache_stats(plan: Plan, profile: str | None = None) -> TeacherCacheStats:
    """DuckDB's summary of the plan's teacher cache per split (gemstill.teacher_cache.stats.cache_stats)."""
    from gemstill.teacher_cache.stats import cache_stats

    key, directory = teacher_cache_dir(plan, profile)
    return TeacherCacheStats(key, directory, cache_stats(directory))
