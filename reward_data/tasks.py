"""Synthetic grade-school arithmetic word problems with one-sentence worked answers.

Standard library only, deterministic given a seed, no side effects on import.

Public API:
    Problem                 frozen dataclass describing one problem
    make_problem(rng)       one random problem drawn from ``rng``
    make_problems(n, seed)  ``n`` problems, unique by question text
    parse_final_answer(t)   extract N from "The answer is N." (last occurrence)
    ANSWER_FORMAT           description of the reference answer format
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = [
    "ANSWER_FORMAT",
    "OPS",
    "Problem",
    "make_problem",
    "make_problems",
    "parse_final_answer",
]

ANSWER_FORMAT = (
    "A reference answer is two short sentences: first one sentence restating the "
    "problem and showing the arithmetic as 'a <sym> b = N' (sym is '+', '-', "
    "'\u00d7' or '\u00f7'), then the final sentence 'The answer is N.' where N is "
    "the integer answer written in digits. Example: 'Maya starts with 7 apples and "
    "gets 5 more, so 7 + 5 = 12. The answer is 12.'"
)

OPS: tuple[str, ...] = ("add", "sub", "mul", "div")

SYMBOLS = {"add": "+", "sub": "-", "mul": "\u00d7", "div": "\u00f7"}


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    op: str
    operands: tuple[int, int]
    worked: str


# --- vocabulary -------------------------------------------------------------

# (name, pronoun key)
NAMES: tuple[tuple[str, str], ...] = (
    ("Maya", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"),
    ("Priya", "she"), ("Omar", "he"), ("Sofia", "she"), ("Kenji", "he"),
    ("Zara", "she"), ("Mateo", "he"), ("Lena", "she"), ("Samuel", "he"),
    ("Amara", "she"), ("Ivan", "he"), ("Chloe", "she"), ("Diego", "he"),
    ("Alex", "they"), ("Sam", "they"), ("Riley", "they"), ("Jordan", "they"),
)

# Pronoun forms and verb agreement.  "s3" is True for third-person singular
# verbs ("she has", "he gets") and False for singular they ("they have").
PRONOUNS = {
    "she": {"subj": "she", "obj": "her", "poss": "her", "s3": True},
    "he": {"subj": "he", "obj": "him", "poss": "his", "s3": True},
    "they": {"subj": "they", "obj": "them", "poss": "their", "s3": False},
}

# (plural noun, edible)
ITEMS: tuple[tuple[str, bool], ...] = (
    ("apples", True), ("marbles", False), ("stickers", False), ("pencils", False),
    ("cookies", True), ("crayons", False), ("oranges", True), ("seashells", False),
    ("buttons", False), ("candies", True), ("books", False), ("cupcakes", True),
    ("balloons", False), ("strawberries", True), ("toy cars", False),
    ("grapes", True), ("coins", False), ("muffins", True), ("stamps", False),
    ("beads", False),
)

# (plural container, singular container)
CONTAINERS: tuple[tuple[str, str], ...] = (
    ("boxes", "box"), ("bags", "bag"), ("jars", "jar"), ("baskets", "basket"),
)


# --- helpers ----------------------------------------------------------------

class _Who:
    """Grammar helper for one person: name, pronoun and verb agreement."""

    def __init__(self, name: str, pronoun: str) -> None:
        forms = PRONOUNS[pronoun]
        self.name = name
        self.subj = forms["subj"]
        self.Subj = forms["subj"].capitalize()
        self.obj = forms["obj"]
        self.poss = forms["poss"]
        self.s3 = forms["s3"]

    @property
    def does(self) -> str:
        return "does" if self.s3 else "do"

    @property
    def has(self) -> str:
        return "has" if self.s3 else "have"

    def v(self, base: str, third: str) -> str:
        """Present-tense verb agreeing with the pronoun."""
        return third if self.s3 else base


def _worked(setup: str, a: int, b: int, op: str, result: int) -> str:
    return f"{setup}, so {a} {SYMBOLS[op]} {b} = {result}. The answer is {result}."


# --- per-operation generators ----------------------------------------------

def _add(rng: random.Random, who: _Who, item: str, edible: bool) -> Problem:
    a = rng.randint(2, 20)
    b = rng.randint(2, 20)
    c = a + b
    n = who.name
    style = rng.randrange(3)
    if style == 0:
        q = (f"{n} has {a} {item}. {who.Subj} {who.v('get', 'gets')} {b} more. "
             f"How many {item} {who.does} {who.subj} have now?")
        setup = f"{n} starts with {a} {item} and gets {b} more"
    elif style == 1:
        q = (f"{n} buys {a} {item} on Monday and {b} more {item} on Tuesday. "
             f"How many {item} did {who.subj} buy in total?")
        setup = f"{n} buys {a} {item} and then {b} more"
    else:
        q = (f"{n} finds {a} {item} in the morning and finds {b} more in the "
             f"afternoon. How many {item} {who.has} {who.subj} found altogether?")
        setup = f"{n} finds {a} {item} and then {b} more"
    return Problem(q, c, "add", (a, b), _worked(setup, a, b, "add", c))


def _sub(rng: random.Random, who: _Who, item: str, edible: bool) -> Problem:
    a = rng.randint(3, 20)
    b = rng.randint(2, a - 1)  # result is always >= 1, never negative
    c = a - b
    n = who.name
    style = rng.randrange(3)
    if style == 2 and not edible:
        style = rng.randrange(2)
    if style == 0:
        q = (f"{n} has {a} {item} and gives {b} of them to a friend. "
             f"How many {item} {who.does} {who.subj} have left?")
        setup = f"{n} has {a} {item} and gives away {b}"
    elif style == 1:
        q = (f"{n} had {a} {item} but lost {b} of them. "
             f"How many {item} {who.does} {who.subj} have now?")
        setup = f"{n} had {a} {item} and lost {b}"
    else:
        q = (f"There are {a} {item} on the table. {n} eats {b} of them. "
             f"How many {item} are left on the table?")
        setup = f"There are {a} {item} and {n} eats {b}"
    return Problem(q, c, "sub", (a, b), _worked(setup, a, b, "sub", c))


def _mul(rng: random.Random, who: _Who, item: str, edible: bool) -> Problem:
    a = rng.randint(2, 9)
    b = rng.randint(2, 9)
    c = a * b
    n = who.name
    cont_pl, cont_sg = rng.choice(CONTAINERS)
    style = rng.randrange(3)
    if style == 0:
        q = (f"{n} has {a} {cont_pl} with {b} {item} in each {cont_sg}. "
             f"How many {item} {who.does} {who.subj} have in total?")
        setup = f"{n} has {a} {cont_pl} with {b} {item} each"
    elif style == 1:
        q = (f"{n} buys {a} {cont_pl} of {item}. Each {cont_sg} holds {b} {item}. "
             f"How many {item} did {who.subj} buy?")
        setup = f"{n} buys {a} {cont_pl} with {b} {item} each"
    else:
        q = (f"{n} puts {item} in {a} rows with {b} {item} in each row. "
             f"How many {item} are there in all?")
        setup = f"{n} makes {a} rows with {b} {item} each"
    return Problem(q, c, "mul", (a, b), _worked(setup, a, b, "mul", c))


def _div(rng: random.Random, who: _Who, item: str, edible: bool) -> Problem:
    k = rng.randint(2, 9)
    quotient = rng.randint(2, 12)
    total = k * quotient  # exact division by construction
    n = who.name
    cont_pl, cont_sg = rng.choice(CONTAINERS)
    style = rng.randrange(3)
    if style == 0:
        q = (f"{n} has {total} {item} and shares them equally among {k} friends. "
             f"How many {item} does each friend get?")
        setup = f"{n} shares {total} {item} equally among {k} friends"
    elif style == 1:
        q = (f"{n} puts {total} {item} into {k} {cont_pl}, with the same number "
             f"in each {cont_sg}. How many {item} go in each {cont_sg}?")
        setup = f"{n} splits {total} {item} equally into {k} {cont_pl}"
    else:
        q = (f"{n} and {who.poss} friends have {total} {item} to split "
             f"evenly among {k} people. How many {item} does each person get?")
        setup = f"{n} and {who.poss} friends split {total} {item} among {k} people"
    return Problem(q, quotient, "div", (total, k),
                   _worked(setup, total, k, "div", quotient))


_GENERATORS = {"add": _add, "sub": _sub, "mul": _mul, "div": _div}


# --- public API ---------------------------------------------------------------

def make_problem(rng: random.Random, op: str | None = None) -> Problem:
    """Draw one problem from ``rng``.  ``op`` picks the operation (default: random)."""
    if op is None:
        op = rng.choice(OPS)
    if op not in _GENERATORS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    name, pronoun = rng.choice(NAMES)
    item, edible = rng.choice(ITEMS)
    return _GENERATORS[op](rng, _Who(name, pronoun), item, edible)


def make_problems(n: int, seed: int) -> list[Problem]:
    """Return ``n`` problems with distinct question text, deterministic in ``seed``.

    Operations cycle add, sub, mul, div so the mix is as equal as possible
    (counts differ by at most one).
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    max_attempts = 1000 * max(n, 1)
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"could not generate {n} unique problems")
        p = make_problem(rng, OPS[len(out) % len(OPS)])
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


_FINAL_RE = re.compile(r"The answer is\s+([-\u2212]?\d+)(?![.,]?\d)")


def parse_final_answer(text: str) -> int | None:
    """Return N from the last "The answer is N" in ``text``, else None.

    N may be negative and may be followed by a period and/or whitespace.
    Decimals and digit groups ("12.5", "1,000") are not integers here and do
    not match.  Matching is case-sensitive, as in the reference format.
    """
    if not isinstance(text, str):
        return None
    matches = _FINAL_RE.findall(text)
    if not matches:
        return None
    return int(matches[-1].replace("\u2212", "-"))
