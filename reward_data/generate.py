"""Generate the synthetic arithmetic SFT and preference datasets.

Usage (from any directory):
    python reward_data/generate.py [--out DIR] [--seed 1234]

Writes, under DIR:
    sft/train.jsonl      800 chat rows          sft/eval.jsonl     100 chat rows
    prefs/train.jsonl   1200 preference pairs   prefs/eval.jsonl   240 pairs
    prefs/prompts.jsonl  200 prompts with answers (for PPO and evaluation)

The preference and prompt files use new problems, drawn from their own seed
stream, whose question text appears in no other file. Each pair is scored by
the gold judge in judge.py; the chosen side scores strictly higher.
Output is byte-identical for the same seed, whatever PYTHONHASHSEED is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# imported after the sys.path setup above
import judge  # noqa: E402 - after the sys.path insert above
import tasks  # noqa: E402 - after the sys.path insert above

N_TRAIN = 800
N_EVAL = 100
DEFAULT_SEED = 1234

N_PREF_TRAIN = 1200
N_PREF_EVAL = 240
N_PROMPTS = 200


def to_row(p: tasks.Problem) -> dict:
    return {
        "messages": [
            {"role": "user", "content": p.question},
            {"role": "assistant", "content": p.worked},
        ],
        "answer": p.answer,
        "op": p.op,
    }


def split(seed: int, n_train: int = N_TRAIN, n_eval: int = N_EVAL
          ) -> tuple[list[tasks.Problem], list[tasks.Problem]]:
    """Generate unique problems and split them, stratified by op.

    Questions are unique across the whole pool, so the splits are disjoint.
    Each split gets an equal share of every op (when sizes divide evenly).
    """
    n_ops = len(tasks.OPS)
    if n_train % n_ops or n_eval % n_ops:
        raise ValueError(f"split sizes must be multiples of {n_ops}")
    pool = tasks.make_problems(n_train + n_eval, seed)
    by_op: dict[str, list[tasks.Problem]] = {op: [] for op in tasks.OPS}
    for p in pool:
        by_op[p.op].append(p)
    eval_per_op = n_eval // n_ops
    train: list[tasks.Problem] = []
    evals: list[tasks.Problem] = []
    for op in tasks.OPS:
        evals.extend(by_op[op][:eval_per_op])
        train.extend(by_op[op][eval_per_op:])
    rng = random.Random(f"split-{seed}")
    rng.shuffle(train)
    rng.shuffle(evals)
    assert len(train) == n_train and len(evals) == n_eval
    return train, evals


# --- preference data ----------------------------------------------------------

# Corruptions of the reference answer; each pair's chosen side is the
# reference (kind = the corruption) or, for BOTH_FLAWED, the first of two
# corruptions (kind = "<chosen>_vs_<rejected>").
KINDS: tuple[str, ...] = (
    "wrong_result",  # a <sym> b = c+d and "The answer is c+d." (d != 0, small)
    "wrong_final",   # correct working, final sentence says c+d
    "no_final",      # correct working, "The answer is N." sentence dropped
    "wrong_op",      # another operation on the same numbers, consistently
    "verbose",       # 25-45 words of generic filler, then the reference
    "bare",          # just "N." (right number, no "The answer is")
)
BOTH_FLAWED: tuple[tuple[str, str], ...] = (
    ("verbose", "wrong_result"),
    ("verbose", "wrong_final"),
    ("wrong_final", "wrong_result"),
    ("wrong_op", "no_final"),
    ("no_final", "bare"),
    ("wrong_result", "bare"),
)
BOTH_FLAWED_EVERY = 5  # one pair in five has two flawed sides (20%)

DELTAS = (-3, -2, -1, 1, 2, 3)
VERBOSE_MIN_WORDS = 25
VERBOSE_MAX_WORDS = 45

# Filler "reasoning" for the verbose kind, in a sensible order; a random
# subset is used, kept in this order.  No digits except the operands, no
# "a <op> b = c" and no "The answer is".
FILLER: tuple[str, ...] = (
    "Let me read the question carefully before I start.",
    "I want to be sure I understand what is being asked.",
    "First, I will pick out the numbers that matter in the story.",
    "The story gives two numbers, {a} and {b}.",
    "Next, I need to decide which operation fits the situation.",
    "It helps to picture what happens to the items step by step.",
    "I should only use numbers that actually appear in the question.",
    "Working slowly like this makes small mistakes less likely.",
    "Once the operation is clear, the calculation itself is short.",
    "After that, I will check that the result makes sense.",
    "A quick sanity check is to compare the result with the starting amount.",
    "Now I can write out the calculation.",
)

_APPLY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a // b if b and a % b == 0 else None,
}


class FreshProblems:
    """Problems from their own seed stream, never repeating an excluded or
    already drawn question."""

    def __init__(self, seed: int, exclude: set[str]) -> None:
        self.rng = random.Random(f"prefs-{seed}")
        self.seen = set(exclude)

    def draw(self, op: str) -> tasks.Problem:
        for _ in range(100_000):
            p = tasks.make_problem(self.rng, op)
            if p.question not in self.seen:
                self.seen.add(p.question)
                return p
        raise RuntimeError(f"could not draw a new {op} problem")

    def draw_balanced(self, n: int) -> list[tasks.Problem]:
        return [self.draw(tasks.OPS[i % len(tasks.OPS)]) for i in range(n)]


def _setup(p: tasks.Problem) -> str:
    a, b = p.operands
    tail = (f", so {a} {tasks.SYMBOLS[p.op]} {b} = {p.answer}. "
            f"The answer is {p.answer}.")
    assert p.worked.endswith(tail), p.worked
    return p.worked[: -len(tail)]


def _say(p: tasks.Problem, op: str, result: int, final: int | None) -> str:
    a, b = p.operands
    text = f"{_setup(p)}, so {a} {tasks.SYMBOLS[op]} {b} = {result}."
    if final is not None:
        text += f" The answer is {final}."
    return text


def _off_by(rng: random.Random, value: int) -> int:
    return value + rng.choice([d for d in DELTAS if value + d >= 1])


def _filler(rng: random.Random, p: tasks.Problem) -> str:
    a, b = p.operands
    sentences = [s.format(a=a, b=b) for s in FILLER]
    target = rng.randint(VERBOSE_MIN_WORDS, VERBOSE_MAX_WORDS)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    picked: list[int] = []
    words = 0
    for i in order:
        w = len(sentences[i].split())
        if words + w <= VERBOSE_MAX_WORDS:
            picked.append(i)
            words += w
        if words >= target:
            break
    assert VERBOSE_MIN_WORDS <= words <= VERBOSE_MAX_WORDS, words
    return " ".join(sentences[i] for i in sorted(picked))


def respond(kind: str, p: tasks.Problem, rng: random.Random) -> str | None:
    """The response of ``kind`` to ``p`` ("reference" or one of KINDS);
    None if the kind is impossible for this problem."""
    c = p.answer
    if kind == "reference":
        return p.worked
    if kind == "wrong_result":
        wrong = _off_by(rng, c)
        return _say(p, p.op, wrong, wrong)
    if kind == "wrong_final":
        return _say(p, p.op, c, _off_by(rng, c))
    if kind == "no_final":
        return _say(p, p.op, c, None)
    if kind == "wrong_op":
        a, b = p.operands
        options = []
        for op in tasks.OPS:
            r = _APPLY[op](a, b)
            if op != p.op and r is not None and r >= 0 and r != c:
                options.append((op, r))
        if not options:
            return None
        op, r = rng.choice(options)
        return _say(p, op, r, r)
    if kind == "verbose":
        return f"{_filler(rng, p)} {p.worked}"
    if kind == "bare":
        return f"{c}."
    raise ValueError(f"unknown kind {kind!r}")


def kind_schedule(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` (chosen kind, rejected kind) pairs, as even as possible, shuffled."""
    n_both = n // BOTH_FLAWED_EVERY
    plan: list[tuple[str, str]] = []
    for combos, count in (([("reference", k) for k in KINDS], n - n_both),
                          (list(BOTH_FLAWED), n_both)):
        q, r = divmod(count, len(combos))
        for i, combo in enumerate(combos):
            plan.extend([combo] * (q + (1 if i < r else 0)))
    rng.shuffle(plan)
    return plan


