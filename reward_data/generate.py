"""Generate the synthetic arithmetic SFT dataset.

Usage (from any directory):
    python reward_data/generate.py [--out DIR] [--seed 1234]

Writes DIR/sft/train.jsonl (800 rows) and DIR/sft/eval.jsonl (100 rows).
Output is byte-identical for the same seed.
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

import tasks  # noqa: E402  (import after sys.path setup)

N_TRAIN = 800
N_EVAL = 100
DEFAULT_SEED = 1234


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
