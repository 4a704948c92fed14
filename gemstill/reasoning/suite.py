"""The reasoning suite: every configured method on every model, one row per (model, method, kind), with the
records kept beside; what the evaluate_reasoning stage, the nightly flow and `gemstill eval reasoning` share."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemstill.errors import GemstillError
from gemstill.reasoning.config import ReasoningConfig, SelfConsistencyConfig, ToTConfig
from gemstill.reasoning.cot import chain_of_thought, few_shot_prefix, self_consistency
from gemstill.reasoning.models import SamplerModel, TextModel
from gemstill.reasoning.problems import ReasoningProblem, generated_heldout
from gemstill.reasoning.records import MethodResult
from gemstill.reasoning.tot import tree_of_thought


def shots_for(kind: str, count: int, exclude: set[str]) -> list[ReasoningProblem]:
    """Worked examples of a kind for few-shot prompts: generated training problems, never an evaluated one."""
    from gemstill.data.config import GeneratedCorpusConfig
    from gemstill.data.generated import (
        EVERYDAY_KINDS,
        arithmetic_problems,
        basic_problems,
        everyday_problems,
        game24_problems,
    )
    from gemstill.reasoning.problems import from_generated

    if count == 0:
        return []
    source = {"arithmetic": arithmetic_problems, "gsm8k": arithmetic_problems, "basic": basic_problems}
    source |= {name: functools.partial(everyday_problems, kind=name) for name in EVERYDAY_KINDS}
    make = source.get(kind, game24_problems)
    seed = GeneratedCorpusConfig().seed + 1000  # a stream the corpora never draw from
    return [from_generated(p) for p in make(count + len(exclude), seed) if p["id"] not in exclude][:count]


def run_method(
    model: TextModel, problems: Sequence[ReasoningProblem], method: str, config: ReasoningConfig, breadth: int = 1
) -> MethodResult:
    """One method on problems of one kind (tot: Game of 24 only)."""
    prefix = ""
    if config.prompt == "few-shot" and method != "tot":
        prefix = few_shot_prefix(shots_for(problems[0].kind, config.shots, {p.id for p in problems}))
    if method == "cot":
        return chain_of_thought(model, problems, config.prompt, prefix, config.max_new_tokens)
    if method == "sc":
        sc = config.sc
        return self_consistency(
            model,
            problems,
            sc.samples,
            sc.temperature,
            config.prompt,
            prefix,
            config.max_new_tokens,
            sc.top_k,
            config.seed,
        )
    if method == "tot":
        return tree_of_thought(model, problems, breadth, config.tot, config.prompt, seed=config.seed)
    raise GemstillError(f"unknown reasoning method {method!r}; use cot, sc or tot")


def score_model(
    model: TextModel,
    problems: Sequence[ReasoningProblem],
    config: ReasoningConfig,
    log: Callable[[str], None] = print,
) -> list[tuple[dict[str, Any], MethodResult]]:
    """Rows {model, method, kind, accuracy, correct, total, tokens_per_problem, seconds_per_problem} with their
    results: cot and sc on every kind, tot (once per breadth) on Game of 24."""
    by_kind: dict[str, list[ReasoningProblem]] = {}
    for problem in problems:
        by_kind.setdefault(problem.kind, []).append(problem)
    out = []
    for method in config.methods:
        for kind, group in by_kind.items():
            if method == "tot" and kind != "game24":
                continue
            for breadth in config.tot.breadths if method == "tot" else [1]:
                result = run_method(model, group, method, config, breadth)
                row = {
                    "model": model.name,
                    "method": result.method,
                    "kind": kind,
                    "accuracy": result.accuracy,
                    "correct": result.correct,
                    "total": result.total,
                    "tokens_per_problem": result.tokens_per_problem,
                    "seconds_per_problem": result.seconds_per_problem,
                }
                log(
                    f"reasoning: {model.name} {result.method} on {kind}: {result.correct}/{result.total} "
                    f"({result.accuracy:.1%}), {result.tokens_per_problem:.0f} tokens per problem"
                )
                out.append((row, result))
    return out


def add_teacher_fraction(
    rows: list[dict[str, Any]],
    correct: Mapping[tuple[str, str, str], Sequence[bool]] | None = None,
    teacher: str = "teacher",
) -> None:
    """Each row's accuracy as a fraction of the teacher's on the same method and kind (None when it is 0); with
    `correct` ((model, method, kind) -> per-problem outcomes, the problems in one order for every model), their 95%
    intervals too: accuracy_low/high over problems resampled, and fraction_of_teacher_low/high over the same
    problems resampled for both (gemstill.intervals)."""
    from gemstill.intervals import bootstrap, draws_for, ratio

    reference = {(r["method"], r["kind"]): r["accuracy"] for r in rows if r["model"] == teacher}
    for row in rows:
        base = reference.get((row["method"], row["kind"]))
        row["fraction_of_teacher"] = row["accuracy"] / base if base else None
        outcomes = None if correct is None else correct.get((row["model"], row["method"], row["kind"]))
        if outcomes is None or len(outcomes) < 2:
            continue
        mine = np.asarray(outcomes, np.float64)
        draws = draws_for(len(mine))
        accuracy = bootstrap(ratio(mine, np.ones_like(mine)), len(mine), draws)
        row["accuracy_low"], row["accuracy_high"] = accuracy.low, accuracy.high
        theirs = np.asarray(correct.get((teacher, row["method"], row["kind"]), []), np.float64)
        if base and len(theirs) == len(mine) and row["model"] != teacher:
            with np.errstate(divide="ignore", invalid="ignore"):  # a resample the teacher solves none of: dropped
                share = bootstrap(ratio(mine, theirs), len(mine), draws)
            row["fraction_of_teacher_low"], row["fraction_of_teacher_high"] = share.low, share.high


def load_text_model(name: str, spec: str, tokenizer=None, batch_size: int = 64) -> SamplerModel:
    """A model spec as a SamplerModel (quantized GGUFs stay packed); `tokenizer` stands in when the checkpoint
    carries none (the pipeline's variant GGUFs), and a checkpoint without a chat template cannot take chat prompts."""
    from gemstill.loading import load_model

    loaded = load_model(spec, packed=True)
    own = loaded.tokenizer
    if own is None and tokenizer is None:
        loaded.require_tokenizer()  # raises, naming the spec
    return SamplerModel(
        name,
        loaded.model,
        own or tokenizer,
        chat_template=has_chat_template(spec, own is not None),
        batch_size=batch_size,
    )


def has_chat_template(spec: str, carries_tokenizer: bool = True) -> bool:
    """Whether a checkpoint says how to format chats: a GGUF's tokenizer.chat_template, an HF directory's
    tokenizer_config.json chat_template; gemstill's own checkpoints and aliases always use Gemma's template."""
    from gemstill.loading import parse_spec

    scheme, location = parse_spec(spec)
    if scheme == "gguf":
        from gemstill.checkpoints.gguf_file import open_gguf

        fields = open_gguf(location).fields
        return "tokenizer.chat_template" in fields or not carries_tokenizer
    if scheme == "hf":
        config = Path(location) / "tokenizer_config.json"
        return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))
    return True


