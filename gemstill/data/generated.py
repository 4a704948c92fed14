"""Generated corpora whose answers code can check: multi-step arithmetic word problems and Game-of-24 puzzles.

Problem i of a kind comes from its own random generator seeded by (kind, seed, i), and ids are derived from the
content, so raising a count only appends problems and the held-out split (a hash of the id) never moves.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import ClassVar, Literal, TypedDict

from gemstill.data.config import MAX_GAME24, GeneratedCorpusConfig


class Problem(TypedDict):
    id: str  # stable, derived from the content
    kind: Literal["arithmetic", "basic", "game24", "sum", "difference", "product", "units"]
    question: str
    solution: str  # step-by-step, ending in a line "Answer: ..."
    answer: str  # the final answer: an integer, or a Game-of-24 expression


def generate(config: GeneratedCorpusConfig) -> list[Problem]:
    """All problems of the configured corpus: arithmetic first, then Game of 24, then the basic problems."""
    return (
        arithmetic_problems(config.arithmetic, config.seed)
        + game24_problems(config.game24, config.seed)
        + basic_problems(config.basic, config.seed)
    )


def stable_unit(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone: for splits that stay put whatever else is in the corpus."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def is_heldout(problem: Problem, fraction: float) -> bool:
    """Whether a problem belongs to the held-out evaluation set (decided by its id alone)."""
    return stable_unit(f"heldout:{problem['id']}") < fraction


def final_answer(text: str) -> str | None:
    """The text after the last line's "Answer:" prefix, or None when no line starts with it."""
    answers = [
        line.strip()[len("Answer:") :].strip() for line in text.splitlines() if line.strip().startswith("Answer:")
    ]
    return answers[-1] if answers else None


def verify(problem: Problem, answer_text: str) -> bool:
    """Whether a model's output (anything ending in an "Answer:" line) answers the problem correctly."""
    answer = final_answer(answer_text)
    return answer is not None and _VERIFIERS[problem["kind"]](problem, answer)


def _unique(make: Callable[[random.Random], Problem | None], kind: str, count: int, seed: int) -> list[Problem]:
    """The first `count` distinct problems from the stream make(rng_0), make(rng_1), ... (None: skip)."""
    problems: dict[str, Problem] = {}
    index = 0
    while len(problems) < count:
        problem = make(random.Random(f"{kind}:{seed}:{index}"))
        if problem is not None:
            problems.setdefault(problem["id"], problem)
        index += 1
    return list(problems.values())


# --- arithmetic word problems -------------------------------------------------------------------------------

_NAMES = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"), ("Omar", "he")]
_NAMES += [("Lena", "she"), ("Sam", "he"), ("Ines", "she"), ("Ravi", "he"), ("Yuki", "she"), ("Tom", "he")]
_ITEMS = ["notebooks", "pens", "apples", "stickers", "candles", "mugs", "socks", "books"]
_THINGS = ["marbles", "cards", "crayons", "shells", "stamps", "beads"]
_PLANTS = ["tulips", "tomato plants", "roses", "carrots", "sunflowers"]
_VEHICLES = ["A train", "A bus", "A cyclist", "A car", "A boat"]
_GIFTS = ["a game", "a kite", "a book", "a ball", "a puzzle"]


class _Steps:
    """Records solution lines "label: a op b = c", computing c in code so every line is right by construction."""

    _OPS: ClassVar[dict[str, Callable[[int, int], Fraction]]] = {
        "+": lambda a, b: Fraction(a + b),
        "-": lambda a, b: Fraction(a - b),
        "*": lambda a, b: Fraction(a * b),
        "/": lambda a, b: Fraction(a, b),
    }

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.value = 0

    def __call__(self, label: str, a: int, op: str, b: int) -> int:
        value = self._OPS[op](a, b)
        if value < 0 or value.denominator != 1:
            raise ValueError(f"template bug: {a} {op} {b} = {value} is not a natural number")
        self.value = int(value)
        self.lines.append(f"{label}: {a} {op} {b} = {self.value}")
        return self.value


