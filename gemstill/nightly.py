"""The nightly evaluation: which committed models to score, the suites that score them, the cached teacher, and
the night recorded in the store's history (gemstill.nightly_history).

The models are the latest committed train_student (by its manifest's finished_at, any key) and what belongs to
it: the data and teacher it was trained with (its manifest's inputs), the latest baseline trained on the same
data and teacher, and the quantized variants made from that very student. So a night never scores a student
with another run's tokenizer or data, and a newer, worse student shows up as a regression.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemstill.errors import GemstillError
from gemstill.fsutil import atomic_write_bytes
from gemstill.nightly_history import (
    Change,
    RegressionError,
    append_night,
    check_thresholds,
    compare,
    comparison_markdown,
    read_history,
    regression_message,
    save_trend,
    utc,
)
from gemstill.pipeline.plan import Plan
from gemstill.pipeline.profile import Profile
from gemstill.pipeline.store import ArtifactStore

HISTORY_FILE = "history.duckdb"
TREND_FILE = "trend.png"
REPORT_FILE = "latest.md"
HELDOUT_METRICS = ("val_nll", "val_ppl", "kl_to_teacher")
Log = Callable[[str], None]


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
    models += _variants(store, [_latest(store, names.get(task), from_student) for task in ("quantize", "qat")])
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


def _row(model: NightModel, suite: str, metric: str, value: float) -> dict[str, Any]:
    return {"model": model.name, "model_key": model.key, "suite": suite, "metric": metric, "value": float(value)}


def heldout_rows(night: Night, profile: Profile, workdir: Path, log: Log = print) -> list[dict[str, Any]]:
    """NLL, perplexity and exact KL to the teacher on the held-out split, with the evaluate stage's code.

    The teacher is scored every night: its logits are what every student's KL is measured against."""
    from gemstill.distill.evaluate import Candidate, evaluate_models
    from gemstill.loading import load_checkpoint, load_model
    from gemstill.params import to_flat

    settings, precision = profile.evaluate, profile.precision
    teacher = load_model(night.teacher.spec, param_dtype=precision.params, dtype=precision.compute)
    candidates = []
    for model in night.students:  # quantized variants dequantized once, as llama.cpp computes them
        config, params, _ = load_checkpoint(model.spec)
        candidates.append(Candidate(model.name, config, params))
    results = evaluate_models(
        Candidate("teacher", teacher.config, to_flat(teacher.model)),
        candidates,
        night.data_dir,
        split=settings.split,
        batch_size=settings.batch_size,
        max_sequences=settings.max_sequences,
        progress=log,
    )
    return [
        _row(model, "heldout", metric, result[metric])
        for model, result in zip(night.models, results, strict=True)
        for metric in HELDOUT_METRICS
        if not (model is night.teacher and metric == "kl_to_teacher")  # 0 by definition
    ]


def reasoning_settings_hash(night: Night, profile: Profile) -> str:
    """What the teacher's reasoning scores depend on besides the teacher: settings, problems, code."""
    from gemstill.pipeline.code_version import code_version
    from gemstill.pipeline.stages import BUILTIN, DERIVED

    payload = {
        "reasoning": profile.reasoning.model_dump(mode="json"),
        "problem_files": DERIVED["_problem_files"](profile),
        "data": night.data_key,
        "code": code_version((BUILTIN["evaluate_reasoning"].code_root,)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def reasoning_rows(night: Night, profile: Profile, workdir: Path, log: Log = print) -> list[dict[str, Any]]:
    """Accuracy and tokens per problem of every configured method on every kind, as the evaluate_reasoning stage
    scores them; the teacher's rows come from its cache file while teacher, settings, problems and code are
    unchanged (sampling is seeded, so a rerun would only repeat them)."""
    from gemstill.pipeline.context import StageContext
    from gemstill.pipeline.reasoning_stages import stage_problems
    from gemstill.reasoning.suite import load_text_model, score_model
    from gemstill.tokenizer import Tokenizer

    settings = profile.reasoning
    tokenizer = Tokenizer.from_file(night.data_dir / "tokenizer.model")  # the variant GGUFs carry none
    context = StageContext(
        stage="nightly", profile=profile, settings={}, inputs={"prepare_data": night.data_dir}, workdir=workdir, log=log
    )
    problems = stage_problems(context)

    def score(model: NightModel) -> list[dict[str, Any]]:
        text_model = load_text_model(model.name, model.spec, tokenizer, settings.batch_size)
        rows = []
        for row, _ in score_model(text_model, problems, settings, log=log):
            case = f"{row['method']}/{row['kind']}"
            rows += [_row(model, "reasoning", f"{m}/{case}", row[m]) for m in ("accuracy", "tokens_per_problem")]
        return rows

    cache = workdir / f"teacher-{night.teacher.key}-{reasoning_settings_hash(night, profile)}.json"
    if cache.is_file():
        log(f"nightly: the teacher's reasoning scores are unchanged, reused from {cache}")
        rows = json.loads(cache.read_text())["rows"]
    else:
        rows = score(night.teacher)
        atomic_write_bytes(cache, json.dumps({"teacher": night.teacher.spec, "rows": rows}, indent=1).encode())
    for model in night.students:
        rows += score(model)
    return rows


SUITES: dict[str, Callable[[Night, Profile, Path, Log], list[dict[str, Any]]]] = {
    "heldout": heldout_rows,
    "reasoning": reasoning_rows,
}


@dataclasses.dataclass(frozen=True)
class NightRecord:
    """A night as written to the history, compared with the night before it."""

    run_time: str
    previous_time: str | None
    changes: list[Change]
    trend: Path
    report: Path
    markdown: str

    @property
    def regressed(self) -> list[Change]:
        return [c for c in self.changes if c.regressed]

    def raise_for_regressions(self) -> None:
        """Fail (after the night is recorded) naming every metric that worsened past its threshold."""
        if self.regressed:
            raise RegressionError(regression_message(self.regressed))


def record_night(directory: Path, profile: Profile, run_time: dt.datetime, rows: list[dict[str, Any]]) -> NightRecord:
    """Append the night to the history, then compare it with the previous night and draw the trend."""
    history_path = directory / HISTORY_FILE
    append_night(history_path, run_time, rows)
    history = read_history(history_path)
    previous_time, changes = compare(history, run_time, profile.nightly.max_regression)
    trend = save_trend(directory / TREND_FILE, history)
    tonight = utc(run_time).isoformat()
    title = f"gemstill nightly evaluation: {profile.name}"
    markdown = comparison_markdown(title, tonight, previous_time, changes, trend)
    report = atomic_write_bytes(directory / REPORT_FILE, markdown.encode())
    return NightRecord(tonight, previous_time, changes, trend, report, markdown)
