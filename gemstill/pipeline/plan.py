"""A pipeline resolved against a profile: every stage's settings, content key, inputs and state.

A key hashes the stage name, its task, its resolved settings, the code version of what it runs (its import
closure and the numerics libraries) and the keys of its inputs, never a run id or a path, so keys are known
before anything runs and equal wherever the same work is asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import gemstill
from gemstill import distributed
from gemstill.errors import GemstillError
from gemstill.pipeline.code_version import code_version
from gemstill.pipeline.context import StageContext
from gemstill.pipeline.lease import acquire
from gemstill.pipeline.profile import Profile, load_profile
from gemstill.pipeline.spec import PipelineSpec, StageSpec, load_pipeline
from gemstill.pipeline.stages import StageTask, hashed_profile, resolve_task
from gemstill.pipeline.store import ArtifactStore
from gemstill.pipeline.trust import check_configured_file
from gemstill.shipped import resolve_yaml

State = Literal["done", "stale", "missing"]


@dataclasses.dataclass(frozen=True)
class PlannedStage:
    name: str
    spec: StageSpec
    task: StageTask
    settings: dict[str, Any]
    code_version: str
    inputs: dict[str, str]  # upstream stage name -> key
    key: str


@dataclasses.dataclass(frozen=True)
class Plan:
    profile: Profile
    profile_path: Path
    pipeline: PipelineSpec
    pipeline_path: Path
    store: ArtifactStore
    stages: dict[str, PlannedStage]  # in dependency order

    def state(self, name: str) -> State:
        stage = self.stages[name]
        if self.store.manifest(name, stage.key) is not None:
            return "done"
        return "stale" if self.store.keys(name) else "missing"


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def stage_key(name: str, task: str, settings: dict[str, Any], code: str, inputs: dict[str, str]) -> str:
    payload = {"stage": name, "task": task, "settings": settings, "code": code, "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_plan(
    profile_name: str,
    pipeline: str | None = None,
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
    restricted: bool = False,
) -> Plan:
    """The plan of a profile's pipeline; `restricted` (a deployment run) limits it to the files and task modules
    the machine is configured with (gemstill.pipeline.trust)."""
    profile, profile_path = load_profile(profile_name, overrides)
    pipeline_path = resolve_yaml("pipelines", pipeline) if pipeline else profile.pipeline_path()
    if restricted:
        check_configured_file("profiles", profile_path)
        check_configured_file("pipelines", pipeline_path)
    spec = load_pipeline(pipeline_path)
    dumped = hashed_profile(profile)
    planned: dict[str, PlannedStage] = {}
    validated: set[Any] = set()
    for name in spec.order():
        stage = spec.stages[name]
        task = resolve_task(stage.task, stage.reads, restricted)
        if task.validate not in validated:
            validated.add(task.validate)
            task.validate(profile)
        settings = {path: _lookup(dumped, path) for path in task.reads}
        code = code_version((task.code_root,))
        inputs = {need: planned[need].key for need in stage.needs}
        key = stage_key(name, stage.task, settings, code, inputs)
        planned[name] = PlannedStage(name, stage, task, settings, code, inputs, key)
    return Plan(profile, profile_path, spec, pipeline_path, ArtifactStore(store or profile.store), planned)


def check_hardware(profile: Profile) -> None:
    """Refuse to run a profile on a machine that lacks its platform or its mesh's device count."""
    import jax

    hardware = profile.hardware
    if jax.default_backend() != hardware.platform:
        raise GemstillError(
            f"profile {profile.name} needs a {hardware.platform.upper()} but this machine runs JAX on "
            f"{jax.default_backend()}; run it where that accelerator is, or set hardware.platform"
        )
    if hardware.mesh.devices > jax.device_count():
        raise GemstillError(
            f"profile {profile.name}'s mesh needs {hardware.mesh.devices} devices, this machine has "
            f"{jax.device_count()}; shrink hardware.mesh"
        )


def run_stage(
    plan: Plan,
    name: str,
    fresh: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable[[float], None] = lambda fraction: None,
) -> dict[str, Any]:
    """Run one stage whose inputs are done and commit its manifest; the caller decides whether it must run.

    The run holds the key's lease throughout (a second run of the same key waits for it, then finds it done);
    `fresh` (a refresh) recomputes beside the committed result and swaps on commit.
    """
    group = distributed.start(log)
    check_hardware(plan.profile)
    stage = plan.stages[name]
    if group is not None:
        return _run_stage_in_group(plan, name, fresh, log, progress)
    missing = [need for need in stage.spec.needs if plan.store.manifest(need, plan.stages[need].key) is None]
    if missing:
        raise GemstillError(
            f"stage {name} needs {', '.join(missing)}, not done with these settings; run the pipeline without --only"
        )
    with acquire(plan.store.fs, plan.store.lease_path(name, stage.key), f"stage {name} ({stage.key})", log=log):
        if not fresh and (done := plan.store.manifest(name, stage.key)) is not None:
            log(f"stage {name}: already committed ({stage.key}), by another run or an earlier attempt; using it")
            return done
        started = time.time()
        workdir = plan.store.prepare(name, stage.key, refresh=fresh)
        metrics = _compute(plan, name, fresh, workdir, log, progress)
        return _commit(plan, name, fresh, started, metrics)


