"""Win-rates and how sure they are. Pure: per-prompt verdicts in, numbers out (no model, no I/O).

A verdict is +1 (the policy's answer is better), 0 (a tie) or -1 (the baseline's is better); its outcome counts a
tie as half a win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def outcome(verdict: int) -> float:
    """1 for a win, 0.5 for a tie, 0 for a loss."""
    return 1.0 if verdict > 0 else 0.5 if verdict == 0 else 0.0


def win_rate(outcomes: Sequence[float]) -> float:
    """Mean of per-prompt outcomes: 1 win, 0.5 tie, 0 loss."""
    if not outcomes:
        raise ValueError("no outcomes to average")
    return sum(outcomes) / len(outcomes)


def win_statistics(verdicts: Sequence[int]) -> dict[str, Any]:
    """The counts, a 95% interval for the win-rate (ties half; normal approximation over the per-prompt outcomes
    1 / 0.5 / 0) and the two-sided sign-test p-value over the decided prompts (ties left out): the chance of a
    split at least this uneven if neither policy were better."""
    n = len(verdicts)
    w, lost = sum(x > 0 for x in verdicts), sum(x < 0 for x in verdicts)
    out: dict[str, Any] = {"wins": w, "ties": n - w - lost, "losses": lost}
    if n == 0:
        return {**out, "ci95": None, "sign_test_p": None}
    outcomes = [outcome(x) for x in verdicts]
    mean = win_rate(outcomes)
    var = sum((o - mean) ** 2 for o in outcomes) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    out["ci95"] = [max(0.0, mean - half), min(1.0, mean + half)]
    decided = w + lost
    tail = sum(math.comb(decided, k) for k in range(min(w, lost) + 1)) / 2 ** decided if decided else 1.0
    out["sign_test_p"] = min(1.0, 2 * tail)
    return out


def length_controlled_win_rate(outcomes: Sequence[float], policy_words: Sequence[int],
                               baseline_words: Sequence[int], iterations: int = 50) -> dict[str, float]:
    """The win-rate the policy would have at equal answer lengths, so that longer answers do not win by length.

    Fits P(win) = σ(a + b·d) by logistic regression (ties count as half a win), where d = tanh((policy words −
    baseline words) / s) and s is the standard deviation of the word counts (the same idea as AlpacaEval's
    length-controlled win-rate, with one length feature). Returns the controlled rate σ(a), the fitted slope b
    (how much a longer answer is preferred) and the plain rate.
    """
    n = len(outcomes)
    if n == 0 or len(policy_words) != n or len(baseline_words) != n:
        raise ValueError("outcomes and both length lists must be non-empty and of equal length")
    lengths = list(policy_words) + list(baseline_words)
    mean = sum(lengths) / len(lengths)
    scale = math.sqrt(sum((x - mean) ** 2 for x in lengths) / len(lengths)) or 1.0
    d = [math.tanh((p - b) / scale) for p, b in zip(policy_words, baseline_words)]
    a = b = 0.0
    for _ in range(iterations):  # Newton steps on the (convex) log-loss, with a small ridge for separable data
        ga = gb = 0.0
        haa = hab = hbb = 1e-6
        for y, x in zip(outcomes, d):
            p = 1.0 / (1.0 + math.exp(-(a + b * x)))
            w = p * (1 - p)
            ga += p - y
            gb += (p - y) * x
            haa += w
            hab += w * x
            hbb += w * x * x
        gb += 1e-3 * b
        hbb += 1e-3
        det = haa * hbb - hab * hab
        a -= (hbb * ga - hab * gb) / det
        b -= (haa * gb - hab * ga) / det
    return {"length_controlled_win_rate": 1.0 / (1.0 + math.exp(-a)), "length_slope": b,
            "win_rate": win_rate(outcomes)}


def judged(prefix: str, verdicts: Sequence[int], policy_texts: Sequence[str], baseline_texts: Sequence[str]
           ) -> dict[str, Any]:
    """One judge's part of an evaluation report, its keys prefixed (gold_…, rm_…): the win-rate, its count,
    interval and sign test, and the length-controlled rate (lengths in words)."""
    if not verdicts:
        return {f"{prefix}_win_rate": None, f"{prefix}_n": 0, f"{prefix}_lc_win_rate": None,
                **{f"{prefix}_{k}": v for k, v in win_statistics([]).items()}}
    outcomes = [outcome(v) for v in verdicts]
    lc = length_controlled_win_rate(outcomes, [len(t.split()) for t in policy_texts],
                                    [len(t.split()) for t in baseline_texts])
    return {f"{prefix}_win_rate": win_rate(outcomes), f"{prefix}_n": len(verdicts),
            **{f"{prefix}_{k}": v for k, v in win_statistics(verdicts).items()},
            f"{prefix}_lc_win_rate": lc["length_controlled_win_rate"]}
