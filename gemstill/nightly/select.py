"""Which committed models a night scores, found in the store by their stage keys.

The models are the latest committed train_student (by its manifest's finished_at, any key) and what belongs to
it: the data and teacher it was trained with (its manifest's inputs), the latest baseline trained on the same
data and teacher, and the quantized variants made from that very student. So a night never scores a student
with another run's tokenizer or data, and a newer, worse student shows up as a regression.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemstill.errors import GemstillError
from gemstill.nightly.history import check_thresholds
from gemstill.pipeline.plan import Plan
from gemstill.pipeline.store import ArtifactStore, CorruptResult


def nightly_dir(store: ArtifactStore) -> Path:
    """`<store>/nightly`: the history, the trend plot and the teacher's cached scores (local stores only)."""
    if not store.is_local:
        raise GemstillError(
            f"store {store.root}: the nightly history is a local DuckDB file; run the nightly flow on a local --store"
        )
    return Path(store.base) / "nightly"


@dataclasses.dataclass(frozen=True)
class NightModel:
    name: str  # the row name: teacher, student, baseline, student-q4_0-qat, ...
    key: str  # the stage key that made it (a variant: key/format)
    spec: str


@dataclasses.dataclass(frozen=True)
class Night:
    """What one night scores: the teacher first, then the student-like models, on one prepared data set."""

    data_key: str
    data_dir: Path
    teacher: NightModel
    students: tuple[NightModel, ...]

    @property
    def models(self) -> tuple[NightModel, ...]:
        return (self.teacher, *self.students)


@dataclasses.dataclass(frozen=True)
class _Committed:
    stage: str
    key: str
    manifest: dict[str, Any]


def _latest(store: ArtifactStore, stage: str | None, where: Callable[[dict[str, Any]], bool] = lambda m: True):
    """The committed run of a stage with the newest finished_at among those `where` accepts, or None."""
    if stage is None:
        return None
    runs = [_Committed(stage, key, m) for key in store.keys(stage) if (m := store.manifest(stage, key)) and where(m)]
    return max(runs, key=lambda run: run.manifest.get("finished_at", 0), default=None)


def select_night(plan: Plan) -> Night:
    """The latest committed student and what belongs to it (see the module docstring)."""
    check_thresholds(plan.profile.nightly.max_regression)
    store, profile = plan.store, plan.profile
    nightly_dir(store)  # refuse a remote store before anything is loaded
    names: dict[str, str] = {}
    for name, spec in plan.pipeline.stages.items():
        names.setdefault(spec.task, name)
    student = _latest(store, names.get("train_student"))
    if student is None:
        raise GemstillError(
            f"no committed train_student in store {store.root}; run `gemstill run {profile.name}` first"
        )
    lineage = student.manifest.get("inputs", {})
    prepare = names.get("prepare_data")
    if prepare is None:
        raise GemstillError(
            f"pipeline {plan.pipeline.name} has no prepare_data stage; add it, the nightly scores its data"
        )
    data_key = lineage.get(prepare)
    if data_key is None or store.manifest(prepare, data_key) is None:
        raise GemstillError(
            f"train_student {student.key} in store {store.root}: its prepare_data run is gone; "
            f"run `gemstill run {profile.name}` again"
        )
    teacher = _teacher(plan, names, lineage)
    same_origin = {name: lineage.get(name) for name in (prepare, names.get("pretrain_teacher")) if name}

    def trained_alike(manifest: dict[str, Any]) -> bool:
        return all(manifest.get("inputs", {}).get(name) == key for name, key in same_origin.items())

    def from_student(manifest: dict[str, Any]) -> bool:
        return manifest.get("inputs", {}).get(student.stage) == student.key

    models = [NightModel("student", student.key, f"orbax:{store.local_dir(student.stage, student.key) / 'model'}")]
    baseline = _latest(store, names.get("train_baseline"), trained_alike)
    if baseline is not None:
        models.append(
            NightModel("baseline", baseline.key, f"orbax:{store.local_dir(baseline.stage, baseline.key) / 'model'}")
        )
    variant_runs = [_latest(store, names.get(task), from_student) for task in ("quantize", "qat")]
    models += _variants(store, variant_runs)
    chosen = [student, baseline, *variant_runs, _Committed(prepare, data_key, {})]
    if (teacher_stage := names.get("pretrain_teacher")) in lineage:
        chosen.append(_Committed(teacher_stage, lineage[teacher_stage], {}))
    for run in filter(None, chosen):  # a night scores only results that match their manifests
        if (problem := store.verify(run.stage, run.key)) is not None:
            raise CorruptResult(run.stage, run.key, problem, plan.profile.name)
    return Night(data_key, store.local_dir(prepare, data_key), teacher, tuple(models))


def _teacher(plan: Plan, names: dict[str, str], lineage: dict[str, str]) -> NightModel:
    """The student's own pretrain_teacher run, else the profile's checkpoint (keyed by what the spec points at)."""
    from gemstill.loading import spec_identity

    stage = names.get("pretrain_teacher")
    if stage is not None and stage in lineage:
        key = lineage[stage]
        if plan.store.manifest(stage, key) is None:
            raise GemstillError(
                f"store {plan.store.root}: the student's teacher ({stage} {key}) is gone; "
                f"run `gemstill run {plan.profile.name}` again"
            )
        return NightModel("teacher", key, f"orbax:{plan.store.local_dir(stage, key) / 'model'}")
    spec = plan.profile.teacher.model
    if spec is None:
        raise GemstillError(
            f"profile {plan.profile.name} trains its teacher, but the student has no pretrain_teacher input; "
            "add the pretrain_teacher stage to the student's needs"
        )
    identity = json.dumps(spec_identity(spec), sort_keys=True).encode()
    return NightModel("teacher", hashlib.sha256(identity).hexdigest()[:16], spec)


def _variants(store: ArtifactStore, runs: list[_Committed | None]) -> list[NightModel]:
    """The quantized variants of the quantize / qat runs, in the formats each run made (its recorded settings),
    named as the evaluate stage names them."""
    from gemstill.pipeline.quant_stages import variant_spec

    models = []
    for run, suffix in zip(runs, ("ptq", "qat"), strict=True):
        if run is None:
            continue
        section = run.manifest.get("settings", {}).get("quantize" if suffix == "ptq" else "qat") or {}
        for fmt in section.get("formats", []):
            spec = variant_spec(store.local_dir(run.stage, run.key) / fmt, fmt)
            models.append(NightModel(f"student-{fmt}-{suffix}", f"{run.key}/{fmt}", spec))
    return models