def _shopping(rng: random.Random, s: _Steps) -> str:
    (name, pronoun), (item1, item2) = rng.choice(_NAMES), rng.sample(_ITEMS, 2)
    n1, p1, n2, p2 = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 6), rng.randint(2, 9)
    two_items, pays = rng.choice([(True, True), (True, False), (False, True)])
    total = s(f"Cost of the {item1}", n1, "*", p1)
    question = f"{name} buys {n1} {item1} at {p1} dollars each"
    if two_items:
        cost2 = s(f"Cost of the {item2}", n2, "*", p2)
        total = s("Total cost", total, "+", cost2)
        question += f" and {n2} {item2} at {p2} dollars each"
    if not pays:
        return question + f". How many dollars does {pronoun} spend?"
    bill = next(b for b in (20, 50, 100, 200) if b > total)
    s("Change", bill, "-", total)
    return (
        question
        + f". {pronoun.capitalize()} pays with a {bill} dollar bill. How many dollars of change does {pronoun} get?"
    )


def _travel(rng: random.Random, s: _Steps) -> str:
    vehicle = rng.choice(_VEHICLES)
    v1, h1, v2, h2 = rng.randint(10, 60), rng.randint(2, 5), rng.randint(10, 60), rng.randint(1, 4)
    question = f"{vehicle} travels at {v1} km per hour for {h1} hours, then at {v2} km per hour for {h2} hours."
    first = s("First part", v1, "*", h1)
    second = s("Second part", v2, "*", h2)
    total = s("Distance so far", first, "+", second)
    if rng.random() < 0.5:
        return question + " How many km does it travel in all?"
    trip = total + rng.randint(5, 60)
    s("Distance still to go", trip, "-", total)
    return question + f" The whole trip is {trip} km. How many km are left?"


