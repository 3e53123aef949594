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


# ---------------------------------------------------------------------------------------------- a policy


def perplexity(model, tokenizer, spec: str, max_length: int, limit: int, batch_size: int = 8) -> float:
    """exp(mean NLL per answer token) on held-out SFT rows (prompt tokens masked, as SFT trained)."""
    import torch

    from .data import load_sft_data
    from .heads import answer_labels, pad_batch
    from .losses import sequence_logps

    rows = load_sft_data(spec, tokenizer, max_length, completion_only=True, limit=limit).encoded
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask = pad_batch([r.input_ids for r in chunk], tokenizer.pad_token_id, device=device)
            labels = answer_labels(ids, mask, [r.prompt_len for r in chunk])
            logps, n = sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
            total += -logps.sum().item()
            count += int(n.sum().item())
    return math.exp(total / max(count, 1))


def evaluate_policy(policy: str, baseline: str | None = None, reward_model: str | None = None,
                    prompts: str = "reward_data/prefs/prompts.jsonl",
                    sft_data: str | None = "reward_data/sft/eval.jsonl", limit: int = 64, max_new_tokens: int = 64,
                    device: str = "auto") -> dict:
    """A policy run against a baseline policy run (default: the policy's SFT parent, else the base model):
    win-rates (gold judge, reward model, both also length-controlled), answer lengths, sampled KL, perplexity on
    held-out SFT data, BLEU / ROUGE-L of answers against the SFT data's reference answers."""
    from pathlib import Path
    from types import SimpleNamespace

    from .data import load_sft_data
    from .errors import ModelError
    from .generate import answer_batch
    from .models import adapter_role
    from .runs import read_manifest
    from .trained import POLICY_STAGES, load_policy, open_run
    from .winrate import win_rate_report

    model, tokenizer, cfg = load_policy(policy, device)
    manifest = read_manifest(Path(policy))
    baseline = baseline or manifest.get("parent")
    name = None
    if baseline:
        base_manifest, _, _ = open_run(Path(baseline), POLICY_STAGES, "--baseline")
        if base_manifest["base_model"] != manifest["base_model"]:
            raise ModelError(f"--baseline {baseline} was trained on another base model than --policy {policy}")
        model.load_adapter(str(baseline), adapter_name="baseline", is_trainable=False)
        name = "baseline"
    ctx = lambda m: adapter_role(m, name, trainable=())  # noqa: E731
    settings = SimpleNamespace(eval_prompts=prompts, eval_limit=limit, max_new_tokens=max_new_tokens,
                               reward_model=reward_model)
    report = {"policy": str(policy), "baseline": str(baseline) if baseline else "base model (adapters off)",
              **win_rate_report(model, tokenizer, settings, ctx)}
    if sft_data:
        max_length = cfg.data.max_length
        report["perplexity_policy"] = perplexity(model, tokenizer, sft_data, max_length, limit)
        with ctx(model):
            report["perplexity_baseline"] = perplexity(model, tokenizer, sft_data, max_length, limit)
        examples = load_sft_data(sft_data, tokenizer, max_length, True, limit=limit).examples
        pairs = [(e.prompt, e.completion[-1]["content"]) for e in examples if e.prompt and e.completion]
        if pairs:
            answers = answer_batch(model, tokenizer, [p for p, _ in pairs], max_new_tokens, desc="reference overlap")
            report["overlap_policy"] = text_overlap([a for a, _ in answers], [r for _, r in pairs])
            with ctx(model):
                answers = answer_batch(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
            report["overlap_baseline"] = text_overlap([a for a, _ in answers], [r for _, r in pairs])
    return report
