"""The judges of a policy's answers against a baseline's: the shipped gold judge (answers a program can check)
and a trained reward model. Each turns answers into verdicts and its part of the evaluation report."""

from __future__ import annotations

import logging
from typing import Any

from align.data.shipped import gold_judge, require_gold_judge
from align.evaluation.winrate import judged
from align.modeling.formatting import Messages
from align.serving.score import load_reward_model

log = logging.getLogger(__name__)
Answers = list[tuple[str, list[int]]]  # (text, token ids) per prompt
__all__ = ["gold_judge", "gold_part", "reward_model_part"]  # gold_judge lives in align.data.shipped


def gold_part(prompts: list[tuple[Messages, int | None]], policy: Answers, baseline: Answers) -> dict[str, Any]:
    """gold_… keys for the prompts with a gold answer; nothing when there are none. Prompts that carry gold
    answers need the gold judge: without one this is an error, not a report silently without the gold part."""
    rows = [(p[-1]["content"], a, pt, bt) for (p, a), (pt, _), (bt, _) in zip(prompts, policy, baseline)
            if a is not None]
    if not rows:
        return {}
    judge = require_gold_judge(f"judging the {len(rows)} prompts that carry a gold 'answer'",
                               "drop the 'answer' field of the prompts to judge with a reward model only")
    verdicts = [judge.judge_pair(q, pt, bt, a) for q, a, pt, bt in rows]
    return {**judged("gold", verdicts, [pt for *_, pt, _ in rows], [bt for *_, bt in rows]),
            "gold_score_policy": sum(judge.gold_score(q, pt, a) for q, a, pt, _ in rows) / len(rows),
            "gold_score_reference": sum(judge.gold_score(q, bt, a) for q, a, _, bt in rows) / len(rows),
            "gold_right_policy": _right_share(judge, [(q, pt, a) for q, a, pt, _ in rows]),
            "gold_right_reference": _right_share(judge, [(q, bt, a) for q, a, _, bt in rows])}


def _right_share(judge, rows: list[tuple[str, str, int]]) -> float:
    """The share of answers whose final result is right (the judge's correctness part), format and length aside."""
    return sum(judge.gold_breakdown(q, text, a)["correctness"] > 0 for q, text, a in rows) / len(rows)


def reward_model_part(path: str, messages: list[Messages], policy: Answers, baseline: Answers, shared: dict
                      ) -> dict[str, Any]:
    """rm_… keys: both answers of each prompt scored by the reward model at `path` (kept in `shared`); a prompt
    is judged only when both answers fit the reward model. The baseline's scores are kept in `shared` for the
    next policy, and a policy answer equal to the baseline's takes its score: greedy answers of a policy close
    to its baseline are mostly identical, and scoring is a forward pass per answer."""
    if "reward_model" not in shared:
        log.info("judging with the reward model %s (loaded separately for evaluation)", path)
        shared["reward_model"] = load_reward_model(path)
    scorer = shared["reward_model"]
    texts = [bt for bt, _ in baseline]
    if shared.get("rm_baseline", (None,))[0] != texts:
        shared["rm_baseline"] = (texts, scorer.score_answers(messages, texts))
    base_scores = shared["rm_baseline"][1]
    differ = [i for i, ((pt, _), bt) in enumerate(zip(policy, texts)) if pt != bt]
    own = dict(zip(differ, scorer.score_answers([messages[i] for i in differ], [policy[i][0] for i in differ])))
    pol_scores = [own.get(i, base_scores[i]) for i in range(len(messages))]
    kept = [i for i in range(len(messages)) if pol_scores[i] is not None and base_scores[i] is not None]
    pol, base = [pol_scores[i] for i in kept], [base_scores[i] for i in kept]
    verdicts = [1 if a > b else -1 if a < b else 0 for a, b in zip(pol, base)]
    return {**judged("rm", verdicts, [policy[i][0] for i in kept], [baseline[i][0] for i in kept]),
            "rm_score_policy": sum(pol) / len(pol) if pol else None,
            "rm_score_reference": sum(base) / len(base) if base else None}