def _sharing(rng: random.Random, s: _Steps) -> str:
    (name, pronoun), thing = rng.choice(_NAMES), rng.choice(_THINGS)
    friends, each = rng.randint(2, 6), rng.randint(3, 12)
    total = friends * each
    per_box = rng.randint(2, min(9, total - 1))
    boxes = rng.randint(1, (total - 1) // per_box)
    extra = total - boxes * per_box
    question = (
        f"{name} has {boxes} boxes of {per_box} {thing} and finds {extra} more. "
        f"{pronoun.capitalize()} shares them equally among {friends} friends."
    )
    in_boxes = s(f"{thing.capitalize()} in the boxes", boxes, "*", per_box)
    together = s(f"All the {thing}", in_boxes, "+", extra)
    share = s("Each friend gets", together, "/", friends)
    if rng.random() < 0.5:
        return question + f" How many {thing} does each friend get?"
    lost = rng.randint(1, share - 1)
    s("Each friend keeps", share, "-", lost)
    return question + f" Each friend then loses {lost} of them. How many {thing} does each friend keep?"


def _savings(rng: random.Random, s: _Steps) -> str:
    (name, pronoun), gift = rng.choice(_NAMES), rng.choice(_GIFTS)
    weekly, weeks = rng.randint(3, 15), rng.randint(2, 8)
    money = s("Money saved", weekly, "*", weeks)
    question = f"{name} saves {weekly} dollars a week for {weeks} weeks"
    if rng.random() < 0.5:
        start = rng.randint(5, 40)
        money = s("Money in all", start, "+", money)
        question = f"{name} has {start} dollars and saves {weekly} more dollars a week for {weeks} weeks"
    price = rng.randint(2, money - 1)
    money = s("Money after buying", money, "-", price)
    question += f", then spends {price} dollars on {gift}."
    if rng.random() < 0.5:
        return question + f" How many dollars does {pronoun} have left?"
    gift_money = rng.randint(2, 30)
    s("Money at the end", money, "+", gift_money)
    return (
        question + f" Then {pronoun} gets {gift_money} dollars as a present. How many dollars does {pronoun} have now?"
    )


def _garden(rng: random.Random, s: _Steps) -> str:
    plant = rng.choice(_PLANTS)
    rows, per_row = rng.randint(2, 9), rng.randint(3, 12)
    planted = s(f"{plant.capitalize()} planted", rows, "*", per_row)
    dried = rng.randint(1, planted - 1)
    alive = s(f"{plant.capitalize()} still growing", planted, "-", dried)
    question = f"A garden has {rows} rows of {per_row} {plant}. {dried} of them dry out."
    if rng.random() < 0.5:
        return question + f" How many {plant} are still growing?"
    new = rng.randint(2, 20)
    s(f"{plant.capitalize()} now", alive, "+", new)
    return question + f" Then {new} new {plant} are planted. How many {plant} are there now?"


def _reading(rng: random.Random, s: _Steps) -> str:
    name, pronoun = rng.choice(_NAMES)
    per_day, days = rng.randint(5, 30), rng.randint(2, 7)
    pages_read = s("Pages read", per_day, "*", days)
    question = f"{name} reads {per_day} pages a day for {days} days"
    if rng.random() < 0.5:
        weekend = rng.randint(5, 40)
        pages_read = s("Pages read in all", pages_read, "+", weekend)
        question += f" and {weekend} pages on the weekend"
    more_days = rng.randint(1, 6)
    pages = pages_read + per_day * more_days
    left = s("Pages left", pages, "-", pages_read)
    question += f". The book has {pages} pages."
    if rng.random() < 0.5:
        return question + " How many pages are left?"
    s("Days to finish", left, "/", per_day)
    return question + f" Reading {per_day} pages a day, how many more days does {pronoun} need to finish it?"


def _baking(rng: random.Random, s: _Steps) -> str:
    bag, bags = rng.randint(2, 6), rng.randint(2, 10)
    rest = bag * bags
    per_batch = rng.randint(3, 12)
    batches = rest // per_batch + rng.randint(1, 3)
    baked = s("Cookies baked", batches, "*", per_batch)
    sold = baked - rest
    left = s("Cookies left", baked, "-", sold)
    s("Bags", left, "/", bag)
    return (
        f"A baker makes {batches} batches of {per_batch} cookies and sells {sold} of them. "
        f"The rest are packed in bags of {bag}. How many bags are filled?"
    )


_TEMPLATES = [_shopping, _travel, _sharing, _savings, _garden, _reading, _baking]


def _arithmetic(rng: random.Random) -> Problem:
    steps = _Steps()
    question = rng.choice(_TEMPLATES)(rng, steps)
    answer = str(steps.value)
    return Problem(
        id="arithmetic-" + hashlib.sha256(question.encode()).hexdigest()[:12],
        kind="arithmetic",
        question=question,
        solution="\n".join([*steps.lines, f"Answer: {answer}"]),
        answer=answer,
    )


def arithmetic_problems(count: int, seed: int) -> list[Problem]:
    """`count` distinct word problems of 2-4 steps each."""
    return _unique(_arithmetic, "arithmetic", count, seed)


def _verify_arithmetic(problem: Problem, answer: str) -> bool:
    match = re.fullmatch(r"(-?\d+)\.?", answer.replace(",", ""))
    return match is not None and int(match.group(1)) == int(problem["answer"])


# --- basic problems: one or two steps on single-digit numbers -------------------------------------------------

_GAINS = ["finds", "gets", "buys", "picks"]
_LOSSES = ["gives away", "loses", "eats", "sells"]


def _basic(rng: random.Random) -> Problem:
    """ "Leo has 3 cards. He finds 5 more and loses 2. How many cards does he have now?": the facts a small model
    can learn in minutes (sums to 18, differences of them), so a tiny teacher's reasoning is measurable."""
    (name, pronoun), thing = rng.choice(_NAMES), rng.choice(_THINGS + _ITEMS)
    steps = _Steps()
    start = rng.randint(2, 9)  # "has 1 cards" reads wrong
    question = f"{name} has {start} {thing}."
    value, clauses = start, []
    for _ in range(rng.randint(1, 2)):
        if value > 1 and rng.random() < 0.5:
            amount = rng.randint(1, min(9, value - 1))
            clauses.append(f"{rng.choice(_LOSSES)} {amount}")
            value = steps(f"{thing.capitalize()} left", value, "-", amount)
        else:
            amount = rng.randint(1, 9)
            clauses.append(f"{rng.choice(_GAINS)} {amount} more")
            value = steps(f"{thing.capitalize()} now", value, "+", amount)
    question += f" {pronoun.capitalize()} {' and '.join(clauses)}. How many {thing} does {pronoun} have now?"
    answer = str(value)
    return Problem(
        id="basic-" + hashlib.sha256(question.encode()).hexdigest()[:12],
        kind="basic",
        question=question,
        solution="\n".join([*steps.lines, f"Answer: {answer}"]),
        answer=answer,
    )


def basic_problems(count: int, seed: int) -> list[Problem]:
    """`count` distinct problems of one or two single-digit additions or subtractions."""
    return _unique(_basic, "basic", count, seed)


# --- everyday problems: one step, small numbers, for a small pretrained teacher ------------------------------------

EVERYDAY_KINDS = ("sum", "difference", "product", "units")
_UNITS = [("weeks", "days", 7), ("dozens of eggs", "eggs", 12), ("years", "months", 12), ("hands", "fingers", 5)]


def _everyday(kind: str) -> Callable[[random.Random], Problem]:
    """One-step word problems a 270M base model solves from a few worked examples of the same kind (measured:
    most sums and products, about half of the differences and unit conversions; two-step problems almost never)."""

    def make(rng: random.Random) -> Problem:
        (name, pronoun), thing = rng.choice(_NAMES), rng.choice(_THINGS + _ITEMS)
        steps = _Steps()
        ask = f"How many {thing} does {pronoun} have now?"
        if kind == "sum":
            a, b = rng.randint(2, 9), rng.randint(1, 9)
            question = f"{name} has {a} {thing}. {pronoun.capitalize()} gets {b} more. {ask}"
            steps(f"{thing.capitalize()} now", a, "+", b)
        elif kind == "difference":
            b = rng.randint(1, 9)
            a = b + rng.randint(1, 9)
            question = f"{name} has {a} {thing}. {pronoun.capitalize()} gives away {b}. {ask}"
            steps(f"{thing.capitalize()} left", a, "-", b)
        elif kind == "product":
            a, b = rng.randint(2, 5), rng.randint(2, 9)
            question = f"{name} buys {a} boxes with {b} {thing} in each box. How many {thing} does {pronoun} buy?"
            steps(f"{thing.capitalize()} bought", a, "*", b)
        else:
            (big, small, per), a = rng.choice(_UNITS), rng.randint(2, 6)
            question = f"How many {small} are in {a} {big}?"
            steps(f"{small.capitalize()}", a, "*", per)
        answer = str(steps.value)
        return Problem(
            id=f"{kind}-" + hashlib.sha256(question.encode()).hexdigest()[:12],
            kind=kind,
            question=question,
            solution="\n".join([*steps.lines, f"Answer: {answer}"]),
            answer=answer,
        )

    return make


def everyday_problems(count: int, seed: int, kind: str) -> list[Problem]:
    """`count` distinct one-step problems of an everyday kind (sum, difference, product, units)."""
    return _unique(_everyday(kind), kind, count, seed)


# --- Game of 24 -----------------------------------------------------------------------------------------------

_Item = tuple[Fraction, str]  # a value and the expression that makes it


def show_number(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _operand(value: Fraction) -> str:
    return show_number(value) if value.denominator == 1 else f"({show_number(value)})"


def _wrap(item: _Item) -> str:
    """An item's expression, in parentheses unless it is a bare number."""
    value, expr = item
    return expr if expr == show_number(value) else f"({expr})"


def _moves(items: list[_Item]) -> Iterator[tuple[_Item, str, _Item, Fraction, list[_Item]]]:
    """Every way to replace two items x, y by x op y, as (x, op, y, value, the other items); no negative values."""
    for i, j in itertools.combinations(range(len(items)), 2):
        a, b = sorted((items[i], items[j]), key=lambda item: item[0], reverse=True)
        rest = [items[k] for k in range(len(items)) if k not in (i, j)]
        yield a, "+", b, a[0] + b[0], rest
        yield a, "*", b, a[0] * b[0], rest
        yield a, "-", b, a[0] - b[0], rest
        if b[0]:
            yield a, "/", b, a[0] / b[0], rest
        if b[0] and a[0] != b[0]:
            yield b, "/", a, b[0] / a[0], rest


@functools.cache
def reaches_24(values: tuple[Fraction, ...]) -> bool:
    """Whether these numbers (sorted) can make 24 with + - * /, each used once."""
    if len(values) == 1:
        return values[0] == 24
    items = [(value, "") for value in values]
    return any(reaches_24(_key([*rest, (value, "")])) for _, _, _, value, rest in _moves(items))


def _key(items: list[_Item]) -> tuple[Fraction, ...]:
    return tuple(sorted(value for value, _ in items))


def _left(items: list[_Item]) -> str:
    return " ".join(show_number(value) for value in _key(items))


def _game24(rng: random.Random, max_dead_ends: int = 2) -> Problem | None:
    """A solvable puzzle with a search trace: a few dead-end first steps, then the path to 24."""
    numbers = sorted(rng.randint(1, 13) for _ in range(4))
    items = [(Fraction(n), str(n)) for n in numbers]
    if not reaches_24(_key(items)):
        return None
    lines = ["Combine two numbers at a time until one number is left, and drop choices that cannot reach 24."]
    dead_ends = 0
    while len(items) > 1:
        moves = list(_moves(items))
        rng.shuffle(moves)
        for x, op, y, value, rest in moves:
            new = [*rest, (value, f"{_wrap(x)} {op} {_wrap(y)}")]
            text = f"{_operand(x[0])} {op} {_operand(y[0])} = {show_number(value)}"
            if reaches_24(_key(new)):
                lines.append(f"try {text}, left {_left(new)} -> {'possible' if len(new) > 1 else 'reached 24'}")
                items = new
                break
            if len(items) == 4 and dead_ends < max_dead_ends:
                dead_ends += 1
                lines.append(f"try {text}, left {_left(new)} -> impossible")
    expression = items[0][1]
    lines.append(f"Answer: {expression} = 24")
    shown = " ".join(map(str, numbers))
    return Problem(
        id="game24-" + "-".join(map(str, numbers)),
        kind="game24",
        question=f"Use {shown} to make 24 with +, -, * and /, using each number exactly once.",
        solution="\n".join(lines),
        answer=expression,
    )


def game24_problems(count: int, seed: int) -> list[Problem]:
    """`count` distinct solvable puzzles (numbers 1..13; at most MAX_GAME24 of them)."""
    if count > MAX_GAME24:
        raise ValueError(f"at most {MAX_GAME24} Game-of-24 puzzles can be drawn, not {count}")
    return _unique(_game24, "game24", count, seed)


class _Expression:
    """A recursive-descent reader of + - * / ( ) over natural numbers, with exact fractions and no eval()."""

    def __init__(self, text: str) -> None:
        self.tokens = re.findall(r"\d+|\S", text)
        self.pos = 0
        self.numbers: list[int] = []

    def value(self) -> Fraction:
        result = self._sum()
        if self.pos != len(self.tokens):
            raise ValueError("trailing input")
        return result

    def _peek(self) -> str:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ""

    def _take(self) -> str:
        token = self._peek()
        self.pos += 1
        return token

    def _sum(self) -> Fraction:
        result = self._product()
        while self._peek() in ("+", "-"):
            op, right = self._take(), self._product()
            result = result + right if op == "+" else result - right
        return result

    def _product(self) -> Fraction:
        result = self._atom()
        while self._peek() in ("*", "/"):
            op, right = self._take(), self._atom()
            result = result * right if op == "*" else result / right  # ZeroDivisionError on x / 0
        return result

    def _atom(self) -> Fraction:
        token = self._take()
        if token == "(":
            result = self._sum()
            if self._take() != ")":
                raise ValueError("unbalanced parenthesis")
            return result
        if not token.isdigit():
            raise ValueError(f"unexpected {token!r}")
        self.numbers.append(int(token))
        return Fraction(int(token))


def game24_numbers(problem: Problem) -> list[int]:
    """The four numbers of a puzzle, read back from its question."""
    match = re.match(r"Use (\d+) (\d+) (\d+) (\d+) to make 24", problem["question"])
    if match is None:
        raise ValueError(f"{problem['id']}: not a Game-of-24 question")
    return sorted(map(int, match.groups()))


def _verify_game24(problem: Problem, answer: str) -> bool:
    expression = re.sub(r"=\s*24\s*\.?$", "", answer.strip())
    reader = _Expression(expression)
    try:
        value = reader.value()
    except (ValueError, ZeroDivisionError):
        return False
    return value == 24 and sorted(reader.numbers) == game24_numbers(problem)


_VERIFIERS: dict[str, Callable[[Problem, str], bool]] = {
    "arithmetic": _verify_arithmetic,
    "basic": _verify_arithmetic,
    "game24": _verify_game24,
    **dict.fromkeys(EVERYDAY_KINDS, _verify_arithmetic),
}
