"""Pipeline runs: `run` (a profile's pipeline in-process on Prefect), `status`, `report` and `cache stats`."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gemstill import interrupt
from gemstill.cli.options import JsonOpt, PipelineOpt, SetOpt, StoreOpt, overrides
from gemstill.errors import GemstillError


def _headline(metrics: dict, count: int = 4) -> str:
    shown = []
    for key, value in list(metrics.items())[:count]:
        shown.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(shown)


def _print_report(profile: str, rows: list[dict], directory: Path) -> None:
    table = Table("model", "layers", "parameters", "val NLL", "val PPL", "KL to teacher", title=f"report: {profile}")
    for row in rows:
        table.add_row(
            row["model"],
            str(row["layers"]),
            f"{row['parameters']:,}",
            f"{row['val_nll']:.4f}",
            f"{row['val_ppl']:.3f}",
            f"{row['kl_to_teacher']:.4f}",
        )
    Console().print(table)
    Console().print(f"report with plots: {directory / 'report.md'}")


@contextlib.contextmanager
def _printed(line: str) -> Iterator[None]:
    print(line, flush=True)
    yield


def _resume_line(plan, signum: int) -> str:
    """What an interrupted run says: what is committed, what partial work is kept, and how to go on."""
    import signal

    done = [name for name in plan.stages if plan.state(name) == "done"]
    partial = [
        name
        for name, stage in plan.stages.items()
        if name not in done
        and plan.store.is_local
        and any(plan.store.work_dir(name, stage.key, refresh).exists() for refresh in (False, True))
    ]
    kept = f"; the partial work of {', '.join(partial)} is kept" if partial else ""
    return (
        f"interrupted ({signal.Signals(signum).name}); {len(done)} of {len(plan.stages)} stages committed "
        f"({', '.join(done) or 'none'}){kept}; rerun to resume from what is committed"
    )


@contextlib.contextmanager
def _exit_when_interrupted() -> Iterator[None]:
    """An interrupt raised within (the Prefect server's start-up checks for one) exits here, while the run's
    one-line message still knows what is committed."""
    try:
        yield
    except interrupt.Interrupted as stop:
        interrupt.exit_now(stop.signum)


def run(
    profile: Annotated[str, typer.Argument(help="profile name (profiles/NAME.yaml) or YAML path")],
    pipeline: PipelineOpt = None,
    refresh: Annotated[list[str] | None, typer.Option(help="recompute this stage and all downstream")] = None,
    only: Annotated[str | None, typer.Option(help="run only this stage (its inputs must be done)")] = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run a profile's pipeline in-process on Prefect's embedded API (no server needed)."""
    from gemstill import distributed
    from gemstill.pipeline.plan import make_plan, select_stages
    from gemstill.pipeline.report import read_rows, report_dir

    distributed.start()  # a multi-process run joins its group before anything else touches JAX
    parsed = overrides(set_)
    plan = make_plan(profile, pipeline, store, parsed)  # validate everything before Prefect starts
    select_stages(plan, refresh or [], only)  # an unknown stage name: one line, before Prefect starts
    from gemstill.flows.api import prefect_api
    from gemstill.flows.distill import distill
    from gemstill.loading import cache_root
    from gemstill.logs import run_terminal

    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_file = run_terminal(cache_root() / "logs" / f"run-{plan.profile.name}-{stamp}-{os.getpid()}.log")
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["results"] = distill(
                profile=profile, pipeline=pipeline, refresh=refresh, only=only, store=store, overrides=parsed
            )
        except BaseException as error:  # handed to the main thread, which owns the terminal and the exit code
            outcome["error"] = error

    # the flow runs in a thread of its own; the main thread only waits, so a signal is never lost in library code
    stopping = interrupt.interruptible(describe=lambda signum: _resume_line(plan, signum), raise_in_main=False)
    header = f"gemstill run {plan.profile.name}: {len(plan.stages)} stages, store {plan.store.root}; log {log_file}"
    with stopping, _printed(header), _exit_when_interrupted(), prefect_api():
        worker = threading.Thread(target=work, name="gemstill run", daemon=True)
        worker.start()
        while worker.is_alive() and interrupt.received() is None:
            worker.join(0.2)
        if (signum := interrupt.received()) is not None:
            worker.join(interrupt.GRACE_SECONDS)  # the stages stop at their next step, letting go of leases
            interrupt.exit_now(signum)
    error = outcome.get("error")
    if isinstance(error, GemstillError):
        raise error
    if isinstance(error, BaseException):  # a bug or a dead dependency: one line here, the traceback in the log
        message = " ".join(str(error).split())[:300]
        raise GemstillError(f"{type(error).__name__}: {message} (the traceback is in {log_file})") from None
    results: dict = outcome["results"]  # type: ignore[assignment]
    ran = sum(not result["cached"] for result in results.values())
    print(f"{len(results)} stages done, {ran} of them computed now")
    if any(s.spec.task == "evaluate" for s in plan.stages.values()) and (directory := report_dir(plan)) is not None:
        _print_report(plan.profile.name, read_rows(directory), directory)


def status(
    profile: Annotated[str, typer.Argument(help="profile name or YAML path")],
    pipeline: PipelineOpt = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every stage of the profile's pipeline: done / corrupt / stale / missing, key, artifact path, metrics, memory."""
    from gemstill.memory import human
    from gemstill.pipeline.plan import make_plan
    from gemstill.pipeline.status import stage_rows

    plan = make_plan(profile, pipeline, store, overrides(set_), inspect=True)
    rows = stage_rows(plan)
    if as_json:
        print(json.dumps({"profile": plan.profile.name, "pipeline": plan.pipeline.name, "stages": rows}))
        return
    table = Table("stage", "state", "key", "path", "metrics", "memory (est.)", title=f"profile {plan.profile.name}")
    colors = {"done": "green", "stale": "yellow", "missing": "red", "corrupt": "bold red"}
    for row in rows:
        memory = row["memory_bytes"].get("total")
        table.add_row(
            row["stage"],
            f"[{colors[row['state']]}]{row['state']}[/]",
            row["key"],
            row["path"],
            _headline(row["metrics"]),
            human(memory) if memory else "-",
        )
    Console().print(table)
    for row in rows:
        if "problem" in row:
            print(f"corrupt: {row['problem']}")


def report(
    profile: Annotated[str, typer.Argument(help="profile name or YAML path")],
    pipeline: PipelineOpt = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The evaluate stage's table: held-out NLL, perplexity and KL to the teacher per model."""
    from gemstill.pipeline.plan import make_plan
    from gemstill.pipeline.report import load_report

    plan = make_plan(profile, pipeline, store, overrides(set_), inspect=True)
    found = load_report(plan, profile)
    if as_json:
        print(json.dumps(found.rows))
        return
    _print_report(plan.profile.name, found.rows, found.directory)


cache_app = typer.Typer(help="Inspect the teacher logit cache.", no_args_is_help=True)


@cache_app.command("stats")
def cache_stats_command(
    profile: Annotated[str, typer.Argument(help="profile name or YAML path")],
    pipeline: PipelineOpt = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """DuckDB over the cache shards: tokens, bytes/token, mean top-k mass, mean teacher entropy, by split."""
    from gemstill.pipeline.plan import make_plan
    from gemstill.pipeline.status import teacher_cache_stats

    plan = make_plan(profile, pipeline, store, overrides(set_), inspect=True)
    stats = teacher_cache_stats(plan, profile)
    rows = stats.rows
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(*rows[0].keys(), title=f"teacher cache {stats.key}") if rows else Table()
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)
