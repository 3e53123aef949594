"""The promotion rule: does a newly trained policy replace the champion? Pure: evaluation reports in, decision out.

A candidate passes when its win-rate against the baseline (the champion, or SFT on the first round) is above
50% by a margin — judged by the gold judge when the prompts have gold answers, else by the reward model, or by
people's blind judgements (judge: human, which waits until enough items are judged) — and
its KL to the reference it trained against is within budget (a policy that won by drifting far is not trusted).
Of the candidates that pass, the one with the highest win-rate is promoted. The decision says why, in words.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from align.runtime.config import opt


@dataclass
class PromotionRule:
    judge: Literal["auto", "gold", "reward_model", "human"] = opt(
        "auto", "who judges the win-rate: gold (the gold judge; needs prompts with gold answers), reward_model, "
        "human (people's blind judgements from `align label`: the version waits, 'awaiting human evaluation', until "
        "min_human items are judged, then `align run` again decides), or auto = gold when the prompts have gold "
        "answers, else the reward model")
    min_human: int = opt(30, "with judge: human, the blind items people must have judged before a decision (12 wins "
                         "to 2 losses is the smallest clear split at max_p 0.05)", lambda v: v >= 1, "must be >= 1")
    metric: Literal["win_rate", "lc_win_rate"] = opt(
        "win_rate", "win_rate, or lc_win_rate (length-controlled: longer answers do not win by length alone)")
    margin: float = opt(0.02, "promote only when the win-rate is above 0.5 + margin", lambda v: 0 <= v < 0.5,
                        "must be in [0, 0.5)")
    max_kl: float | None = opt(2.0, "KL budget: a candidate whose KL to its reference (nats per answer) is above "
                               "this is not promoted; empty = no budget", lambda v: v is None or v > 0,
                               "must be > 0 or empty")
    max_kl_from_sft: float | None = opt(
        None, "a budget for the whole lineage: a candidate whose KL to the SFT policy (nats per answer) is above this "
        "is not promoted, however many rounds it took to get there (with reference: champion each round's KL budget "
        "is about one round only); empty = none", lambda v: v is None or v > 0, "must be > 0 or empty")
    max_p: float | None = opt(0.05, "promote only when the judge's two-sided sign test says the win is unlikely to be "
                              "chance: p-value at most this, divided by the number of candidates when several are "
                              "judged at once (Bonferroni: three tries at 0.05 would find a chance winner one time in "
                              "seven). Needs enough decided prompts: 5 wins to 1 loss gives p = 0.22, 12 to 2 gives "
                              "0.013. Empty = no test (a win on noise can then be promoted)",
                              lambda v: v is None or 0 < v <= 1, "must be in (0, 1] or empty")


def judged_rate(report: dict[str, Any], rule: PromotionRule) -> tuple[str, float | None]:
    """(report key, value) of the win-rate the rule reads from an evaluation report."""
    judge = rule.judge
    if judge == "auto":
        judge = "gold" if report.get("gold_win_rate") is not None else "reward_model"
    prefix = {"gold": "gold", "human": "human"}.get(judge, "rm")
    key = f"{prefix}_win_rate" if rule.metric == "win_rate" else f"{prefix}_lc_win_rate"
    return key, report.get(key)


def check(report: dict[str, Any], rule: PromotionRule, candidates: int = 1) -> dict[str, Any]:
    """One candidate of `candidates` judged together against the rule: the numbers read and, when it fails, each
    reason."""
    key, rate = judged_rate(report, rule)
    p = report.get(f"{key.split('_')[0]}_sign_test_p")
    kl = report.get("kl_to_reference")
    why_not = []
    if rule.judge == "human" and (report.get("human_n") or 0) < rule.min_human:
        return {"metric": key, "value": rate, "p": p, "alpha": None, "kl_to_reference": kl, "passed": False,
                "awaiting": True, "why_not": [f"awaiting human evaluation: {report.get('human_n') or 0} of "
                                              f"{rule.min_human} items judged"]}
    if rate is None:
        missing = {"gold": "gold answers", "rm": "reward model"}.get(key.split("_")[0], "judgements")
        why_not.append(f"no {key} in its evaluation (no {missing})")
    elif rate <= 0.5 + rule.margin:
        why_not.append(f"{key} {rate:.3f} is not above 0.5 + margin {rule.margin:g}")
    alpha = None if rule.max_p is None else rule.max_p / candidates
    if alpha is not None and rate is not None and (p is None or p > alpha):
        shared = f" / {candidates} candidates" if candidates > 1 else ""
        why_not.append(f"its sign test p = {'unknown' if p is None else f'{p:.2g}'} is over max_p {rule.max_p:g}"
                       f"{shared}: the win could be chance")
    if rule.max_kl is not None and kl is not None and kl > rule.max_kl:
        why_not.append(f"KL to its reference {kl:.3f} is over the budget {rule.max_kl:g}")
    kl_sft = report.get("kl_to_sft")
    if rule.max_kl_from_sft is not None and kl_sft is not None and kl_sft > rule.max_kl_from_sft:
        why_not.append(f"KL to SFT {kl_sft:.3f} is over the lineage's budget {rule.max_kl_from_sft:g}")
    return {"metric": key, "value": rate, "p": p, "alpha": alpha, "kl_to_reference": kl, "passed": not why_not,
            "why_not": why_not}


def decide(reports: dict[str, dict[str, Any]], rule: PromotionRule, baseline: str) -> dict[str, Any]:
    """{promote: candidate name or None, reason: a sentence, checks: per candidate} for reports against `baseline`."""
    checks = {name: check(report, rule, len(reports)) for name, report in reports.items()}
    waiting = [name for name, c in checks.items() if c.get("awaiting")]
    if waiting:  # no decision on part of the candidates: the best of all is chosen once all are judged
        reasons = "; ".join(f"{name}: {checks[name]['why_not'][0]}" for name in waiting)
        return {"promote": None, "awaiting": waiting, "checks": checks,
                "reason": f"awaiting human evaluation against {baseline}: {reasons}"}
    passed = [name for name, c in checks.items() if c["passed"]]
    if not passed:
        if not checks:
            return {"promote": None, "reason": "no new policy was trained in this version", "checks": checks}
        reasons = "; ".join(f"{name}: {', '.join(c['why_not'])}" for name, c in checks.items())
        return {"promote": None, "reason": f"nothing beats {baseline}: {reasons}", "checks": checks}
    best = max(passed, key=lambda name: typing.cast(float, checks[name]["value"]))
    c = checks[best]
    kl = "not measured" if c["kl_to_reference"] is None else f"{c['kl_to_reference']:.3f}"
    budget = "no budget" if rule.max_kl is None else f"budget {rule.max_kl:g}"
    test = "" if c["alpha"] is None else f", sign test p = {c['p']:.2g} <= {c['alpha']:.3g}"
    return {"promote": best, "checks": checks,
            "reason": f"{best} beats {baseline}: {c['metric']} {c['value']:.3f} > 0.5 + margin {rule.margin:g}{test}; "
                      f"KL to its reference {kl} ({budget})"}
