"""A trained policy against its reference on held-out prompts: win-rates (gold judge, reward model), answer
lengths (so that winning by length is visible) and a sampled estimate of the KL between the two.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import Any

import torch

from align.data.rows import PROJECT_ROOT, RowError, _as_messages, read_rows
from align.modeling.formatting import Messages, encode_prompt
from align.modeling.generate import answer_batch
from align.modeling.heads import answer_labels, labelled_logps, pad_batch

log = logging.getLogger(__name__)


def gold_judge():
    """reward_data/judge.py (shipped with the data, not the package), or None when it is not there."""
    path = PROJECT_ROOT / "reward_data" / "judge.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("align_gold_judge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_prompts(spec: str, limit: int) -> list[tuple[Messages, int | None]]:
    """Rows with a 'prompt' (string or messages) and, for the gold judge, an integer 'answer'."""
    rows = []
    for source, row_no, raw in read_rows(spec):
        if len(rows) >= limit:
            break
        try:
            if isinstance(raw, RowError):
                raise raw
            if not isinstance(raw, dict) or "prompt" not in raw:
                raise RowError("an eval prompt row needs a 'prompt'")
            prompt = _as_messages(raw["prompt"], "prompt", "user")
        except RowError as e:
            log.warning("%s:%d: skipped: %s", source, row_no, e)
            continue
        answer = raw.get("answer")
        rows.append((prompt, answer if isinstance(answer, int) and not isinstance(answer, bool) else None))
    return rows


@torch.no_grad()
def _answer_logps(model, tokenizer, prompts: list[Messages], answers: list[list[int]], batch_size: int = 16
                  ) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        p_ids = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        seqs = [p + a for p, a in zip(p_ids, answers[start:start + batch_size])]
        ids, mask = pad_batch(seqs, tokenizer.pad_token_id, device=device)
        labels = answer_labels(ids, mask, [len(p) for p in p_ids])
        out.append(labelled_logps(model, ids, mask, labels)[0].float().cpu())
    return torch.cat(out)


def sampled_kl(model, tokenizer, messages: list[Messages], max_new_tokens: int, reference_ctx, seed: int = 0
               ) -> float:
    """KL(policy ‖ reference) per answer, estimated as the mean of log π(y|x) − log ρ(y|x) over one answer per
    prompt sampled from the policy at temperature 1 (the k1 estimator is unbiased only on the policy's own
    samples, not on greedy answers). Seeded, and the global RNG is restored afterwards."""
    from align.modeling.generate import Sampling, sample_batch

    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        drawn = sample_batch(model, tokenizer, messages, Sampling(1.0, 1.0, 1), max_new_tokens, desc="KL samples")
    finally:
        torch.set_rng_state(state)
    answers = [a[0][1] or [tokenizer.eos_token_id] for a in drawn]
    was_training = model.training
    model.eval()
    logratio = _answer_logps(model, tokenizer, messages, answers)
    with reference_ctx(model):
        logratio -= _answer_logps(model, tokenizer, messages, answers)
    model.train(was_training)
    return logratio.mean().item()


def _length_controlled(wins: list[int], policy_texts: list[str], reference_texts: list[str]) -> float:
    """The win-rate at equal answer lengths (align.evaluate.length_controlled_win_rate)."""
    from align.evaluation.evaluate import length_controlled_win_rate

    outcomes = [1.0 if w > 0 else 0.5 if w == 0 else 0.0 for w in wins]
    return length_controlled_win_rate(outcomes, [len(t.split()) for t in policy_texts],
                                      [len(t.split()) for t in reference_texts])["length_controlled_win_rate"]


def _rate(wins: list[int]) -> float:
    """Share of wins, a tie counting half."""
    return sum(1.0 if w > 0 else 0.5 if w == 0 else 0.0 for w in wins) / len(wins)


def win_statistics(wins: list[int]) -> dict[str, Any]:
    """How sure a win-rate is. `wins`: +1 / 0 / -1 per prompt (policy better / tie / baseline better).

    Returns the counts, a 95% interval for the win-rate (ties half; normal approximation over the per-prompt
    outcomes 1 / 0.5 / 0) and the two-sided sign-test p-value over the decided prompts (ties left out): the
    chance of a split at least this uneven if neither policy were better."""
    n = len(wins)
    w, lost = sum(x > 0 for x in wins), sum(x < 0 for x in wins)
    out: dict[str, Any] = {"wins": w, "ties": n - w - lost, "losses": lost}
    if n == 0:
        return {**out, "ci95": None, "sign_test_p": None}
    outcomes = [1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in wins]
    mean = sum(outcomes) / n
    var = sum((o - mean) ** 2 for o in outcomes) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    out["ci95"] = [max(0.0, mean - half), min(1.0, mean + half)]
    decided = w + lost
    tail = sum(math.comb(decided, k) for k in range(min(w, lost) + 1)) / 2 ** decided if decided else 1.0
    out["sign_test_p"] = min(1.0, 2 * tail)
    return out


def win_rate_report(model, tokenizer, cfg, reference_ctx, shared: dict | None = None) -> dict[str, Any]:
    """Policy (the model's active adapter) against the reference (inside `reference_ctx(model)`). `shared` keeps
    the reference's answers and the loaded reward model for the next policy judged against the same reference."""
    shared = {} if shared is None else shared
    prompts = load_prompts(cfg.eval_prompts, cfg.eval_limit)
    if not prompts:
        return {}
    messages = [p for p, _ in prompts]
    policy = answer_batch(model, tokenizer, messages, cfg.max_new_tokens, desc="policy answers")
    if "reference_answers" not in shared:
        with reference_ctx(model):
            shared["reference_answers"] = answer_batch(model, tokenizer, messages, cfg.max_new_tokens,
                                                       desc="reference answers")
    ref = shared["reference_answers"]
    kl = sampled_kl(model, tokenizer, messages, cfg.max_new_tokens, reference_ctx)
    eos = tokenizer.eos_token_id
    report: dict[str, Any] = {
        "n_prompts": len(prompts),
        "kl_estimate": kl,
        "policy_words_mean": sum(len(t.split()) for t, _ in policy) / len(policy),
        "reference_words_mean": sum(len(t.split()) for t, _ in ref) / len(ref),
        "policy_no_eos_share": sum(not a or a[-1] != eos for _, a in policy) / len(policy),
        "reference_no_eos_share": sum(not a or a[-1] != eos for _, a in ref) / len(ref),
    }
    judge = gold_judge()
    judged = [(p[-1]["content"], a, pt, rt) for (p, a), (pt, _), (rt, _) in zip(prompts, policy, ref) if a is not None]
    if judge is not None and judged:
        wins = [judge.judge_pair(q, pt, rt, a) for q, a, pt, rt in judged]
        report.update(gold_win_rate=_rate(wins), gold_n=len(judged),
                      **{f"gold_{k}": v for k, v in win_statistics(wins).items()},
                      gold_lc_win_rate=_length_controlled(wins, [pt for *_, pt, _ in judged],
                                                          [rt for *_, rt in judged]),
                      gold_score_policy=sum(judge.gold_score(q, pt, a) for q, a, pt, _ in judged) / len(judged),
                      gold_score_reference=sum(judge.gold_score(q, rt, a) for q, a, _, rt in judged) / len(judged))
    if getattr(cfg, "reward_model", None):
        report.update(_rm_win_rate(cfg.reward_model, messages, policy, ref, shared))
    report["samples"] = [{"prompt": m[-1]["content"], "policy": pt, "reference": rt}
                         for m, (pt, _), (rt, _) in list(zip(messages, policy, ref))[:3]]
    # per-answer word counts, so a report can show the length distributions, not just their means
    report["policy_words"] = [len(t.split()) for t, _ in policy]
    report["reference_words"] = [len(t.split()) for t, _ in ref]
    return report


def _rm_win_rate(path: str, messages: list[Messages], policy, ref, shared: dict) -> dict[str, Any]:
    from align.serving.score import load_reward_model

    if "reward_model" not in shared:
        log.info("judging with the reward model %s (loaded separately for evaluation)", path)
        shared["reward_model"] = load_reward_model(path)
    rm = shared["reward_model"]
    flat = rm.score_answers([m for m in messages for _ in range(2)], [t for (pt, _), (rt, _) in zip(policy, ref)
                                                                        for t in (pt, rt)])
    # a prompt is judged only when both answers fit the reward model
    kept = [(i, flat[2 * i], flat[2 * i + 1]) for i in range(len(messages))
            if flat[2 * i] is not None and flat[2 * i + 1] is not None]
    pol, rf = [a for _, a, _ in kept], [b for _, _, b in kept]
    texts = [(policy[i][0], ref[i][0]) for i, _, _ in kept]
    wins = [1 if a > b else -1 if a < b else 0 for a, b in zip(pol, rf)]
    return {"rm_win_rate": _rate(wins) if wins else None, "rm_n": len(wins),
            **{f"rm_{k}": v for k, v in win_statistics(wins).items()},
            "rm_lc_win_rate": _length_controlled(wins, [p for p, _ in texts], [r for _, r in texts]) if wins else None,
            "rm_score_policy": sum(pol) / len(pol) if pol else None,
            "rm_score_reference": sum(rf) / len(rf) if rf else None}
