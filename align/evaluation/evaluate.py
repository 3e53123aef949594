"""A policy against a baseline policy on held-out prompts: the numbers a promotion decision rests on.

Both policies are adapters on one base (the baseline may be the base itself, adapters off). The report holds the
win-rates of each judge (align.evaluation.judges) with their intervals and sign tests, answer lengths (so that
winning by length is visible), the sampled KL to the reference the policy trained against, and, given held-out
SFT data, perplexity and text overlap (align.evaluation.measures).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from align.data.prompts import load_prompts
from align.data.rows import load_sft_data
from align.evaluation.judges import gold_part, reward_model_part
from align.evaluation.measures import perplexity, sampled_kl, text_overlap
from align.modeling.generate import answer_batch
from align.modeling.models import adapter_role, add_adapter_from
from align.runtime.errors import ModelError
from align.runtime.runs import atomic_write_json, read_manifest
from align.serving.trained import POLICY_STAGES, champion_or, load_policy, open_run

log = logging.getLogger(__name__)


def win_rate_report(model, tokenizer, prompts_spec: str, limit: int, max_new_tokens: int, reward_model: str | None,
                    reference_ctx, shared: dict | None = None, kl_limit: int | None = None) -> dict[str, Any]:
    """Policy (the model's active adapter) against the reference (inside `reference_ctx(model)`). `shared` keeps
    the reference's answers and the loaded reward model for the next policy judged against the same reference.
    `kl_limit`: the KL is estimated on the first N prompts only (sampling and two log-prob passes per prompt)."""
    shared = {} if shared is None else shared
    prompts = load_prompts(prompts_spec, limit)
    if not prompts:
        return {}
    messages = [p for p, _ in prompts]
    policy = answer_batch(model, tokenizer, messages, max_new_tokens, desc="policy answers")
    if "reference_answers" not in shared:
        with reference_ctx(model):
            shared["reference_answers"] = answer_batch(model, tokenizer, messages, max_new_tokens,
                                                       desc="reference answers")
    ref = shared["reference_answers"]
    eos = tokenizer.eos_token_id
    report: dict[str, Any] = {
        "prompts": prompts_spec,
        "n_prompts": len(prompts),
        "kl_estimate": sampled_kl(model, tokenizer, messages[:kl_limit], max_new_tokens, reference_ctx),
        "kl_prompts": len(messages[:kl_limit]),
        "policy_words_mean": sum(len(t.split()) for t, _ in policy) / len(policy),
        "reference_words_mean": sum(len(t.split()) for t, _ in ref) / len(ref),
        "policy_no_eos_share": sum(not a or a[-1] != eos for _, a in policy) / len(policy),
        "reference_no_eos_share": sum(not a or a[-1] != eos for _, a in ref) / len(ref),
        **gold_part(prompts, policy, ref),
    }
    if reward_model:
        report.update(reward_model_part(reward_model, messages, policy, ref, shared))
    report["judges"] = judges_used(report, reward_model)
    report["samples"] = [{"prompt": m[-1]["content"], "policy": pt, "reference": rt}
                         for m, (pt, _), (rt, _) in list(zip(messages, policy, ref))[:3]]
    # per-answer word counts, so a report can show the length distributions, not just their means
    report["policy_words"] = [len(t.split()) for t, _ in policy]
    report["reference_words"] = [len(t.split()) for t, _ in ref]
    return report


def judges_used(report: dict[str, Any], reward_model: str | None) -> str:
    """Which judges decided the win-rates, in words, for every report to say."""
    used = []
    if report.get("gold_n"):
        used.append(f"the gold judge (arithmetic answers, on the {report['gold_n']} prompts that carry one)")
    if reward_model:
        used.append(f"the reward model {reward_model}")
    return " and ".join(used) or "no judge (the prompts carry no gold answers and no reward model was given)"


def evaluate_stage_output(out: str | Path, prompts: str, limit: int, max_new_tokens: int,
                          reward_model: str | None = None) -> dict[str, Any]:
    """A freshly saved policy stage against the reference it trained with (its SFT parent, else the base): the
    report goes into the stage's metrics.json as "win_rate" (an atomic rewrite) and is returned."""
    out = Path(out)
    report = evaluate_policy(str(out), None, reward_model, prompts, None, limit, max_new_tokens)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics["win_rate"] = report
    atomic_write_json(metrics_path, metrics)
    return report


def evaluate_policy(policy: str, baseline: str | None = None, reward_model: str | None = None,
                    prompts: str = "reward_data/prefs/prompts.jsonl",
                    sft_data: str | None = "reward_data/sft/eval.jsonl", limit: int = 64, max_new_tokens: int = 64,
                    device: str = "auto", kl_limit: int | None = None) -> dict:
    """A policy run against a baseline policy run (default: the policy's SFT parent, else the base model):
    win-rates (gold judge, reward model, both also length-controlled), answer lengths, sampled KL, perplexity on
    held-out SFT data, BLEU / ROUGE-L of answers against the SFT data's reference answers."""
    return evaluate_policies([policy], baseline, reward_model, prompts, sft_data, limit, max_new_tokens, device,
                             kl_limit)[0]


def evaluate_policies(policies: list[str], baseline: str | None = None, reward_model: str | None = None,
                      prompts: str = "reward_data/prefs/prompts.jsonl",
                      sft_data: str | None = "reward_data/sft/eval.jsonl", limit: int = 64, max_new_tokens: int = 64,
                      device: str = "auto", kl_limit: int | None = None) -> list[dict]:
    """Several policies (adapters on one base, loaded once) against one baseline; the baseline's answers,
    perplexity and overlap are computed once and shared. Default baseline: the first policy's SFT parent.
    `kl_limit`: how many of the prompts estimate each KL (default: all of them)."""
    paths = [champion_or(p) for p in policies]
    baseline = champion_or(baseline) if baseline else None
    model, tokenizer, cfg = load_policy(paths[0], device)
    manifests = [read_manifest(paths[0])] + [open_run(p, POLICY_STAGES, "--policy")[0] for p in paths[1:]]
    names = ["default"] + [f"policy{i}" for i in range(1, len(paths))]
    for path, manifest, name in zip(paths[1:], manifests[1:], names[1:]):
        if manifest["base_model"] != manifests[0]["base_model"]:
            raise ModelError(f"{path} was trained on another base model than {paths[0]}")
        add_adapter_from(model, name, Path(path))
    baseline = baseline or manifests[0].get("parent")
    base_name = None
    if baseline:
        base_manifest, _, _ = open_run(Path(baseline), POLICY_STAGES, "--baseline")
        if base_manifest["base_model"] != manifests[0]["base_model"]:
            raise ModelError(f"--baseline {baseline} was trained on another base model than --policy {paths[0]}")
        add_adapter_from(model, "baseline", Path(baseline))
        base_name = "baseline"
    ctx = lambda m: adapter_role(m, base_name, trainable=())  # noqa: E731
    job = _Job(model, tokenizer, cfg.data.max_length, str(baseline) if baseline else None, ctx, reward_model,
               prompts, sft_data, limit, max_new_tokens, kl_limit)
    reports = []
    for path, manifest, name in zip(paths, manifests, names):
        with adapter_role(model, name, trainable=()):
            reports.append(job.evaluate(path, manifest.get("parent")))
    return reports


def lineage_sft(parent: str | None) -> str | None:
    """The SFT adapter at the root of a policy's references: its parent when that is an SFT stage, else the
    parent's own reference, and so on (a round held to the champion it started from has a policy as parent)."""
    seen = set()
    while parent and parent not in seen and (Path(parent) / "manifest.json").is_file():
        seen.add(parent)
        manifest = read_manifest(Path(parent))
        if manifest.get("stage") == "sft":
            return parent
        parent = manifest.get("parent")
    return None


class _Job:
    """One evaluation session: the settings, and what is computed once for the baseline."""

    def __init__(self, model, tokenizer, max_length, baseline, ctx, reward_model, prompts, sft_data, limit,
                 max_new_tokens, kl_limit=None):
        self.model, self.tokenizer, self.max_length, self.baseline, self.ctx = model, tokenizer, max_length, \
            baseline, ctx
        self.reward_model, self.prompts, self.sft_data = reward_model, prompts, sft_data
        self.limit, self.max_new_tokens, self.kl_limit = limit, max_new_tokens, kl_limit
        self.shared: dict = {}

    def evaluate(self, policy, parent: str | None) -> dict:
        """The active adapter against the baseline."""
        model, tok = self.model, self.tokenizer
        report = {"policy": str(policy), "baseline": self.baseline or "base model (adapters off)",
                  **win_rate_report(model, tok, self.prompts, self.limit, self.max_new_tokens, self.reward_model,
                                    self.ctx, self.shared, self.kl_limit)}
        report["kl_to_reference"] = self._kl_to_reference(parent, report)
        sft = lineage_sft(parent)
        # with a moving reference (a round held to the champion it started from) the distance from SFT is its own
        report["kl_to_sft"] = report["kl_to_reference"] if sft == parent else self._kl_to_reference(sft, report)
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
        if "pairs" not in self.shared:
            examples = load_sft_data(self.sft_data, self.tokenizer, self.max_length, True, limit=self.limit).examples
            self.shared["pairs"] = [(e.prompt, e.completion[-1]["content"]) for e in examples
                                    if e.prompt and e.completion]
        return self.shared["pairs"]

    def _overlap(self, pairs, desc: str | None) -> dict:
        answers = answer_batch(self.model, self.tokenizer, [p for p, _ in pairs], self.max_new_tokens, desc=desc)
        return text_overlap([a for a, _ in answers], [r for _, r in pairs])

    def _kl_to_reference(self, parent: str | None, report: dict) -> float | None:
        """KL of the policy to the reference it trained against (its SFT parent, or the base without adapters):
        the number a KL budget is about. When the baseline is that parent, it is the win-rate report's estimate."""
        baseline = self.baseline
        if (parent and baseline and Path(parent).resolve() == Path(baseline).resolve()) or not (parent or baseline):
            return report.get("kl_estimate")
        messages = [p for p, _ in load_prompts(self.prompts, self.limit)][:self.kl_limit]
        if not messages:
            return None
        name = None
        if parent:
            refs = self.shared.setdefault("references", {})
            if parent not in refs:
                refs[parent] = f"reference{len(refs)}"
                add_adapter_from(self.model, refs[parent], Path(parent))
            name = refs[parent]
        return sampled_kl(self.model, self.tokenizer, messages, self.max_new_tokens,
                          lambda m: adapter_role(m, name, trainable=()))
