"""The built-in stage tasks: what each runs, which profile sections its cache key hashes, its memory.

A task's code version is the import closure of its stage function (gemstill.pipeline.code_version).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemstill.data.config import DataConfig
from gemstill.errors import GemstillError
from gemstill.pipeline import evaluate_stage, quant_stages, reasoning_stages, student_stages, teacher_stages
from gemstill.pipeline.context import StageContext
from gemstill.pipeline.profile import Profile
from gemstill.pipeline.teacher import teacher_identity
from gemstill.pipeline.trust import check_task_module

StageFn = Callable[[StageContext], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class StageTask:
    """A stage function and what it may read of the profile. `reads` are the settings its cache key hashes (dotted
    paths, and the derived values in DERIVED); `uses` are settings that choose how it runs, not what it computes
    (the device mesh of a stage whose result does not depend on it), readable but not hashed. The stage function,
    its memory estimate and its validation see the profile through a view of exactly these
    (gemstill.pipeline.context.ProfileView): reading anything else raises, naming the setting."""

    fn: StageFn  # its module roots the code version's import graph
    reads: tuple[str, ...]
    memory: Callable[[Any], dict[str, int]] = lambda profile: {}
    validate: Callable[[Any], None] = lambda profile: None  # checks run when the plan is made, before compute
    # in a multi-process run: every process runs it (the work is split over them), else process 0 alone
    collective: bool = False
    uses: tuple[str, ...] = ()

    @property
    def code_root(self) -> str:
        """Where the code version's import graph starts: "module:function" of the stage function."""
        return f"{self.fn.__module__}:{self.fn.__name__}"

    @property
    def visible(self) -> tuple[str, ...]:
        """Every setting the stage may read: its key's and the ones that only choose where it runs."""
        return self.reads + self.uses


_TEACHER = ("teacher", "precision", "_teacher_identity")  # the teacher's config at the profile's precision
BUILTIN: dict[str, StageTask] = {
    "prepare_data": StageTask(
        fn=teacher_stages.prepare_data_stage,
        reads=("data", "teacher.model", "teacher.scratch.tokenizer", "_teacher_identity", "_data_identity"),
    ),
    "pretrain_teacher": StageTask(
        fn=teacher_stages.pretrain_teacher_stage,
        collective=True,
        reads=("teacher.scratch", "precision", "data.seq_len"),
        uses=("hardware.mesh",),  # data-parallel pretraining: the same model within float32 summation order
        memory=teacher_stages.pretrain_memory,
    ),
    "teacher_cache": StageTask(
        fn=teacher_stages.teacher_cache_stage,
        collective=True,
        reads=("teacher", "teacher_cache", "precision", "data.seq_len", "_teacher_identity"),
        memory=teacher_stages.teacher_cache_memory,
    ),
}

_STUDENT_READS = (*_TEACHER, "student", "layer_map", "training", "hardware.mesh", "data.seq_len")
BUILTIN.update(
    {
        "layer_map": StageTask(
            fn=student_stages.layer_map_stage,
            collective=True,
            reads=(*_TEACHER, "student", "layer_map"),
            validate=student_stages.validate_student,
        ),
        "train_student": StageTask(
            fn=student_stages.train_student_stage,
            collective=True,
            reads=(*_STUDENT_READS, "distill", "teacher_cache.temperature"),
            memory=student_stages.train_student_memory,
            validate=student_stages.validate_student,
        ),
        "train_baseline": StageTask(
            fn=student_stages.train_baseline_stage,
            collective=True,
            reads=_STUDENT_READS,
            memory=student_stages.train_baseline_memory,
            validate=student_stages.validate_student,
        ),
        "evaluate": StageTask(
            fn=evaluate_stage.evaluate_stage,
            collective=True,
            reads=(*_TEACHER, "evaluate", "quantize", "qat.formats", "_out_of_domain_identity"),
        ),
        "evaluate_reasoning": StageTask(
            fn=reasoning_stages.evaluate_reasoning_stage,
            reads=(*_TEACHER, "reasoning", "quantize", "qat.formats", "_problem_files"),
        ),
        "teacher_generate": StageTask(
            fn=reasoning_stages.teacher_generate_stage,
            reads=(*_TEACHER, "data", "teacher_generate", "_data_identity"),
        ),
        "quantize": StageTask(
            fn=quant_stages.quantize_stage,
            reads=(*_TEACHER, "student", "quantize"),  # the student's config: refused before any work
            validate=quant_stages.validate_ptq,
        ),
        "qat": StageTask(
            fn=quant_stages.qat_stage,
            collective=True,
            reads=(
                *_TEACHER,
                "student",
                "training",
                "hardware.mesh",
                "data.seq_len",
                "quantize.embedding",
                "qat",
                "distill",
                "teacher_cache.temperature",
            ),
            memory=student_stages.train_baseline_memory,  # the student's training step, no online teacher
            validate=quant_stages.validate_qat,
        ),
        "export": StageTask(
            fn=quant_stages.export_stage,
            reads=(*_TEACHER, "name", "export", "quantize.embedding", "qat.formats"),
        ),
    }
)


