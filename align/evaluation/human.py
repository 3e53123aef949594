"""People's judgements (from `align label`) as evaluation: a human win-rate with its interval and sign test, how
often the gold judge and the reward model agree with people, and how often people agree with each other.

Pure except `read_judgements` and the reward model's scoring: rows in, numbers out. An item judged by several
people counts once, by the majority of their verdicts (an even split is a tie), so one item is never counted as
several independent prompts.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from align.data.rows import _as_messages
from align.data.shipped import require_gold_judge
from align.evaluation.winrate import judged
from align.runtime.errors import DataError
from align.serving.label_store import LABELS, read_lines

SIDE = {"a": 1, "b": -1, "tie": 0, "both_bad": 0}  # +1: answer A preferred


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's κ of two annotators' labels on the same items: (observed − chance agreement) / (1 − chance), chance
    from each one's own label shares. None when chance agreement is 1 (both always gave one same label)."""
    if len(first) != len(second) or not first:
        raise ValueError("kappa needs two equally long, non-empty label lists")
    n = len(first)
    observed = sum(x == y for x, y in zip(first, second)) / n
    a, b = Counter(first), Counter(second)
    chance = sum(a[c] * b[c] for c in a) / (n * n)
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def agreement(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Cohen's κ and raw agreement for every pair of annotators over the items both judged."""
    labels: dict[str, dict[str, str]] = defaultdict(dict)
    for row in rows:
        labels[row["annotator"]][row["item"]] = row["label"]
    pairs = []
    for x, y in itertools.combinations(sorted(labels), 2):
        shared = sorted(set(labels[x]) & set(labels[y]))
        if shared:
            first, second = [labels[x][i] for i in shared], [labels[y][i] for i in shared]
            pairs.append({"annotators": [x, y], "items": len(shared), "kappa": cohen_kappa(first, second),
                          "raw": sum(p == q for p, q in zip(first, second)) / len(shared)})
    return {"annotators": sorted(labels), "pairs": pairs}


def read_judgements(path: str | Path) -> list[dict[str, Any]]:
    """The judgement rows of an `align label` file, each checked; a bad row is an error naming file and row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--human {path}: no such file (it is the --out file of align label)")
    rows = read_lines(path)
    for number, row in enumerate(rows, 1):
        missing = [k for k in ("item", "annotator", "label", "answer_a", "answer_b", "written_by") if k not in row]
        if missing or row.get("label") not in LABELS:
            why = f"missing {', '.join(missing)}" if missing else f"label {row.get('label')!r} is not one of {LABELS}"
            raise DataError(f"{path}:{number}: not a judgement written by align label ({why})")
    if not rows:
        raise DataError(f"{path}: no judgements yet")
    return rows


def item_preferences(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per item: its first row (answers, sides) and the people's preference for A: +1, -1, or 0 (tie, both bad, an
    even split)."""
    items: dict[str, dict[str, Any]] = {}
    votes: dict[str, int] = defaultdict(int)
    for row in rows:
        items.setdefault(row["item"], row)
        votes[row["item"]] += SIDE[row["label"]]
    return {key: {"row": row, "prefers_a": (votes[key] > 0) - (votes[key] < 0)} for key, row in items.items()}


def candidate_side(row: dict[str, Any]) -> str:
    """Which side ("a" or "b") the candidate policy wrote."""
    return "a" if row["written_by"].get("a") == row.get("candidate") else "b"


def human_win_rate(items: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """human_… keys: the candidate's win-rate against the baseline over the compared items (blind comparisons)."""
    verdicts, cand_texts, base_texts = [], [], []
    for entry in items.values():
        row = entry["row"]
        side = candidate_side(row)
        verdicts.append(entry["prefers_a"] * (1 if side == "a" else -1))
        cand_texts.append(row[f"answer_{side}"])
        base_texts.append(row["answer_b" if side == "a" else "answer_a"])
    return judged("human", verdicts, cand_texts, base_texts)


def judge_agreement(items: dict[str, dict[str, Any]], prefers_a: Callable[[dict[str, Any]], int | None]
                    ) -> tuple[float | None, int]:
    """The share of items people decided (not a tie) on which a judge prefers the same answer, and how many items
    that share is over (items the judge cannot judge, None, are left out)."""
    hits = total = 0
    for entry in items.values():
        if entry["prefers_a"] == 0:
            continue
        verdict = prefers_a(entry["row"])
        if verdict is None:
            continue
        total += 1
        hits += verdict == entry["prefers_a"]
    return (hits / total if total else None), total


def human_report(rows: Sequence[dict[str, Any]], rm_prefers_a: Callable[[dict[str, Any]], int | None] | None = None,
                 gold_prefers_a: Callable[[dict[str, Any]], int | None] | None = None) -> dict[str, Any]:
    """The human part of an evaluation: counts, the win-rate (when the rows compare two policies), the judges'
    agreement with people and the people's with each other."""
    items = item_preferences(rows)
    labels = Counter(r["label"] for r in rows)
    report: dict[str, Any] = {"human_judgements": len(rows), "human_items": len(items),
                              "human_labels": dict(labels), "human_agreement": agreement(rows)}
    compared = {k: v for k, v in items.items() if v["row"].get("candidate")}
    pairs = sorted({(v["row"]["candidate"], v["row"].get("baseline")) for v in compared.values()})
    if len(pairs) > 1:
        raise DataError("the judgements compare more than one pair of policies ("
                        + "; ".join(f"{c} vs {b}" for c, b in pairs) + "): keep one comparison per file")
    if compared:
        report.update(candidate=pairs[0][0], baseline=pairs[0][1], **human_win_rate(compared))
    for prefix, judge in (("gold", gold_prefers_a), ("rm", rm_prefers_a)):
        if judge is not None:
            share, n = judge_agreement(items, judge)
            report[f"{prefix}_agrees_with_people"], report[f"{prefix}_agreement_n"] = share, n
    return report


def _messages(row: dict[str, Any]):
    return _as_messages(row["prompt"], "prompt", "user")


def evaluate_human(path: str | Path, reward_model: str | None = None, device: str = "auto") -> dict[str, Any]:
    """`align eval --human FILE`: the human report of a judgement file, with the gold judge's agreement where the
    items carry gold answers and the reward model's when one is named."""
    rows = read_judgements(path)
    gold = None
    if any(r.get("gold") is not None for r in rows):
        judge = require_gold_judge("checking the gold judge against people on items with a gold 'answer'",
                                   "judge without gold answers")

        def gold(row: dict[str, Any]) -> int | None:
            if row.get("gold") is None:
                return None
            return judge.judge_pair(_messages(row)[-1]["content"], row["answer_a"], row["answer_b"], row["gold"])

    rm = None
    if reward_model:
        # the reward model brings torch: only when one is named
        from align.serving.score import load_reward_model

        model = load_reward_model(reward_model, device)
        items = item_preferences(rows)
        keys = list(items)
        texts = [items[k]["row"][f"answer_{side}"] for k in keys for side in ("a", "b")]
        scores = model.score_answers([_messages(items[k]["row"]) for k in keys for _ in range(2)], texts)
        by_item = {k: (scores[2 * i], scores[2 * i + 1]) for i, k in enumerate(keys)}

        def rm(row: dict[str, Any]) -> int | None:
            a, b = by_item[row["item"]]
            return None if a is None or b is None else (a > b) - (a < b)

    return {"judgements": str(path), **human_report(rows, rm, gold),
            **({"reward_model": reward_model} if reward_model else {})}
