"""Evaluation of a policy against a baseline policy: the numbers a promotion decision rests on.

Pure pieces here (win-rates, a length-controlled win-rate, text overlap); the model-running parts reuse
align.winrate (answers, judges, sampled KL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def win_rate(outcomes: Sequence[float]) -> float:
    """Mean of per-prompt outcomes: 1 win, 0.5 tie, 0 loss."""
    if not outcomes:
        raise ValueError("no outcomes to average")
    return sum(outcomes) / len(outcomes)


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


def text_overlap(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0–100) and mean ROUGE-L F1 (rouge-score, 0–1) of answers against references."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not predictions or len(predictions) != len(references):
        raise ValueError("predictions and references must be non-empty and of equal length")
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)
    return {"bleu": bleu, "rouge_l": rouge}
