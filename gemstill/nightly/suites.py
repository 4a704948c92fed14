"""The suites a night scores its models with, each the code of the pipeline stage it mirrors: held-out NLL, perplexity
and KL (the evaluate stage's), reasoning accuracy (the evaluate_reasoning stage's).

The teacher's reasoning scores are kept in the store as the stage `nightly_teacher_reasoning`, keyed by the one
key scheme (gemstill.pipeline.plan.keyed) over the evaluate_reasoning task's settings and code with the night's
data and teacher as inputs: sampling is seeded, so while those are unchanged a rerun would only repeat them.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

from gemstill.nightly.select import Night, NightModel
from gemstill.pipeline.plan import Plan, keyed

HELDOUT_METRICS = ("val_nll", "val_ppl", "kl_to_teacher")
TEACHER_REASONING = "nightly_teacher_reasoning"  # the store stage holding the teacher's reasoning rows
Log = Callable[[str], None]


def _row(model: NightModel, suite: str, metric: str, value: float) -> dict[str, Any]:
    return {"model": model.name, "model_key": model.key, "suite": suite, "metric": metric, "value": float(value)}


def heldout_rows(night: Night, plan: Plan, log: Log = print) -> list[dict[str, Any]]:
    """NLL, perplexity and exact KL to the teacher on the held-out split, with the evaluate stage's code.

    The teacher is scored every night: its logits are what every student's KL is measured against."""
    from gemstill.distill.evaluate import Candidate, evaluate_models
    from gemstill.loading import load_checkpoint, load_model
    from gemstill.params import to_flat

    settings, precision = plan.profile.evaluate, plan.profile.precision
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


def teacher_reasoning_key(night: Night, plan: Plan) -> str:
    """The store key of the teacher's reasoning rows: the evaluate_reasoning task's settings and code, on the
    night's data and teacher."""
    from gemstill.pipeline.stages import resolve_task

    task = resolve_task("evaluate_reasoning", [])
    inputs = {"prepare_data": night.data_key, "teacher": night.teacher.key}
    return keyed(TEACHER_REASONING, "evaluate_reasoning", task, plan.hashed_profile, inputs)[2]


def reasoning_rows(night: Night, plan: Plan, log: Log = print) -> list[dict[str, Any]]:
    """Accuracy and tokens per problem of every configured method on every kind, as the evaluate_reasoning stage
    scores them; the teacher's rows come from the store while its key is unchanged."""
    from gemstill.reasoning.problems import suite_problems
    from gemstill.reasoning.suite import load_text_model, score_model
    from gemstill.tokenizer import Tokenizer

    settings = plan.profile.reasoning
    tokenizer = Tokenizer.from_file(night.data_dir / "tokenizer.model")  # the variant GGUFs carry none
    problems = suite_problems(settings, night.data_dir)

    def score(model: NightModel) -> list[dict[str, Any]]:
        text_model = load_text_model(model.name, model.spec, tokenizer, settings.batch_size)
        rows = []
        for row, _ in score_model(text_model, problems, settings, log=log):
            case = f"{row['method']}/{row['kind']}"
            rows += [_row(model, "reasoning", f"{m}/{case}", row[m]) for m in ("accuracy", "tokens_per_problem")]
        return rows

    key, store = teacher_reasoning_key(night, plan), plan.store
    if store.manifest(TEACHER_REASONING, key) is not None:
        log(f"nightly: the teacher's reasoning scores are unchanged, read from {TEACHER_REASONING}/{key}")
        rows = json.loads((store.fetch(TEACHER_REASONING, key) / "rows.json").read_text())["rows"]
    else:
        from gemstill.fsutil import atomic_write_bytes

        started = time.time()
        rows = score(night.teacher)
        workdir = store.prepare(TEACHER_REASONING, key, refresh=False)
        payload = {"teacher": night.teacher.spec, "rows": rows}
        atomic_write_bytes(workdir / "rows.json", json.dumps(payload, indent=1).encode())
        record = {
            "stage": TEACHER_REASONING,
            "task": "evaluate_reasoning",
            "key": key,
            "inputs": {"prepare_data": night.data_key, "teacher": night.teacher.key},
            "metrics": {},
            "started_at": started,
            "finished_at": time.time(),
            "host": socket.gethostname(),
        }
        store.commit(TEACHER_REASONING, key, record)
    for model in night.students:
        rows += score(model)
    return rows


SUITES: dict[str, Callable[[Night, Plan, Log], list[dict[str, Any]]]] = {
    "heldout": heldout_rows,
    "reasoning": reasoning_rows,
}
