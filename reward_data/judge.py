"""Programmatic gold judge for the arithmetic word problems in ``tasks.py``.

Standard library only, deterministic, no side effects on import beyond
importing the sibling ``tasks.py`` by file path (reused if it is already
imported as ``tasks`` from that file, else registered in ``sys.modules`` as
``_reward_data_tasks``, as any import is); ``sys.path`` is not changed, so a
different ``tasks`` module elsewhere on the path can never be picked up.

Public API:
    gold_score(prompt, response, answer) -> float
    gold_breakdown(prompt, response, answer) -> dict   the four parts and total
    judge_pair(prompt, a, b, answer) -> int            1: a better, -1: b better, 0: tie

``prompt`` is the question text. It is accepted so the signature matches a
reward function; no rule reads it. ``answer`` is the problem's integer answer.

Rules (the score is the sum of four parts):

correctness  +2.0   ``tasks.parse_final_answer(response) == answer``: the last
                    "The answer is N" in the response (case-sensitive) gives
                    ``answer``. Otherwise 0.
format       +0.5   The phrase "The answer is" occurs exactly once, and
                    ``response.rstrip()`` ends with the sentence
                    "The answer is N." (a single space before N, N an integer
                    as ``parse_final_answer`` reads it, then a period), which
                    stands at the start of the text or after whitespace.
                    N need not be correct. Otherwise 0.
shows work   +0.25  The response contains at least one expression
                    "a <op> b = c" whose result is right: a and b are
                    non-negative integers, c an integer (optional leading
                    minus), op one of + - × ÷ * / x, spaces around op and "="
                    optional. Right means a+b, a-b, a*b equal c, or for ÷ and /
                    b != 0 and a == b*c (exact division). Numbers must stand
                    alone (not glued to letters, digits, or a decimal part),
                    and overlapping chains such as "2 + 3 = 5 + 1 = 6" are
                    checked link by link. Otherwise 0.
length       -0.025 per word beyond 30 words (-0.25 per 10 words), at most
                    -1.0 (reached at 70 words). Words are
                    ``len(response.split())``.

So the best possible score is 2.75 (a correct, well-formatted reference answer
of at most 30 words) and the range is [-1.0, 2.75]. An empty or
whitespace-only response scores 0.0. Every part is a multiple of 0.025; the
total is computed as an integer count of 0.025 units and returned as
``units / 40``, so equal responses give bit-identical floats.

Any ``str`` response is scored without raising. Numbers too long for Python's
``int()`` (over 4,300 digits) simply do not count. A non-``str`` prompt or
response, or a non-``int`` answer, raises ``TypeError``.

``judge_pair`` returns 1 if ``a`` scores higher, -1 if ``b`` scores higher,
and 0 if the scores differ by less than 1e-9.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

_TASKS_MODULE = "_reward_data_tasks"

__all__ = [
    "LENGTH_FREE_WORDS",
    "gold_breakdown",
    "gold_score",
    "judge_pair",
]


def _load_tasks():
    """Import the sibling tasks.py by file path; sys.path is not touched."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks.py")
    for name in ("tasks", _TASKS_MODULE):
        mod = sys.modules.get(name)
        mod_file = getattr(mod, "__file__", None)
        if mod_file and os.path.abspath(mod_file) == path:
            return mod
    spec = importlib.util.spec_from_file_location(_TASKS_MODULE, path)
    if spec is None or spec.loader is None:  # pragma: no cover - file missing
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # dataclasses looks the defining module up in sys.modules, so register it
    # (as the import system does) before running it.
    sys.modules[_TASKS_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_TASKS_MODULE]
        raise
    return module


_tasks = _load_tasks()
parse_final_answer = _tasks.parse_final_answer

# Points, in units of 0.025 (so 40 units == 1.0).
_UNIT = 40
_CORRECT_UNITS = 80      # +2.0
_FORMAT_UNITS = 20       # +0.5
_WORK_UNITS = 10         # +0.25
_PER_WORD_UNITS = 1      # -0.025 per word beyond LENGTH_FREE_WORDS
_MAX_PENALTY_UNITS = 40  # -1.0 at most
LENGTH_FREE_WORDS = 30

_PHRASE = "The answer is"
_FINAL_SENTENCE_RE = re.compile(r"(?:^|(?<=\s))The answer is [-\u2212]?\d+\.\Z")

# Zero-width lookahead so that overlapping chains are all examined.
_WORK_RE = re.compile(
    r"(?=(?<![\w.,])(\d+)\s*([-+\u00d7\u00f7*/x])\s*(\d+)\s*=\s*([-\u2212]?\d+)(?![\w]|[.,]\d))"
)


def _check_types(prompt: object, response: object, answer: object) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be str, not {type(prompt).__name__}")
    if not isinstance(response, str):
        raise TypeError(f"response must be str, not {type(response).__name__}")
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise TypeError(f"answer must be int, not {type(answer).__name__}")


def _correct(response: str, answer: int) -> bool:
    try:
        return parse_final_answer(response) == answer
    except ValueError:  # a number longer than int() accepts
        return False


def _formatted(response: str) -> bool:
    if response.count(_PHRASE) != 1:
        return False
    return _FINAL_SENTENCE_RE.search(response.rstrip()) is not None


def _expression_right(a_s: str, op: str, b_s: str, c_s: str) -> bool:
    try:
        a, b = int(a_s), int(b_s)
        c = int(c_s.replace("\u2212", "-"))
    except ValueError:  # a number longer than int() accepts
        return False
    if op == "+":
        return a + b == c
    if op == "-":
        return a - b == c
    if op in ("\u00d7", "*", "x"):
        return a * b == c
    # "\u00f7" or "/": exact division only
    return b != 0 and a == b * c


def _shows_work(response: str) -> bool:
    return any(_expression_right(*m.groups()) for m in _WORK_RE.finditer(response))


def _length_penalty_units(response: str) -> int:
    extra = len(response.split()) - LENGTH_FREE_WORDS
    if extra <= 0:
        return 0
    return min(_MAX_PENALTY_UNITS, extra * _PER_WORD_UNITS)


def _parts_units(response: str, answer: int) -> dict[str, int]:
    return {
        "correctness": _CORRECT_UNITS if _correct(response, answer) else 0,
        "format": _FORMAT_UNITS if _formatted(response) else 0,
        "work": _WORK_UNITS if _shows_work(response) else 0,
        "length": -_length_penalty_units(response),
    }


def gold_breakdown(prompt: str, response: str, answer: int) -> dict[str, float]:
    """The four parts of ``gold_score`` and their ``total``, as floats."""
    _check_types(prompt, response, answer)
    parts = _parts_units(response, answer)
    out = {k: v / _UNIT for k, v in parts.items()}
    out["total"] = sum(parts.values()) / _UNIT
    return out


def gold_score(prompt: str, response: str, answer: int) -> float:
    """Score ``response`` to ``prompt`` whose integer answer is ``answer``.

    See the module docstring for the rules. Range [-1.0, 2.75].
    """
    _check_types(prompt, response, answer)
    return sum(_parts_units(response, answer).values()) / _UNIT


def judge_pair(prompt: str, a: str, b: str, answer: int) -> int:
    """1 if ``a`` scores higher, -1 if ``b`` does, 0 if within 1e-9 (a tie)."""
    diff = gold_score(prompt, a, answer) - gold_score(prompt, b, answer)
    if abs(diff) < 1e-9:
        return 0
    return 1 if diff > 0 else -1
