"""The `gemstill` command line: score, generate, info. Errors print one line and exit non-zero."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gemstill.errors import GemstillError

app = typer.Typer(
    name="gemstill",
    help="Distill Gemma 3 models. Model specs: gguf:PATH, hf:DIR, orbax:DIR, gemma3-270m.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="gguf:PATH, hf:DIR, orbax:DIR or gemma3-270m")]
DtypeOpt = Annotated[str, typer.Option(help="compute dtype: float32 or bfloat16")]
ParamDtypeOpt = Annotated[str, typer.Option(help="parameter dtype: float32 or bfloat16")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")]


def _read_text(text: str | None, text_file: Path | None, what: str) -> str:
    if (text is None) == (text_file is None):
        raise GemstillError(f"give exactly one of --{what} or --{what}-file")
    if text_file is None:
        return text or ""
    try:
        return text_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GemstillError(f"--{what}-file {text_file}: file not found; check the path") from None
    except UnicodeDecodeError:
        raise GemstillError(f"--{what}-file {text_file}: not UTF-8 text; convert it to UTF-8") from None


QuantizeOpt = Annotated[
    str | None,
    typer.Option(help="quantize on load and keep packed: int8, q8_0 or q4_0 (a q8_0/q4_0 GGUF stays packed anyway)"),
]


def _load(spec: str, param_dtype: str, dtype: str, quantize: str | None = None):
    """The model with a GGUF's Q8_0/Q4_0 weights kept packed in memory (dequantized layer by layer when run)."""
    from gemstill.loading import load_model

    with err.status(f"loading {spec}"):
        return load_model(spec, param_dtype=param_dtype, dtype=dtype, packed=True, quantize=quantize)


@app.command()
def score(
    model: ModelOpt,
    text: Annotated[str | None, typer.Option(help="text to score")] = None,
    text_file: Annotated[Path | None, typer.Option(help="file whose text to score")] = None,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "float32",
    param_dtype: ParamDtypeOpt = "float32",
    quantize: QuantizeOpt = None,
) -> None:
    """Per-token log-probabilities and perplexity of a text (BOS is prepended)."""
    from gemstill.scoring import Scorer, perplexity

    content = _read_text(text, text_file, "text")
    loaded = _load(model, param_dtype, dtype, quantize)
    tokenizer = loaded.require_tokenizer()
    ids = tokenizer.encode(content)
    logprobs = Scorer(loaded.model).logprobs([ids])[0]
    ppl = perplexity(logprobs)
    if as_json:
        result = {
            "model": model,
            "token_ids": ids,
            "tokens": [tokenizer.id_to_piece(i) for i in ids],
            "logprobs": [float(x) for x in logprobs],
            "num_scored": len(logprobs),
            "nll": float(-logprobs.mean()),
            "perplexity": ppl,
        }
        print(json.dumps(result, ensure_ascii=False))
        return
    table = Table("pos", "token", "id", "log p")
    for pos, (token_id, lp) in enumerate(zip(ids[1:], logprobs, strict=True), start=1):
        table.add_row(str(pos), repr(tokenizer.id_to_piece(token_id)), str(token_id), f"{lp:.4f}")
    Console().print(table)
    print(f"tokens scored: {len(logprobs)}  mean NLL: {-logprobs.mean():.4f}  perplexity: {ppl:.3f}")


