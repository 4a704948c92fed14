"""Tree-of-thought breadth-first search on Game of 24 (Yao et al. 2023, section 4.1).

Each level: the model proposes next steps for every kept state (all of a level's proposals, across every
problem, in one batched generate call), code keeps only steps that are well formed and right, the model values
each new state (sure / likely / impossible, sampled n times or read off the value words' likelihoods, again
one batched call), and the b best states per problem go on. After `depth` levels the best one-number state's
expression is the answer, and the verifier, not the model, says whether it makes 24.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

from gemstill.data.game24_tot import VALUE_WORDS, State, parse_step, propose_prompt, value_prompt
from gemstill.errors import GemstillError
from gemstill.reasoning.config import PromptStyle, ToTConfig
from gemstill.reasoning.models import Completion, TextModel
from gemstill.reasoning.problems import ReasoningProblem, check
from gemstill.reasoning.records import MethodResult, Record
from gemstill.sampler import SamplingParams


@dataclasses.dataclass
class _Search:
    problem: ReasoningProblem
    frontier: list[tuple[float, State]]
    tokens: int = 0
    seconds: float = 0.0
    proposed: int = 0
    invalid: int = 0


def _numbers(problem: ReasoningProblem) -> list[int]:
    from gemstill.data.generated import game24_numbers

    return game24_numbers(problem.as_generated())


def _charge(searches: list[_Search], owners: list[int], seconds: float, completions: Sequence) -> None:
    """Split one batched call's wall time over its prompts, and give each search its prompts' tokens."""
    for owner, completion in zip(owners, completions, strict=True):
        searches[owner].seconds += seconds / len(owners)
        searches[owner].tokens += completion.tokens if completion is not None else 0


def _complete(model: TextModel, prompts: list[str], params: SamplingParams, batched: bool, **kw) -> list[Completion]:
    if batched:
        return model.complete(prompts, params, **kw)
    return [c for prompt in prompts for c in model.complete([prompt], params, **kw)]


def _values(
    model: TextModel, states: list[State], settings: ToTConfig, style: PromptStyle, batched: bool, seed: int
) -> tuple[list[float], list[Completion | None]]:
    prompts = [model.render(value_prompt(s.values), style) for s in states]
    if settings.value == "loglik":
        words = list(VALUE_WORDS)
        scores = model.loglik([p for p in prompts for _ in words], [w for _ in prompts for w in words])
        values = []
        for i in range(len(prompts)):
            row = scores[i * len(words) : (i + 1) * len(words)]
            top = max(row)
            weights = [math.exp(s - top) for s in row]
            values.append(sum(w * VALUE_WORDS[word] for w, word in zip(weights, words, strict=True)) / sum(weights))
        return values, [None] * len(prompts)  # scoring generates no tokens
    from gemstill.data.game24_tot import parse_value

    n = settings.value_samples
    params = SamplingParams(max_new_tokens=4, temperature=settings.value_temperature, seed=seed)
    completions = _complete(model, [p for p in prompts for _ in range(n)], params, batched)
    values = [sum(parse_value(c.text) for c in completions[i * n : (i + 1) * n]) for i in range(len(prompts))]
    return values, completions


def tree_of_thought(
    model: TextModel,
    problems: Sequence[ReasoningProblem],
    breadth: int,
    settings: ToTConfig | None = None,
    style: PromptStyle = "chat",
    batched: bool = True,
    seed: int = 0,
) -> MethodResult:
    """ToT with breadth `breadth` on Game-of-24 problems; `batched=False` issues one call per prompt (the
    benchmark's reference loop), with the same results."""
    settings = settings or ToTConfig()
    if breadth < 1:
        raise GemstillError(f"tree-of-thought breadth must be at least 1, got {breadth}")
    others = sorted({p.kind for p in problems if p.kind != "game24"})
    if others:
        raise GemstillError(
            f"tree-of-thought searches Game-of-24 states, not {', '.join(others)} problems; use cot or sc"
        )
    searches = [_Search(p, [(0.0, State.start(_numbers(p)))]) for p in problems]
    propose_params = SamplingParams(max_new_tokens=settings.propose_tokens)
    for level in range(settings.depth):
        pending = [(i, state) for i, s in enumerate(searches) for _, state in s.frontier if len(state.items) > 1]
        if not pending:
            break
        owners = [i for i, _ in pending]
        prompts = [model.render(propose_prompt(state.values), style) for _, state in pending]
        started = time.perf_counter()
        proposals = _complete(model, prompts, propose_params, batched)
        _charge(searches, owners, time.perf_counter() - started, proposals)
        children: dict[int, dict[tuple, State]] = {i: {} for i in range(len(searches))}
        for (owner, state), completion in zip(pending, proposals, strict=True):
            for line in filter(str.strip, completion.text.splitlines()):
                searches[owner].proposed += 1
                child = parse_step(line, state)
                if child is None:
                    searches[owner].invalid += 1
                else:
                    children[owner].setdefault(child.values, child)
        flat = [(owner, child) for owner, found in children.items() for child in found.values()]
        started = time.perf_counter()
        values, completions = _values(model, [c for _, c in flat], settings, style, batched, seed + level)
        repeat = settings.value_samples if settings.value == "sample" else 1
        value_owners = [owner for owner, _ in flat for _ in range(repeat)]
        _charge(searches, value_owners, time.perf_counter() - started, completions)
        for search in searches:
            search.frontier = []
        for (owner, child), value in zip(flat, values, strict=True):
            searches[owner].frontier.append((value, child))
        for search in searches:  # stable: equal values keep proposal order
            search.frontier = sorted(search.frontier, key=lambda vs: -vs[0])[:breadth]
    records = []
    for search in searches:
        finals = [(v, s) for v, s in search.frontier if len(s.items) == 1]
        best = finals[0][1] if finals else (search.frontier[0][1] if search.frontier else None)
        output = "\n".join([*best.steps, best.answer() if len(best.items) == 1 else ""]).strip() if best else ""
        answer, correct = check(search.problem, output) if best and len(best.items) == 1 else (None, False)
        records.append(
            Record(
                search.problem.id,
                propose_prompt(State.start(_numbers(search.problem)).values),
                output,
                answer,
                correct,
                search.tokens,
                search.seconds,
                {
                    "proposed_steps": search.proposed,
                    "invalid_steps": search.invalid,
                    "final_states": len(finals),
                    "any_final_correct": any(check(search.problem, s.answer())[1] for _, s in finals),
                },
            )
        )
    return MethodResult(f"tot-b{breadth}", records)
