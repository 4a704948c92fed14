"""The evaluate stage's report of a plan: the committed directory (report.json, report.md and its plots) and its
rows; what `gemstill report` prints and `gemstill run` shows after a pipeline with an evaluate stage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from gemstill.errors import GemstillError
from gemstill.pipeline.plan import Plan
from gemstill.pipeline.store import CorruptResult


@dataclasses.dataclass(frozen=True)
class Report:
    directory: Path  # holds report.json and report.md
    rows: list[dict[str, Any]]  # one per model: model, layers, parameters, val_nll, val_ppl, kl_to_teacher, ...


def report_dir(plan: Plan) -> Path | None:
    """The committed output of the pipeline's (last) evaluate stage, checked against its manifest, or None when
    it is not done."""
    names = [n for n, s in plan.stages.items() if s.spec.task == "evaluate"]
    if not names:
        raise GemstillError(f"pipeline {plan.pipeline.name} has no evaluate stage")
    key = plan.stages[names[-1]].key
    if plan.store.manifest(names[-1], key) is None:
        return None
    try:
        return plan.store.fetch(names[-1], key)
    except CorruptResult as corrupt:
        raise corrupt.naming(plan.profile.name) from None


def read_rows(directory: Path) -> list[dict[str, Any]]:
    """The rows of a committed evaluate stage's report.json."""
    path = Path(directory) / "report.json"
    try:
        return json.loads(path.read_text())["rows"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise GemstillError(
            f"{path} is not a report gemstill wrote ({type(err).__name__}); recompute evaluate"
        ) from None


def load_report(plan: Plan, profile: str | None = None) -> Report:
    """The plan's evaluate report; refuses one not evaluated with these settings. `profile` is the name the user
    gave (for the message; default: the profile's own name)."""
    directory = report_dir(plan)
    if directory is None:
        profile = profile or plan.profile.name
        raise GemstillError(
            f"profile {profile} has not been evaluated with these settings; run: gemstill run {profile}"
        )
    return Report(directory, read_rows(directory))


def report_rows(plan: Plan, profile: str | None = None) -> list[dict[str, Any]]:
    """The rows of the plan's evaluate report (load_report's rows)."""
    return load_report(plan, profile).rows