@app.command()
def generate(
    model: ModelOpt,
    prompt: Annotated[str | None, typer.Option(help="prompt text")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="file holding the prompt")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="sample among the k likeliest tokens")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass")] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in Gemma's chat template")] = False,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "float32",
    param_dtype: ParamDtypeOpt = "float32",
    quantize: QuantizeOpt = None,
) -> None:
    """Continue a prompt (streamed to the terminal); stops at <eos> or <end_of_turn>."""
    from gemstill.sampler import Sampler, SamplingParams

    content = _read_text(prompt, prompt_file, "prompt")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    loaded = _load(model, param_dtype, dtype, quantize)
    tokenizer = loaded.require_tokenizer()
    ids = tokenizer.encode_chat([{"role": "user", "content": content}]) if chat else tokenizer.encode(content)
    generated: list[int] = []
    shown = ""

    def stream(step_tokens) -> None:
        nonlocal shown
        if step_tokens[0] < 0:
            return
        generated.append(int(step_tokens[0]))
        text_now = tokenizer.decode(generated)
        if not text_now.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text_now[len(shown) :])
            sys.stdout.flush()
            shown = text_now

    new_ids = Sampler(loaded.model).generate(
        [ids], params, stop_ids=tokenizer.stop_ids, on_step=None if as_json else stream
    )[0]
    if as_json:
        result = {
            "model": model,
            "prompt_token_ids": ids,
            "token_ids": new_ids,
            "text": tokenizer.decode(new_ids),
            "stopped": bool(new_ids) and new_ids[-1] in tokenizer.stop_ids,
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")


@app.command()
def info(
    model: ModelOpt,
    context: Annotated[int, typer.Option(help="context length for the KV-cache figure")] = 8192,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "float32",
    param_dtype: ParamDtypeOpt = "float32",
) -> None:
    """Config, parameter counts and memory estimate. Takes a spec or a variant name (e.g. gemma3-27b)."""
    from gemstill.config import VARIANTS
    from gemstill.memory import estimate, human
    from gemstill.params import count_params

    if model in VARIANTS:
        config = VARIANTS[model]
    else:
        from gemstill.loading import load_checkpoint_config

        config = load_checkpoint_config(model)
    config = config.replace(param_dtype=param_dtype, dtype=dtype)
    counts = count_params(config)
    mem = estimate(config)
    figures = {
        "param_bytes": mem.param_bytes,
        "activation_bytes_per_token": mem.activation_bytes_per_token,
        "kv_cache_bytes_per_token_global_layers": mem.kv_bytes_per_token_global,
        "kv_cache_bytes_per_token_local_layers": mem.kv_bytes_per_token_local,
        f"kv_cache_bytes_at_{context}": mem.kv_cache_bytes(context),
        f"kv_cache_bytes_at_{context}_without_ring_buffers": (
            mem.kv_bytes_per_token_global + mem.kv_bytes_per_token_local
        )
        * context,
    }
    if model not in VARIANTS and model.startswith("gguf:"):
        from gemstill.checkpoints.gguf_file import open_gguf

        reader = open_gguf(model.partition(":")[2])
        for tensor in reader.tensors:  # the bytes the weights take in the file (and packed, in memory)
            key = f"weight_bytes_{tensor.tensor_type.name.lower()}"
            figures[key] = figures.get(key, 0) + int(tensor.n_bytes)
        figures["weight_bytes_in_file"] = sum(int(t.n_bytes) for t in reader.tensors)
    if as_json:
        print(json.dumps({"model": model, "config": config.to_dict(), "params": counts, "memory": figures}))
        return
    table = Table("field", "value", title=f"{model}")
    for key, value in config.to_dict().items():
        table.add_row(key, str(value))
    for key, value in counts.items():
        table.add_row(f"params.{key}", f"{value:,}")
    for key, value in figures.items():
        table.add_row(key, human(value))
    Console().print(table)


@app.command()
def export(
    model: ModelOpt,
    format_: Annotated[str, typer.Option("--format", help="hf, gguf or orbax")],
    out: Annotated[Path, typer.Option(help="the export directory to create")],
    quant: Annotated[
        str | None, typer.Option(help="hf: f32|f16|bf16; gguf: f32|f16|bf16|q8_0|q4_0; orbax: f32|bf16")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    keep_embedding: Annotated[
        bool, typer.Option(help="gguf q8_0/q4_0: keep the tied embedding / LM head in f32")
    ] = False,
) -> None:
    """Export a model: a Hugging Face directory, a llama.cpp GGUF (in OUT/model.gguf) or a native checkpoint.

    The export is written beside OUT and renamed into place, with a model card (README.md); nothing is left
    behind on failure.
    """
    from gemstill.export import ModelCard, check_request, export_model
    from gemstill.loading import load_checkpoint
    from gemstill.params import count_params

    chosen = check_request(format_, quant)  # refuse a bad request before loading anything
    if out.exists() and not overwrite:
        raise GemstillError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    with err.status(f"loading {model}"):
        config, flat, tokenizer = load_checkpoint(model)
    card = ModelCard(
        title=f"{model} exported by gemstill",
        facts=(
            ("source", model),
            ("architecture", f"Gemma 3, {config.num_layers} layers, width {config.embed_dim}"),
            ("parameters", f"{count_params(config)['total']:,}"),
        ),
    )
    with err.status(f"writing {out}"):
        export_model(config, flat, tokenizer, format_, out, chosen, card, overwrite, not keep_embedding)
    print(out)


def _overrides(pairs: list[str] | None) -> dict[str, str]:
    parsed = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GemstillError(f"--set {pair!r}: expected KEY=VALUE with a dotted key, e.g. teacher_cache.k=32")
        parsed[key] = value
    return parsed


PipelineOpt = Annotated[str | None, typer.Option(help="pipeline YAML (default: the profile's)")]
StoreOpt = Annotated[str | None, typer.Option(help="artifact store root: a directory or fsspec URL")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a profile value: KEY=VALUE")]


@app.command()
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
    from gemstill.pipeline.plan import make_plan

    distributed.start()  # a multi-process run joins its group before anything else touches JAX
    overrides = _overrides(set_)
    plan = make_plan(profile, pipeline, store, overrides)  # validate everything before Prefect starts
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from the embedded API
    from gemstill.flows.distill import distill
    from gemstill.loading import cache_root
    from gemstill.logs import quiet_tracebacks

    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_file = quiet_tracebacks(cache_root() / "logs" / f"run-{plan.profile.name}-{stamp}-{os.getpid()}.log")
    try:
        results = distill(
            profile=profile, pipeline=pipeline, refresh=refresh, only=only, store=store, overrides=overrides
        )
    except GemstillError:
        raise
    except Exception as error:  # a bug or a dead dependency: one line here, the traceback in the log file
        message = " ".join(str(error).split())[:300]
        raise GemstillError(f"{type(error).__name__}: {message} (the traceback is in {log_file})") from None
    table = Table("stage", "key", "result", "headline metrics", title=f"profile {profile}")
    for name, result in results.items():
        table.add_row(name, result["key"], "cached" if result["cached"] else "ran", _headline(result["metrics"]))
    Console().print(table)
    if any(s.spec.task == "evaluate" for s in plan.stages.values()) and (directory := _report_dir(plan)) is not None:
        _print_report(plan.profile.name, json.loads((directory / "report.json").read_text())["rows"], directory)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    processes: Annotated[int, typer.Option(help="how many processes to start")],
    devices_per_process: Annotated[
        int | None, typer.Option(help="devices each process gets: host devices on CPU, its own GPUs on a GPU node")
    ] = None,
    port: Annotated[int | None, typer.Option(help="coordinator port on 127.0.0.1 (default: a free one)")] = None,
) -> None:
    """Start N local processes of one multi-process run: gemstill launch --processes 2 -- gemstill run PROFILE."""
    from gemstill.launch import launch as start_processes

    code = start_processes(ctx.args, processes, devices_per_process, port)
    if code:
        raise typer.Exit(code if code > 0 else 128 - code)  # killed by signal N: 128 + N, as a shell reports it


def _headline(metrics: dict, count: int = 4) -> str:
    shown = []
    for key, value in list(metrics.items())[:count]:
        shown.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(shown)


@app.command()
def status(
    profile: Annotated[str, typer.Argument(help="profile name or YAML path")],
    pipeline: PipelineOpt = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every stage of the profile's pipeline: done / stale / missing, key, artifact path, metrics, memory."""
    from gemstill.memory import human
    from gemstill.pipeline.plan import make_plan

    plan = make_plan(profile, pipeline, store, _overrides(set_))
    rows = []
    for name, stage in plan.stages.items():
        manifest = plan.store.manifest(name, stage.key) or {}
        rows.append(
            {
                "stage": name,
                "state": plan.state(name),
                "key": stage.key,
                "path": f"{plan.store.root.rstrip('/')}/{name}/{stage.key}",
                "metrics": manifest.get("metrics", {}),
                "memory_bytes": stage.task.memory(plan.profile),
            }
        )
    if as_json:
        print(json.dumps({"profile": plan.profile.name, "pipeline": plan.pipeline.name, "stages": rows}))
        return
    table = Table("stage", "state", "key", "path", "metrics", "memory (est.)", title=f"profile {plan.profile.name}")
    colors = {"done": "green", "stale": "yellow", "missing": "red"}
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


@app.command()
def report(
    profile: Annotated[str, typer.Argument(help="profile name or YAML path")],
    pipeline: PipelineOpt = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The evaluate stage's table: held-out NLL, perplexity and KL to the teacher per model."""
    from gemstill.pipeline.plan import make_plan

    plan = make_plan(profile, pipeline, store, _overrides(set_))
    directory = _report_dir(plan)
    if directory is None:
        raise GemstillError(
            f"profile {profile} has not been evaluated with these settings; run: gemstill run {profile}"
        )
    rows = json.loads((directory / "report.json").read_text())["rows"]
    if as_json:
        print(json.dumps(rows))
        return
    _print_report(plan.profile.name, rows, directory)


def _report_dir(plan) -> Path | None:
    """The committed output of the pipeline's evaluate stage, or None when it is not done."""
    names = [n for n, s in plan.stages.items() if s.spec.task == "evaluate"]
    if not names:
        raise GemstillError(f"pipeline {plan.pipeline.name} has no evaluate stage")
    key = plan.stages[names[-1]].key
    return plan.store.fetch(names[-1], key) if plan.store.manifest(names[-1], key) is not None else None


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


cache_app = typer.Typer(help="Inspect the teacher logit cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


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
    from gemstill.teacher_cache.stats import cache_stats

    plan = make_plan(profile, pipeline, store, _overrides(set_))
    names = [n for n, s in plan.stages.items() if s.spec.task == "teacher_cache"]
    if not names:
        raise GemstillError(f"pipeline {plan.pipeline.name} has no teacher_cache stage")
    directory = plan.store.local_dir(names[0], plan.stages[names[0]].key)
    if not (directory / "catalog.duckdb").is_file():
        raise GemstillError(f"the teacher cache of profile {profile} has not been built; run: gemstill run {profile}")
    rows = cache_stats(directory)
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(*rows[0].keys(), title=f"teacher cache {plan.stages[names[0]].key}") if rows else Table()
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)


eval_app = typer.Typer(help="Evaluate models: reasoning suites, the nightly flow, its history.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


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

    from gemstill.reasoning.config import ReasoningConfig, SelfConsistencyConfig, ToTConfig
    from gemstill.reasoning.suite import load_text_model, resolve_problems, run_method

    if method not in ("cot", "sc", "tot"):
        raise GemstillError(f"unknown method {method!r}; use --method cot, sc or tot")
    try:
        config = ReasoningConfig(
            methods=[method],
            prompt=prompt,
            shots=shots,
            limit=limit,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            sc=SelfConsistencyConfig(samples=samples, temperature=temperature),
            tot=ToTConfig(breadths=[breadth]),
        )
    except ValidationError as error:
        first = error.errors()[0]
        raise GemstillError(f"--{first['loc'][0]}: {first['msg']}".replace("_", "-")) from None
    chosen = resolve_problems(problems, limit)
    if method == "tot":
        chosen = [p for p in chosen if p.kind == "game24"]
        if not chosen:
            raise GemstillError(f"{problems}: no Game-of-24 problems for --method tot; use cot or sc for the others")
    with err.status(f"loading {model}"):
        text_model = load_text_model(model, model, batch_size=batch_size)
    text_model.render("check", config.prompt)  # refuses a chat prompt for a model without a chat template
    by_kind: dict[str, list] = {}
    for problem in chosen:
        by_kind.setdefault(problem.kind, []).append(problem)
    results = [run_method(text_model, group, method, config, breadth) for group in by_kind.values()]
    records = [record for result in results for record in result.to_json()["records"]]
    correct = sum(r["correct"] for r in records)
    if as_json:
        print(
            json.dumps(
                {"accuracy": correct / len(records), "correct": correct, "total": len(records), "records": records},
                ensure_ascii=False,
            )
        )
        return
    table = Table("method", "kind", "problems", "correct", "accuracy", "tokens / problem")
    for kind, result in zip(by_kind, results, strict=True):
        table.add_row(
            result.method,
            kind,
            str(result.total),
            str(result.correct),
            f"{result.accuracy:.1%}",
            f"{result.tokens_per_problem:.0f}",
        )
    Console().print(table)
    print(f"accuracy: {correct}/{len(records)} = {correct / len(records):.1%}")


# --- the nightly evaluation: `eval nightly` runs the flow in-process, `eval history` reads what the nights recorded


@eval_app.command("nightly")
def eval_nightly(
    profile: Annotated[str, typer.Argument(help="profile name (profiles/NAME.yaml) or YAML path")],
    store: StoreOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the nightly evaluation flow in-process: score the latest committed models, append the night to the
    store's history; a metric that regressed past its threshold fails it (exit 1, naming the metric)."""
    from gemstill.nightly import select_night
    from gemstill.pipeline.plan import make_plan

    overrides = _overrides(set_)
    select_night(make_plan(profile, None, store, overrides))  # refuse bad settings or an empty store before Prefect
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from gemstill.flows.nightly import nightly_eval

    night = nightly_eval(profile=profile, store=store, overrides=overrides)
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
    from gemstill.nightly import HISTORY_FILE, nightly_dir
    from gemstill.nightly_history import FIELDS, nights, read_history
    from gemstill.pipeline.profile import load_profile
    from gemstill.pipeline.store import ArtifactStore

    loaded, _ = load_profile(profile, _overrides(set_))
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


def main() -> None:
    """Entry point: GemstillError becomes one line on stderr and exit code 1, never a traceback."""
    try:
        app()
    except GemstillError as error:
        # plain text: a message is data, never markup (`[student, teacher]` and `[/` print as written)
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