def resolve_problems(source: str, limit: int | None) -> list[ReasoningProblem]:
    """`generated` (the default corpus' held-out problems) or a jsonl file."""
    from gemstill.reasoning.problems import load_problems

    return generated_heldout(limit) if source == "generated" else load_problems(source, limit)


def method_config(
    method: str,
    *,
    prompt: str = "chat",
    shots: int = 2,
    limit: int | None = None,
    max_new_tokens: int = 96,
    batch_size: int = 64,
    samples: int = 5,
    temperature: float = 0.7,
    breadth: int = 5,
) -> ReasoningConfig:
    """The ReasoningConfig of one method run by hand (`gemstill eval reasoning`): sc's samples and temperature, tot
    at one breadth. A bad value raises pydantic's ValidationError, its first error's loc naming the option."""
    return ReasoningConfig(
        methods=[method],
        prompt=prompt,
        shots=shots,
        limit=limit,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        sc=SelfConsistencyConfig(samples=samples, temperature=temperature),
        tot=ToTConfig(breadths=[breadth]),
    )


@dataclasses.dataclass(frozen=True)
class FileEvaluation:
    """One method of one model on a problem source: a result per kind, in the problems' order, and every record."""

    results: dict[str, MethodResult]  # kind -> result
    records: list[dict[str, Any]]  # MethodResult.to_json()'s records, kind after kind

    @property
    def correct(self) -> int:
        return sum(r["correct"] for r in self.records)

    @property
    def total(self) -> int:
        return len(self.records)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_json(self) -> dict[str, Any]:
        """The `--json` shape: accuracy, correct, total and every record."""
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "records": self.records}


def evaluate_file(
    model: str | TextModel,
    problems: str,
    method: str,
    config: ReasoningConfig,
    breadth: int | None = None,
    loading: Callable[[str], contextlib.AbstractContextManager[Any]] = lambda what: contextlib.nullcontext(),
) -> FileEvaluation:
    """`method` on `problems` (a jsonl file or `generated`, the first config.limit of each kind) with a model spec
    (loaded under `loading("loading SPEC")`, e.g. a spinner) or a TextModel; tot (at `breadth`, default the
    config's first) scores only the Game-of-24 problems. Refuses a chat prompt for a model without a chat
    template before anything runs."""
    chosen = resolve_problems(problems, config.limit)
    if method == "tot":
        chosen = [p for p in chosen if p.kind == "game24"]
        if not chosen:
            raise GemstillError(f"{problems}: no Game-of-24 problems for --method tot; use cot or sc for the others")
    if isinstance(model, str):
        with loading(f"loading {model}"):
            model = load_text_model(model, model, batch_size=config.batch_size)
    model.render("check", config.prompt)  # refuses a chat prompt for a model without a chat template
    by_kind: dict[str, list[ReasoningProblem]] = {}
    for problem in chosen:
        by_kind.setdefault(problem.kind, []).append(problem)
    breadth = config.tot.breadths[0] if breadth is None else breadth
    results = {kind: run_method(model, group, method, config, breadth) for kind, group in by_kind.items()}
    records = [record for result in results.values() for record in result.to_json()["records"]]
    return FileEvaluation(results, records)
