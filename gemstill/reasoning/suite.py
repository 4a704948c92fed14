"""The reasoning suite: every configured method on every model, one row per (model, method, kind), with the
records kept beside; what the evaluate_reasoning stage, the nightly flow and `gemstill eval reasoning` share."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gemstill.errors import GemstillError
from gemstill.reasoning.config import ReasoningConfig
from gemstill.reasoning.cot import chain_of_thought, few_shot_prefix, self_consistency
from gemstill.reasoning.models import SamplerModel, TextModel
from gemstill.reasoning.problems import ReasoningProblem, generated_heldout
from gemstill.reasoning.records import MethodResult
from gemstill.reasoning.tot import tree_of_thought


def shots_for(kind: str, count: int, exclude: set[str]) -> list[ReasoningProblem]:
    """Worked examples of a kind for few-shot prompts: generated training problems, never an evaluated one."""
    from gemstill.data.config import GeneratedCorpusConfig
    from gemstill.data.generated import arithmetic_problems, basic_problems, game24_problems
    from gemstill.reasoning.problems import from_generated

    if count == 0:
        return []
    source = {"arithmetic": arithmetic_problems, "gsm8k": arithmetic_problems, "basic": basic_problems}
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


def add_teacher_fraction(rows: list[dict[str, Any]], teacher: str = "teacher") -> None:
    """Each row's accuracy as a fraction of the teacher's on the same method and kind (None when it is 0)."""
    reference = {(r["method"], r["kind"]): r["accuracy"] for r in rows if r["model"] == teacher}
    for row in rows:
        base = reference.get((row["method"], row["kind"]))
        row["fraction_of_teacher"] = row["accuracy"] / base if base else None


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
