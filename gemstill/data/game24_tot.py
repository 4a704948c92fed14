"""The Game-of-24 thought language of tree-of-thought search (Yao et al. 2023): a state is the numbers left, a
step "a op b = c (left: ...)" replaces two of them by their result, and a value word judges whether a state can
still reach 24. The corpus teaches it (exercises) and the search speaks it, so both read and write these texts.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from collections.abc import Sequence
from fractions import Fraction

from gemstill.data.generated import Problem, game24_numbers, reaches_24, show_number

VALUE_WORDS: dict[str, float] = {"sure": 20.0, "likely": 1.0, "impossible": 0.001}  # the paper's weights
_NUMBER = r"\(?\s*\d+(?:\s*/\s*\d+)?\s*\)?"
_STEP = re.compile(rf"^\s*({_NUMBER})\s*([-+*/x×])\s*({_NUMBER})\s*=\s*({_NUMBER})\s*\(\s*left\s*:\s*([^)]*)\)")


@dataclasses.dataclass(frozen=True)
class Item:
    """A number of a state and the expression over the puzzle's numbers that makes it."""

    value: Fraction
    expression: str


@dataclasses.dataclass(frozen=True)
class State:
    """The numbers left after some steps, and the steps' texts."""

    items: tuple[Item, ...]
    steps: tuple[str, ...] = ()

    @classmethod
    def start(cls, numbers: Sequence[int]) -> State:
        return cls(tuple(Item(Fraction(n), str(n)) for n in sorted(numbers)))

    @property
    def values(self) -> tuple[Fraction, ...]:
        return tuple(sorted(item.value for item in self.items))

    @property
    def solved(self) -> bool:
        return len(self.items) == 1 and self.items[0].value == 24

    def answer(self) -> str:
        """The final line of a one-number state: "Answer: <expression> = 24" (checked by the verifier)."""
        return f"Answer: {self.items[0].expression} = {show_number(self.items[0].value)}"


def show_numbers(values: Sequence[Fraction]) -> str:
    return " ".join(show_number(v) for v in sorted(values))


def propose_prompt(values: Sequence[Fraction]) -> str:
    return (
        f"Numbers: {show_numbers(values)}\n"
        "Propose next steps for the Game of 24, one per line, as: a op b = c (left: the numbers left)."
    )


def value_prompt(values: Sequence[Fraction]) -> str:
    return f"Numbers: {show_numbers(values)}\nCan these numbers still make 24? Answer sure, likely or impossible."


def _operand(value: Fraction) -> str:
    return show_number(value) if value.denominator == 1 else f"({show_number(value)})"


def _wrap(item: Item) -> str:
    return item.expression if item.expression == show_number(item.value) else f"({item.expression})"


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b if b else None


def step_text(a: Fraction, op: str, b: Fraction, left: Sequence[Fraction]) -> str:
    return f"{_operand(a)} {op} {_operand(b)} = {show_number(_apply(a, op, b))} (left: {show_numbers(left)})"


def _take(items: tuple[Item, ...], value: Fraction, skip: int | None = None) -> int | None:
    return next((i for i, item in enumerate(items) if item.value == value and i != skip), None)


def apply_step(state: State, a: Fraction, op: str, b: Fraction) -> State | None:
    """The state after a op b, or None when a or b is not among the numbers left, or b is a zero divisor."""
    i = _take(state.items, a)
    j = None if i is None else _take(state.items, b, skip=i)
    result = _apply(a, op, b)
    if i is None or j is None or result is None or result < 0:
        return None
    rest = tuple(item for k, item in enumerate(state.items) if k not in (i, j))
    made = Item(result, f"{_wrap(state.items[i])} {op} {_wrap(state.items[j])}")
    left = tuple(sorted((*rest, made), key=lambda item: item.value))
    return State(left, (*state.steps, step_text(a, op, b, [item.value for item in left])))


def _fraction(text: str) -> Fraction:
    return Fraction(text.replace("(", "").replace(")", "").replace(" ", ""))


def parse_step(line: str, state: State) -> State | None:
    """The state a proposed line leads to, or None unless it is a well-formed step on numbers the state has, its
    result is right, and its "left" list is exactly what remains: a proposal is never trusted, only checked."""
    match = _STEP.match(line)
    if match is None:
        return None
    a_text, op, b_text, result_text, left_text = match.groups()
    op = "*" if op in ("x", "×") else op
    try:
        a, b, result = _fraction(a_text), _fraction(b_text), _fraction(result_text)
        left = sorted(_fraction(t) for t in re.findall(r"\d+(?:/\d+)?", left_text))
    except (ValueError, ZeroDivisionError):
        return None
    after = apply_step(state, a, op, b)
    if after is None or result != _apply(a, op, b) or list(after.values) != left:
        return None
    return after


def all_steps(state: State) -> list[State]:
    """Every distinct next state (no negative numbers), each reached by its first step in a fixed order."""
    seen: dict[tuple[Fraction, ...], State] = {}
    for i, j in itertools.combinations(range(len(state.items)), 2):
        x, y = sorted((state.items[i].value, state.items[j].value), reverse=True)
        for a, op, b in ((x, "+", y), (x, "*", y), (x, "-", y), (x, "/", y), (y, "/", x)):
            after = apply_step(state, a, op, b)
            if after is not None:
                seen.setdefault(after.values, after)
    return list(seen.values())


def can_reach_24(values: Sequence[Fraction]) -> bool:
    return reaches_24(tuple(sorted(values)))


def parse_value(text: str) -> float:
    """The weight of the first value word in a valuer's output (unknown text counts as impossible)."""
    match = re.search(r"\b(sure|likely|impossible)\b", text.lower())
    return VALUE_WORDS[match.group(1)] if match else VALUE_WORDS["impossible"]


def exercises(problem: Problem, rng: random.Random, max_steps: int = 8) -> list[list[dict[str, str]]]:
    """Chats that teach the language on one puzzle: along a path to 24, at each state a propose exercise (up to
    `max_steps` valid steps, the path's among them) and value exercises for a reachable and a dead next state."""
    state = State.start(game24_numbers(problem))
    chats: list[list[dict[str, str]]] = []
    while len(state.items) > 1:
        children = all_steps(state)
        good = [c for c in children if can_reach_24(c.values)]
        dead = [c for c in children if not can_reach_24(c.values)]
        chosen = rng.choice(good)
        shown = [chosen, *rng.sample([c for c in children if c is not chosen], min(max_steps - 1, len(children) - 1))]
        rng.shuffle(shown)
        chats.append(_chat(propose_prompt(state.values), "\n".join(c.steps[-1] for c in shown)))
        for child in [chosen, *rng.sample(dead, min(1, len(dead)))]:
            word = "sure" if can_reach_24(child.values) else "impossible"
            chats.append(_chat(value_prompt(child.values), word))
        state = chosen
    return chats


def _chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "model", "content": answer}]
