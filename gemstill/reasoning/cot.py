"""Chain of thought: greedy decoding of one worked solution, or self-consistency's majority over k samples."""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence

from gemstill.reasoning.config import PromptStyle
from gemstill.reasoning.models import TextModel
from gemstill.reasoning.problems import ReasoningProblem, check, normalized
from gemstill.reasoning.records import MethodResult, Record
from gemstill.sampler import SamplingParams


def few_shot_prefix(examples: Sequence[ReasoningProblem]) -> str:
    """Worked examples in the plain Question/Solution format, each solution ending in its "Answer:" line."""
    return "".join(f"Question: {p.question}\nSolution:\n{p.solution}\n\n" for p in examples)


def _trim(output: str, style: PromptStyle) -> str:
    """A few-shot completion runs on into an invented next question: keep the solution only."""
    return output.split("\nQuestion:", 1)[0].strip() if style == "few-shot" else output.strip()


def prompts_for(model: TextModel, problems: Sequence[ReasoningProblem], style: PromptStyle, prefix: str) -> list[str]:
    return [model.render(p.question, style, prefix) for p in problems]


def chain_of_thought(
    model: TextModel,
    problems: Sequence[ReasoningProblem],
    style: PromptStyle = "chat",
    prefix: str = "",
    max_new_tokens: int = 96,
) -> MethodResult:
    """Greedy CoT: every problem in batched generate calls, each output checked by code."""
    prompts = prompts_for(model, problems, style, prefix)
    started = time.perf_counter()
    completions = model.complete(prompts, SamplingParams(max_new_tokens=max_new_tokens))
    share = (time.perf_counter() - started) / max(len(problems), 1)
    records = []
    for problem, prompt, completion in zip(problems, prompts, completions, strict=True):
        output = _trim(completion.text, style)
        answer, correct = check(problem, output)
        records.append(Record(problem.id, prompt, output, answer, correct, completion.tokens, share))
    return MethodResult("cot", records)


def majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-empty answer; ties go to the one reached first. None when no sample answered."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def self_consistency(
    model: TextModel,
    problems: Sequence[ReasoningProblem],
    samples: int,
    temperature: float,
    style: PromptStyle = "chat",
    prefix: str = "",
    max_new_tokens: int = 96,
    top_k: int | None = None,
    seed: int = 0,
) -> MethodResult:
    """k chains per problem at `temperature` (all in the same batched calls), majority vote over their final
    answers in normalized form; the problem counts as solved when the voted answer checks."""
    prompts = prompts_for(model, problems, style, prefix)
    repeated = [prompt for prompt in prompts for _ in range(samples)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    started = time.perf_counter()
    completions = model.complete(repeated, params)
    share = (time.perf_counter() - started) / max(len(problems), 1)
    records = []
    for index, (problem, prompt) in enumerate(zip(problems, prompts, strict=True)):
        group = completions[index * samples : (index + 1) * samples]
        outputs = [_trim(c.text, style) for c in group]
        checked = [check(problem, output) for output in outputs]
        votes = [normalized(problem, answer) for answer, _ in checked]
        winner = majority(votes)
        chosen = votes.index(winner) if winner is not None else 0
        answer, correct = checked[chosen] if winner is not None else (None, False)
        records.append(
            Record(
                problem.id,
                prompt,
                outputs[chosen],
                answer,
                correct,
                sum(c.tokens for c in group),
                share,
                {"votes": dict(collections.Counter(v for v in votes if v is not None)), "samples": samples},
            )
        )
    return MethodResult("sc", records)