def _inputs(plan: Plan, name: str) -> dict[str, Path]:
    stage = plan.stages[name]
    return {plan.pipeline.stages[need].task: plan.store.fetch(need, plan.stages[need].key) for need in stage.spec.needs}


def _compute(
    plan: Plan,
    name: str,
    fresh: bool,
    workdir: Path,
    log: Callable[[str], None],
    progress: Callable[[float], None],
) -> dict[str, Any]:
    """Run the stage function in its prepared work directory (partial work of a killed attempt is resumed)."""
    stage = plan.stages[name]
    context = StageContext(
        stage=name,
        profile=plan.profile,
        settings=stage.settings,
        inputs=_inputs(plan, name),
        workdir=workdir,
        log=log,
        input_keys=dict(stage.inputs),
        persist=lambda path: plan.store.persist(name, stage.key, fresh, path),
        progress=progress,
    )
    return stage.task.fn(context)


def _commit(plan: Plan, name: str, fresh: bool, started: float, metrics: dict[str, Any] | None = None):
    stage = plan.stages[name]
    finished = time.time()
    record = {
        "stage": name,
        "task": stage.spec.task,
        "key": stage.key,
        "settings": stage.settings,
        "code_version": stage.code_version,
        "inputs": stage.inputs,
        "metrics": metrics,
        "started_at": started,
        "finished_at": finished,
        "seconds": round(finished - started, 3),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "gemstill_version": gemstill.__version__,
    }
    return plan.store.commit(name, stage.key, record, refresh=fresh)


def _run_stage_in_group(
    plan: Plan, name: str, fresh: bool, log: Callable[[str], None], progress: Callable[[float], None]
) -> dict[str, Any]:
    """run_stage in one process of a multi-process run: every process agrees on the key, process 0 holds the
    lease, decides whether the stage runs and commits the manifest; a collective stage (teacher cache, training)
    runs in every process, any other in process 0 alone while the rest wait."""
    stage = plan.stages[name]
    if not plan.store.is_local:
        raise GemstillError(
            f"store {plan.store.root}: a multi-process run needs a store every process sees as a directory (Orbax "
            "writes each process's part of a checkpoint there); mount it (NFS, GCS FUSE) and pass the mount point"
        )
    distributed.agree(f"stage {name} key", stage.key, "every process must run the same code, profile, data and teacher")
    leader = distributed.is_leader()
    lease = None
    decision = "run"
    if leader:
        missing = [need for need in stage.spec.needs if plan.store.manifest(need, plan.stages[need].key) is None]
        lease = acquire(plan.store.fs, plan.store.lease_path(name, stage.key), f"stage {name} ({stage.key})", log=log)
        if missing:
            decision = "missing " + ", ".join(missing)
        elif not fresh and plan.store.manifest(name, stage.key) is not None:
            decision = "done"
    try:
        decision = distributed.share(f"stage {name} decision", decision)
        if decision.startswith("missing"):
            raise GemstillError(
                f"stage {name} needs {decision.removeprefix('missing ')}, not done with these settings; run the "
                "pipeline without --only"
            )
        if decision == "done":
            log(f"stage {name}: already committed ({stage.key}), by another run or an earlier attempt; using it")
        else:
            started = time.time()
            if leader:  # process 0 prepares the work directory (a refresh clears it) before anyone writes there
                plan.store.prepare(name, stage.key, refresh=fresh)
            distributed.barrier(f"stage {name} prepared")
            metrics = None
            try:
                if stage.task.collective:
                    workdir = plan.store.join(name, stage.key, refresh=fresh)
                    metrics = _compute(plan, name, fresh, workdir, log, progress)
                elif leader:
                    with distributed.alone():
                        metrics = _compute(plan, name, fresh, plan.store.join(name, stage.key, fresh), log, progress)
            except Exception as error:  # not retried here: a retry in one process alone would wait for the rest
                message = " ".join(str(error).split())[:300]
                raise GemstillError(
                    f"stage {name} failed in process {distributed.process_index()} of a multi-process run "
                    f"({type(error).__name__}: {message}); the processes cannot retry it one by one: fix it, then "
                    "start the run again to resume"
                ) from error
            distributed.barrier(f"stage {name} computed")
            if leader:
                _commit(plan, name, fresh, started, metrics)
    finally:
        if lease is not None:
            lease.release()
    distributed.barrier(f"stage {name} committed")
    manifest = plan.store.manifest(name, stage.key)
    if manifest is None:
        raise GemstillError(f"stage {name}: process 0 did not commit {stage.key}; its log names the failure")
    return manifest


def select_stages(plan: Plan, refresh: list[str], only: str | None) -> tuple[list[str], set[str]]:
    """(stages to consider, stages forced to recompute) for a run with --refresh / --only."""
    for name in [*refresh, *([only] if only else [])]:
        if name not in plan.stages:
            raise GemstillError(f"no stage named '{name}' in {plan.pipeline_path}; stages: {list(plan.stages)}")
    forced: set[str] = set()
    for name in refresh:
        forced |= plan.pipeline.downstream(name)
    forced |= {name for name, stage in plan.stages.items() if stage.spec.cache == "never"}
    return ([only] if only else list(plan.stages)), forced
