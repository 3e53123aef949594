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

    from align.data.rows import load_sft_data
    from align.modeling.heads import answer_labels, labelled_logps, pad_batch

    rows = load_sft_data(spec, tokenizer, max_length, completion_only=True, limit=limit).encoded
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask = pad_batch([r.input_ids for r in chunk], tokenizer.pad_token_id, device=device)
            labels = answer_labels(ids, mask, [r.prompt_len for r in chunk])
            logps, n = labelled_logps(model, ids, mask, labels)
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
    return evaluate_policies([policy], baseline, reward_model, prompts, sft_data, limit, max_new_tokens, device)[0]


def evaluate_policies(policies: list[str], baseline: str | None = None, reward_model: str | None = None,
                      prompts: str = "reward_data/prefs/prompts.jsonl",
                      sft_data: str | None = "reward_data/sft/eval.jsonl", limit: int = 64, max_new_tokens: int = 64,
                      device: str = "auto") -> list[dict]:
    """Several policies (adapters on one base, loaded once) against one baseline; the baseline's answers,
    perplexity and overlap are computed once and shared. Default baseline: the first policy's SFT parent."""
    from pathlib import Path

    from align.runtime.errors import ModelError
    from align.modeling.models import adapter_role
    from align.runtime.runs import read_manifest
    from align.serving.trained import POLICY_STAGES, champion_or, load_policy, open_run

    paths = [champion_or(p) for p in policies]
    baseline = champion_or(baseline) if baseline else None
    model, tokenizer, cfg = load_policy(paths[0], device)
    manifests = [read_manifest(paths[0])] + [open_run(p, POLICY_STAGES, "--policy")[0] for p in paths[1:]]
    names = ["default"] + [f"policy{i}" for i in range(1, len(paths))]
    for path, manifest, name in zip(paths[1:], manifests[1:], names[1:]):
        if manifest["base_model"] != manifests[0]["base_model"]:
            raise ModelError(f"{path} was trained on another base model than {paths[0]}")
        model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    baseline = baseline or manifests[0].get("parent")
    base_name = None
    if baseline:
        base_manifest, _, _ = open_run(Path(baseline), POLICY_STAGES, "--baseline")
        if base_manifest["base_model"] != manifests[0]["base_model"]:
            raise ModelError(f"--baseline {baseline} was trained on another base model than --policy {paths[0]}")
        model.load_adapter(str(baseline), adapter_name="baseline", is_trainable=False)
        base_name = "baseline"
    ctx = lambda m: adapter_role(m, base_name, trainable=())  # noqa: E731
    job = _Job(model, tokenizer, cfg.data.max_length, str(baseline) if baseline else None, ctx, reward_model,
               prompts, sft_data, limit, max_new_tokens)
    reports = []
    for path, manifest, name in zip(paths, manifests, names):
        with adapter_role(model, name, trainable=()):
            reports.append(job.evaluate(path, manifest.get("parent")))
    return reports


class _Job:
    """One evaluation session: the settings, and what is computed once for the baseline."""

    def __init__(self, model, tokenizer, max_length, baseline, ctx, reward_model, prompts, sft_data, limit,
                 max_new_tokens):
        self.model, self.tokenizer, self.max_length, self.baseline, self.ctx = model, tokenizer, max_length, \
            baseline, ctx
        self.reward_model, self.prompts, self.sft_data = reward_model, prompts, sft_data
        self.limit, self.max_new_tokens = limit, max_new_tokens
        self.shared: dict = {}

    def evaluate(self, policy, parent: str | None) -> dict:
        """The active adapter against the baseline."""
        from types import SimpleNamespace

        from align.evaluation.winrate import win_rate_report

        model, tok = self.model, self.tokenizer
        settings = SimpleNamespace(eval_prompts=self.prompts, eval_limit=self.limit,
                                   max_new_tokens=self.max_new_tokens, reward_model=self.reward_model)
        report = {"policy": str(policy), "baseline": self.baseline or "base model (adapters off)",
                  **win_rate_report(model, tok, settings, self.ctx, self.shared)}
        report["kl_to_reference"] = self._kl_to_reference(parent, report)
        if self.sft_data:
            report["perplexity_policy"] = perplexity(model, tok, self.sft_data, self.max_length, self.limit)
            report["perplexity_baseline"] = self._baseline("perplexity", lambda: perplexity(
                model, tok, self.sft_data, self.max_length, self.limit))
            pairs = self._reference_pairs()
            if pairs:
                report["overlap_policy"] = self._overlap(pairs, "reference overlap")
                report["overlap_baseline"] = self._baseline("overlap", lambda: self._overlap(pairs, None))
        return report

    def _baseline(self, what: str, compute):
        if what not in self.shared:
            with self.ctx(self.model):
                self.shared[what] = compute()
        return self.shared[what]

    def _reference_pairs(self) -> list:
        from align.data.rows import load_sft_data

        if "pairs" not in self.shared:
            examples = load_sft_data(self.sft_data, self.tokenizer, self.max_length, True, limit=self.limit).examples
            self.shared["pairs"] = [(e.prompt, e.completion[-1]["content"]) for e in examples
                                    if e.prompt and e.completion]
        return self.shared["pairs"]

    def _overlap(self, pairs, desc: str | None) -> dict:
        from align.modeling.generate import answer_batch

        answers = answer_batch(self.model, self.tokenizer, [p for p, _ in pairs], self.max_new_tokens, desc=desc)
        return text_overlap([a for a, _ in answers], [r for _, r in pairs])

    def _kl_to_reference(self, parent: str | None, report: dict) -> float | None:
        """KL of the policy to the reference it trained against (its SFT parent, or the base without adapters):
        the number a KL budget is about. When the baseline is that parent, it is the win-rate report's estimate."""
        from pathlib import Path

        from align.modeling.models import adapter_role, require_safetensors
        from align.evaluation.winrate import load_prompts, sampled_kl

        baseline = self.baseline
        if (parent and baseline and Path(parent).resolve() == Path(baseline).resolve()) or not (parent or baseline):
            return report.get("kl_estimate")
        messages = [p for p, _ in load_prompts(self.prompts, self.limit)]
        if not messages:
            return None
        name = None
        if parent:
            refs = self.shared.setdefault("references", {})
            if parent not in refs:
                require_safetensors(Path(parent), "the policy's reference")
                refs[parent] = f"reference{len(refs)}"
                self.model.load_adapter(str(parent), adapter_name=refs[parent], is_trainable=False)
            name = refs[parent]
        return sampled_kl(self.model, self.tokenizer, messages, self.max_new_tokens,
                          lambda m: adapter_role(m, name, trainable=()))