def kind_name(chosen: str, rejected: str) -> str:
    return rejected if chosen == "reference" else f"{chosen}_vs_{rejected}"


def make_pairs(n: int, stream: FreshProblems, rng: random.Random) -> list[dict]:
    """``n`` preference rows on fresh problems, ops balanced, kinds even.

    A problem on which a planned pair is impossible or not strictly ordered
    by the gold judge is dropped and replaced by a new one of the same op.
    """
    problems = stream.draw_balanced(n)
    rng.shuffle(problems)
    rows = []
    for p, (ck, rk) in zip(problems, kind_schedule(n, rng)):
        for _ in range(1000):
            chosen, rejected = respond(ck, p, rng), respond(rk, p, rng)
            if chosen is not None and rejected is not None:
                cs = judge.gold_score(p.question, chosen, p.answer)
                rs = judge.gold_score(p.question, rejected, p.answer)
                if judge.judge_pair(p.question, chosen, rejected, p.answer) == 1:
                    break
            p = stream.draw(p.op)
        else:
            raise RuntimeError(f"cannot make a {ck}/{rk} pair")
        rows.append({
            "prompt": p.question,
            "chosen": chosen,
            "rejected": rejected,
            "answer": p.answer,
            "op": p.op,
            "kind": kind_name(ck, rk),
            "chosen_score": cs,
            "rejected_score": rs,
        })
    return rows


def prompt_row(p: tasks.Problem) -> dict:
    return {"prompt": p.question, "answer": p.answer, "op": p.op}


def preference_data(seed: int, exclude: set[str]
                    ) -> tuple[list[dict], list[dict], list[dict]]:
    """(prefs train rows, prefs eval rows, prompt rows), all on new questions."""
    stream = FreshProblems(seed, exclude)
    train = make_pairs(N_PREF_TRAIN, stream, random.Random(f"prefs-train-{seed}"))
    evals = make_pairs(N_PREF_EVAL, stream, random.Random(f"prefs-eval-{seed}"))
    prompts = stream.draw_balanced(N_PROMPTS)
    random.Random(f"prefs-prompts-{seed}").shuffle(prompts)
    return train, evals, [prompt_row(p) for p in prompts]


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; use normal file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=HERE,
                    help="output directory (default: this script's directory)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help=f"random seed (default: {DEFAULT_SEED})")
    args = ap.parse_args(argv)

    train, evals = split(args.seed)
    sft_dir = os.path.join(args.out, "sft")
    for name, probs in (("train", train), ("eval", evals)):
        path = os.path.join(sft_dir, f"{name}.jsonl")
        write_jsonl_atomic(path, [to_row(p) for p in probs])
        print(f"wrote {len(probs)} rows to {path}")

    sft_questions = {p.question for p in train + evals}
    pref_train, pref_eval, prompts = preference_data(args.seed, sft_questions)
    prefs_dir = os.path.join(args.out, "prefs")
    for name, rows in (("train", pref_train), ("eval", pref_eval),
                       ("prompts", prompts)):
        path = os.path.join(prefs_dir, f"{name}.jsonl")
        write_jsonl_atomic(path, rows)
        print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