# derived values a key may hash besides profile sections
def _data_identity(profile: Profile) -> Any:
    return corpus_identity(profile.data)


def _out_of_domain_identity(profile: Profile) -> Any:
    corpus = profile.evaluate.out_of_domain
    return corpus_identity(corpus) if corpus is not None else None


MISSING_FILES = "data files not found"  # the identity of a corpus whose files are not on this machine


def corpus_identity(data: DataConfig) -> Any:
    """What a corpus is besides its settings: the data files' contents in the order they are read (with their
    extension, which picks the reader), never their paths; the Python version for the stdlib docstring corpus."""
    import platform

    from gemstill.data.sources import resolve_paths
    from gemstill.fingerprint import cached_file_sha256
    from gemstill.loading import cache_root

    if data.source == "python-docs":
        return platform.python_version()
    if data.source == "files" and data.files is not None:
        try:
            files = [Path(f) for f in resolve_paths(data.files.paths)]
        except GemstillError as missing:  # not on this machine: a plan to inspect still forms, one to run does not
            return {MISSING_FILES: str(missing)}
        return [[f.suffix.lower(), cached_file_sha256(f, cache_root())] for f in files]
    return None


def hashed_profile(profile: Profile) -> dict[str, Any]:
    """The profile as cache keys see it: the teacher checkpoint's and the data files' paths give way to their
    contents (in _teacher_identity and _data_identity), so the same files in another directory or on another
    machine give the same keys; plus every derived value."""
    from gemstill.loading import parse_spec

    dumped = profile.model_dump(mode="json")
    if dumped["data"].get("files"):
        dumped["data"]["files"]["paths"] = "by content: _data_identity"
    if (dumped["evaluate"].get("out_of_domain") or {}).get("files"):
        dumped["evaluate"]["out_of_domain"]["files"]["paths"] = "by content: _out_of_domain_identity"
    model = profile.teacher.model
    if model and (scheme := parse_spec(model)[0]) != "alias":
        dumped["teacher"]["model"] = f"{scheme}:by content: _teacher_identity"
    for name, derive in DERIVED.items():
        dumped[name] = derive(profile)
    return dumped


def _problem_files(profile: Profile) -> Any:
    """The content of the reasoning problem files: editing one re-runs the reasoning evaluation."""
    from gemstill.fingerprint import cached_file_sha256
    from gemstill.loading import cache_root
    from gemstill.shipped import resolve_problem_file

    files = {path: resolve_problem_file(path) for path in profile.reasoning.problems}
    return {path: cached_file_sha256(file, cache_root()) if file.is_file() else None for path, file in files.items()}


DERIVED: dict[str, Callable[[Profile], Any]] = {
    "_teacher_identity": teacher_identity,
    "_data_identity": _data_identity,
    "_out_of_domain_identity": _out_of_domain_identity,
    "_problem_files": _problem_files,
}


def resolve_task(name: str, extra_reads: list[str], restricted: bool = False) -> StageTask:
    """A built-in task by name, or a custom stage function given as "package.module:function" (in a restricted,
    deployment run, only from a module the worker allows)."""
    if name in BUILTIN:
        base = BUILTIN[name]
        return dataclasses.replace(base, reads=base.reads + tuple(extra_reads))
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise GemstillError(f"unknown task '{name}'; use one of {sorted(BUILTIN)} or 'package.module:function'")
    if restricted:
        check_task_module(name)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise GemstillError(f"task '{name}' cannot be imported ({err}); check the module path") from None
    return StageTask(fn=fn, reads=tuple(extra_reads))
