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
from gemstill.pipeline.context import ProfileView, StageContext, view
from gemstill.pipeline.lease import acquire
from gemstill.pipeline.profile import Profile, load_profile, resolve_profile_path
from gemstill.pipeline.spec import PipelineSpec, StageSpec, load_pipeline
from gemstill.pipeline.stages import MISSING_FILES, StageTask, hashed_profile, resolve_task
from gemstill.pipeline.store import ArtifactStore, CorruptResult
from gemstill.pipeline.trust import check_configured_file, check_paths
from gemstill.pipeline.watchdog import Watchdog
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
    hashed_profile: dict[str, Any]  # the profile as keys see it (gemstill.pipeline.stages.hashed_profile)

    def view(self, name: str) -> ProfileView:
        """The profile as stage `name` may read it: only the settings its task declares."""
        stage = self.stages[name]
        return view(self.profile, stage.task.visible, name, stage.spec.task)

    def memory(self, name: str) -> dict[str, int]:
        """The stage's memory estimate per device (empty where its task has none)."""
        return self.stages[name].task.memory(self.view(name))

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
    inspect: bool = False,
) -> Plan:
    """The plan of a profile's pipeline; `restricted` (a deployment run) limits it to the files and task modules
    the machine is configured with (gemstill.pipeline.trust). A plan to run refuses data files that are not on
    this machine; one to `inspect` (status, memory estimates of a profile meant for another machine) forms all
    the same."""
    if restricted:  # where the files live is checked before anything in them is read
        check_configured_file("profiles", resolve_profile_path(profile_name))
        if pipeline:
            check_configured_file("pipelines", resolve_yaml("pipelines", pipeline))
    profile, profile_path = load_profile(profile_name, overrides)
    pipeline_path = resolve_yaml("pipelines", pipeline) if pipeline else profile.pipeline_path()
    if restricted:
        check_configured_file("pipelines", pipeline_path)
        as_written = load_profile(profile_name)[0]
        check_paths(as_written, profile.model_copy(update={"store": store}) if store else profile)
    spec = load_pipeline(pipeline_path)
    dumped = hashed_profile(profile)
    for name in ("_data_identity", "_out_of_domain_identity"):
        if not inspect and isinstance(dumped[name], dict) and MISSING_FILES in dumped[name]:
            raise GemstillError(dumped[name][MISSING_FILES])
    planned: dict[str, PlannedStage] = {}
    validated: set[Any] = set()
    for name in spec.order():
        stage = spec.stages[name]
        task = resolve_task(stage.task, stage.reads, restricted)
        if (task.validate, task.visible) not in validated:  # checked through the stage's own view of the profile
            validated.add((task.validate, task.visible))
            task.validate(view(profile, task.visible, name, stage.task))
        inputs = {need: planned[need].key for need in stage.needs}
        settings, code, key = keyed(name, stage.task, task, dumped, inputs)
        planned[name] = PlannedStage(name, stage, task, settings, code, inputs, key)
    return Plan(profile, profile_path, spec, pipeline_path, ArtifactStore(store or profile.store), planned, dumped)


def keyed(
    name: str, task_name: str, task: StageTask, hashed: dict[str, Any], inputs: dict[str, str]
) -> tuple[dict[str, Any], str, str]:
    """(settings, code version, key) of `task` run as stage `name` on `inputs` (upstream name -> key): the one key
    scheme, for the pipeline's stages and for work a flow keeps in the store beside them (the nightly's)."""
    settings = {path: _lookup(hashed, path) for path in task.reads}
    code = code_version((task.code_root,))
    return settings, code, stage_key(name, task_name, settings, code, inputs)


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
        plan.store.finish_refresh(name, stage.key)  # a refresh of this key whose swap was cut short
        if not fresh and (done := plan.store.manifest(name, stage.key)) is not None:
            log(f"stage {name}: already committed ({stage.key}), by another run or an earlier attempt; using it")
            return done
        started = time.time()
        with Watchdog(stage.spec.timeout_seconds, f"stage {name}") as watchdog:
            workdir = plan.store.prepare(name, stage.key, refresh=fresh)
            metrics = _compute(plan, name, fresh, workdir, watchdog.reporting(log), watchdog.reporting(progress))
            watchdog.check()  # past the deadline: nothing is committed
            return _commit(plan, name, fresh, started, metrics)


def _inputs(plan: Plan, name: str) -> dict[str, Path]:
    """The committed inputs' directories, each checked against its manifest first (a corrupt one is refused)."""
    stage = plan.stages[name]
    try:
        return {
            plan.pipeline.stages[need].task: plan.store.fetch(need, plan.stages[need].key) for need in stage.spec.needs
        }
    except CorruptResult as corrupt:
        raise corrupt.naming(plan.profile.name) from None


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
        profile=plan.view(name),
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
        plan.store.finish_refresh(name, stage.key)
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
                with Watchdog(stage.spec.timeout_seconds, f"stage {name}") as watchdog:
                    log, progress = watchdog.reporting(log), watchdog.reporting(progress)
                    if stage.task.collective:
                        workdir = plan.store.join(name, stage.key, refresh=fresh)
                        metrics = _compute(plan, name, fresh, workdir, log, progress)
                    elif leader:
                        with distributed.alone():
                            workdir = plan.store.join(name, stage.key, fresh)
                            metrics = _compute(plan, name, fresh, workdir, log, progress)
            except TimeoutError:
                raise  # a stage past its time limit: the same in every process, and Prefect's TimedOut
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
