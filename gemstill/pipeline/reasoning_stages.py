"""The evaluate_reasoning stage: CoT, self-consistency and ToT on the held-out problems (and the profile's
problem files) for the teacher, the student, the baseline and every quantized variant among the stage's inputs."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from gemstill.errors import GemstillError
from gemstill.pipeline.context import StageContext
from gemstill.pipeline.teacher import teacher_spec


def reasoning_models(ctx: StageContext) -> list[tuple[str, str]]:
    """(name, model spec) of the teacher and of every student-like model among the stage's inputs."""
    from gemstill.pipeline.quant_stages import variant_candidates

    models = [("teacher", teacher_spec(ctx))]
    for task, name in (("train_student", "student"), ("train_baseline", "baseline")):
        if task in ctx.inputs:
            models.append((name, f"orbax:{ctx.input(task) / 'model'}"))
    models += [(name, spec) for name, _, spec in variant_candidates(ctx)]
    wanted = ctx.profile.reasoning.models
    if wanted is None:
        return models
    unknown = sorted(set(wanted) - {name for name, _ in models})
    if unknown:
        raise GemstillError(
            f"reasoning.models names {unknown}, not among this stage's models {[name for name, _ in models]}; "
            "drop them or add the stages that make them to the stage's needs"
        )
    return [(name, spec) for name, spec in models if name in wanted]


def evaluate_reasoning_stage(ctx: StageContext) -> dict[str, Any]:
    from gemstill.fsutil import atomic_write_bytes
    from gemstill.reasoning.problems import suite_problems
    from gemstill.reasoning.report import report_markdown, save_reasoning_plot, save_records
    from gemstill.reasoning.suite import add_teacher_fraction, load_text_model, score_model
    from gemstill.tokenizer import Tokenizer

    settings = ctx.profile.reasoning
    tokenizer = Tokenizer.from_file(ctx.input("prepare_data") / "tokenizer.model")
    problems = suite_problems(settings, ctx.input("prepare_data"))
    counts = {kind: sum(p.kind == kind for p in problems) for kind in dict.fromkeys(p.kind for p in problems)}
    ctx.log(f"evaluate_reasoning: {len(problems)} problems {counts}, methods {settings.methods}")
    rows: list[dict[str, Any]] = []
    correct: dict[tuple[str, str, str], list[bool]] = {}
    for name, spec in reasoning_models(ctx):
        model = load_text_model(name, spec, tokenizer, settings.batch_size)
        for row, result in score_model(model, problems, settings, log=ctx.log):
            save_records(ctx.workdir / "records", name, result, row["kind"])
            rows.append(row)
            correct[(name, row["method"], row["kind"])] = [record.correct for record in result.records]
    add_teacher_fraction(rows, correct)
    notes = [
        f"Prompt: {settings.prompt}; self-consistency: {settings.sc.samples} samples at T={settings.sc.temperature}; "
        f"tree of thought: breadths {settings.tot.breadths}, depth {settings.tot.depth}, "
        f"value by {settings.tot.value}.",
        "Every answer is checked by code; the per-problem records are in records/<model>/<method>-<kind>.jsonl.",
        *tot_notes(rows),
    ]
    atomic_write_bytes(ctx.workdir / "report.json", json.dumps({"rows": rows}, indent=2).encode())
    save_reasoning_plot(ctx.workdir / "reasoning.png", rows)
    title = "gemstill reasoning report"
    atomic_write_bytes(ctx.workdir / "report.md", report_markdown(title, rows, notes).encode())
    for note in notes[2:]:
        ctx.log(f"evaluate_reasoning: {note}")
    return {f"{r['model']}_{r['method']}_{r['kind']}_accuracy": r["accuracy"] for r in rows}


def tot_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Per model: ToT at its largest breadth against b=1 (and CoT on the same puzzles), as measured."""
    notes = []
    for model in dict.fromkeys(r["model"] for r in rows):
        tot = {r["method"]: r for r in rows if r["model"] == model and r["method"].startswith("tot-")}
        cot = next((r for r in rows if r["model"] == model and r["method"] == "cot" and r["kind"] == "game24"), None)
        if len(tot) < 2:
            continue
        widest = max(tot, key=lambda m: int(m.removeprefix("tot-b")))
        b1 = tot.get("tot-b1")
        if b1 is None:
            continue
        notes.append(
            f"{model}: Game of 24 solved by {widest} {tot[widest]['accuracy']:.1%} vs tot-b1 {b1['accuracy']:.1%}"
            + (f" vs cot {cot['accuracy']:.1%}" if cot else "")
            + f" ({tot[widest]['tokens_per_problem']:.0f} vs {b1['tokens_per_problem']:.0f} tokens per problem)."
        )
    return notes


def teacher_generate_stage(ctx: StageContext) -> dict[str, Any]:
    """A data directory like prepare_data's whose train split has the teacher's verified solutions in place of the
    reference ones; the validation split, held-out problems and tokenizer are prepare_data's, unchanged, so
    every later score stays comparable with a run on the reference data."""
    import shutil

    from gemstill.data.prepare import tokenize_all, training_examples, write_packed_split
    from gemstill.fsutil import atomic_write_bytes
    from gemstill.reasoning.suite import load_text_model
    from gemstill.reasoning.teacher_solutions import teacher_split
    from gemstill.tokenizer import Tokenizer

    settings = ctx.profile.teacher_generate
    data = ctx.profile.data
    source = ctx.input("prepare_data")
    if not data.chat_template:
        raise GemstillError(
            "stage teacher_generate needs chat examples (data.chat_template: true) to answer their prompts anew"
        )
    tokenizer = Tokenizer.from_file(source / "tokenizer.model")
    teacher = load_text_model("teacher", teacher_spec(ctx), tokenizer, settings.batch_size)
    examples, trained = training_examples(data, ctx.workdir)
    split = teacher_split(teacher, examples, {p["question"]: p for p in trained}, settings, log=ctx.log)
    if not split.stats["teacher_examples"]:
        raise GemstillError(
            f"stage teacher_generate: the teacher wrote no solution that could be kept ({split.stats}); train the "
            "teacher longer, raise teacher_generate.samples or max_new_tokens, or set teacher_generate.keep: all"
        )
    records = "".join(json.dumps(dataclasses.asdict(g)) + "\n" for g in split.generations)
    atomic_write_bytes(ctx.workdir / "generations.jsonl", records.encode())
    stats = json.loads((source / "data_stats.json").read_text())
    stats["train"] = write_packed_split(ctx.workdir, "train", tokenize_all(split.examples, tokenizer, data), data)
    stats["teacher_generate"] = split.stats
    for name in ("tokenizer.model", "validation.parquet", "heldout.jsonl"):
        shutil.copyfile(source / name, ctx.workdir / name)
    atomic_write_bytes(ctx.workdir / "data_stats.json", (json.dumps(stats, indent=2) + "\n").encode())
    ctx.log(f"teacher_generate: train: {stats['train']}")
    return {key: value for key, value in split.stats.items() if value is not None}
