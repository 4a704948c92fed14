"""Evaluation: `eval reasoning` (a reasoning suite on a problem file), `eval nightly` (the nightly flow
in-process) and `eval history` (what the nights recorded)."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gemstill.cli.options import JsonOpt, ModelOpt, SetOpt, StoreOpt, err, overrides
from gemstill.errors import GemstillError

eval_app = typer.Typer(help="Evaluate models: reasoning suites, the nightly flow, its history.", no_args_is_help=True)


@eval_app.command("reasoning")
def eval_reasoning(
    model: ModelOpt,
    problems: Annotated[str, typer.Option(help="a jsonl file (GSM8K, Game of 24, or heldout.jsonl) or 'generated'")],
    method: Annotated[str, typer.Option(help="cot (greedy), sc (self-consistency) or tot (tree of thought)")] = "cot",
    samples: Annotated[int, typer.Option(help="self-consistency: chains per problem")] = 5,
    temperature: Annotated[float, typer.Option(help="self-consistency: sampling temperature")] = 0.7,
    breadth: Annotated[int, typer.Option(help="tree of thought: states kept per level")] = 5,
    limit: Annotated[int | None, typer.Option(help="the first N problems of each kind")] = None,
    prompt: Annotated[str, typer.Option(help="chat (the model's template) or few-shot")] = "chat",
    shots: Annotated[int, typer.Option(help="few-shot: worked examples before each question")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per chain of thought")] = 96,
    batch_size: Annotated[int, typer.Option(help="prompts per generate call")] = 64,
    as_json: JsonOpt = False,
) -> None:
    """Score a model's reasoning on problems code checks; --json prints every problem's record."""
    from pydantic import ValidationError

    from gemstill.reasoning.suite import evaluate_file, method_config

    if method not in ("cot", "sc", "tot"):
        raise GemstillError(f"unknown method {method!r}; use --method cot, sc or tot")
    try:
        config = method_config(
            method,
            prompt=prompt,
            shots=shots,
            limit=limit,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            samples=samples,
            temperature=temperature,
            breadth=breadth,
        )
    except ValidationError as error:
        first = error.errors()[0]
        raise GemstillError(f"--{first['loc'][0]}: {first['msg']}".replace("_", "-")) from None
    scored = evaluate_file(model, problems, method, config, breadth, loading=err.status)
    if as_json:
        print(json.dumps(scored.to_json(), ensure_ascii=False))
        return
    table = Table("method", "kind", "problems", "correct", "accuracy", "tokens / problem")
    for kind, result in scored.results.items():
        table.add_row(
            result.method,
            kind,
            str(result.total),
            str(result.correct),
            f"{result.accuracy:.1%}",
            f"{result.tokens_per_problem:.0f}",
        )
    Console().print(table)
    print(f"accuracy: {scored.correct}/{scored.total} = {scored.accuracy:.1%}")


# --- the nightly evaluation: `eval nightly` runs the flow in-process, `eval history` reads what the nights recorded


@eval_app.command("nightly")
def eval_nightly(
    profile: Annotated[str, typer.Argument(help="profile name (profiles/NAME.yaml) or YAML path")],
    store: StoreOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the nightly evaluation flow in-process: score the latest committed models, append the night to the
    store's history; a metric that regressed past its threshold fails it (exit 1, naming the metric)."""
    from gemstill.nightly.select import select_night
    from gemstill.pipeline.plan import make_plan

    parsed = overrides(set_)
    select_night(make_plan(profile, None, store, parsed))  # refuse bad settings or an empty store before Prefect
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from gemstill.flows.nightly import nightly_eval

    night = nightly_eval(profile=profile, store=store, overrides=parsed)
    against = night["previous_run_time"] or "nothing (the first night)"
    table = Table("model", "suite", "previous", "tonight", "change", title=f"night of {night['run_time']}")
    table.add_column("metric", overflow="fold")
    for change in night["changes"]:
        previous = change["previous"]
        table.add_row(
            change["model"],
            change["suite"],
            "-" if previous is None else f"{previous:.4f}",
            f"{change['current']:.4f}",
            "-" if previous is None else f"{change['current'] - previous:+.4f}",
            change["metric"],
        )
    Console().print(table)
    print(f"compared with {against}; no regression. Report: {night['report']}  trend: {night['trend']}")


@eval_app.command("history")
def eval_history(
    profile: Annotated[str, typer.Argument(help="profile name or YAML path")],
    store: StoreOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list of the history's rows")] = False,
) -> None:
    """Every night's metrics: run_time, model, model_key, suite, metric, value."""
    from gemstill.nightly.history import FIELDS, nights, read_history
    from gemstill.nightly.record import HISTORY_FILE
    from gemstill.nightly.select import nightly_dir
    from gemstill.pipeline.profile import load_profile
    from gemstill.pipeline.store import ArtifactStore

    loaded, _ = load_profile(profile, overrides(set_))
    path = nightly_dir(ArtifactStore(store or loaded.store)) / HISTORY_FILE
    rows = read_history(path)
    if as_json:
        print(json.dumps(rows))
        return
    if not rows:
        print(f"no nightly runs recorded in {path}; run: gemstill eval nightly {profile}")
        return
    table = Table(title=f"nightly history: {loaded.name}")
    for field in FIELDS:
        table.add_column(field, overflow="fold")
    for row in rows:
        table.add_row(*(str(row[k]) for k in FIELDS[:-1]), f"{row['value']:.4f}")
    Console().print(table)
    print(f"{len(nights(rows))} night(s) in {path}")
