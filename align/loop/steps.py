"""The pipeline's steps after training: evaluate the new policies against the champion, decide, merge, report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from align.data.prompts import load_prompts
from align.data.rows import data_hash
from align.evaluation.evaluate import evaluate_policies
from align.evaluation.human import human_report
from align.evaluation.promotion import decide
from align.evaluation.report import write_report
from align.loop.settings import POLICIES
from align.loop.versions import Home, now
from align.runtime.runs import atomic_write_json, json_hash, sha256_path
from align.serving.label_store import read_lines
from align.serving.merge import merge

log = logging.getLogger(__name__)

HEADLINE = ("gold_win_rate", "gold_lc_win_rate", "rm_win_rate", "rm_lc_win_rate", "kl_to_reference", "kl_estimate",
            "gold_score_policy", "gold_score_reference", "rm_score_policy", "rm_score_reference", "policy_words_mean",
            "gold_right_policy", "gold_right_reference", "kl_to_sft",
            "reference_words_mean", "policy_no_eos_share", "perplexity_policy", "perplexity_baseline",
            "gold_wins", "gold_ties", "gold_losses", "gold_ci95", "gold_sign_test_p", "rm_wins", "rm_ties", "rm_losses",
            "rm_ci95", "rm_sign_test_p", "human_win_rate", "human_n", "human_wins", "human_ties", "human_losses",
            "human_ci95", "human_sign_test_p")


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The evaluation numbers a version listing and the report's table show."""
    out = {k: report[k] for k in HEADLINE if report.get(k) is not None}
    for side in ("policy", "baseline"):
        overlap = report.get(f"overlap_{side}") or {}
        for k in ("bleu", "rouge_l"):
            if k in overlap:
                out[f"{k}_{side}"] = overlap[k]
    return out


def reward_summary(stages: dict[str, Any]) -> dict[str, Any] | None:
    if "reward" not in stages:
        return None
    metrics = json.loads((Path(stages["reward"]["path"]) / "metrics.json").read_text(encoding="utf-8"))
    return {k: metrics[k] for k in ("eval_accuracy", "eval_mean_margin", "eval_ece") if metrics.get(k) is not None}


def _baseline(stages: dict[str, Any], champion: dict[str, Any] | None) -> tuple[str | None, str]:
    if champion is not None:
        return champion["path"], f"the champion ({champion['version']} {champion['stage']})"
    if "sft" in stages:
        return stages["sft"]["path"], f"SFT ({stages['sft']['made_in']})"
    return None, "the base model"


def candidates(record: dict[str, Any], baseline: str | None) -> list[str]:
    """Policies trained in this version (DPO, PPO, GRPO; SFT when it is the only policy stage), the baseline
    excepted."""
    stages, version = record["stages"], record["version"]
    new = [s for s in POLICIES if s in stages and stages[s]["made_in"] == version]
    if not new and not any(s in stages for s in POLICIES) and stages.get("sft", {}).get("made_in") == version:
        new = ["sft"]
    same = lambda s: baseline is not None and Path(stages[s]["path"]).resolve() == Path(baseline).resolve()  # noqa: E731
    return [s for s in new if not same(s)]


def evaluate_step(p, home: Home, record: dict[str, Any], force: bool = False) -> None:
    """Each new policy against the baseline on held-out prompts, then the promotion decision (and champion). With
    judge: human, people's judgements (OUT/<version>/human/<policy>.jsonl, from `align label`) join each report;
    when only they changed, the automatic evaluation is not run again."""

    stages, version, s = record["stages"], record["version"], p.settings
    champion = home.champion()
    if champion is not None and champion["version"] == version:  # evaluated again: against the one it replaced
        champion = (record.get("decision") or {}).get("previous_champion")
    baseline, baseline_name = _baseline(stages, champion)
    new = candidates(record, baseline)
    e, d = s.evaluate, s.data
    rm = stages.get("reward", {}).get("path")
    if rm and not e.reward_judge and s.promotion.judge != "reward_model" and gold_decides(d.eval_prompts, e.limit):
        rm = None
    auto_key = json_hash({"policies": {c: stages[c]["key"] for c in new}, "baseline": baseline,
                          "reward_model": stages.get("reward", {}).get("key") if rm else None,
                          "settings": [e.limit, e.max_new_tokens, e.kl_limit],
                          "prompts": data_hash(d.eval_prompts),
                          "sft_eval": data_hash(d.sft_eval) if d.sft_eval else None})
    files = human_files(home, version, new) if s.promotion.judge == "human" else {}
    key = json_hash({"auto": auto_key, "rule": vars(s.promotion),
                     "human": {n: sha256_path(f) if f.is_file() else None for n, f in files.items()}})
    previous = record.get("evaluation") or {}
    if previous.get("key") == key and record.get("decision") and not force:
        log.info("evaluate: already done for these policies, baseline and settings")
        return
    reports: dict[str, dict[str, Any]] = {}
    saved = {n: home.root / version / "eval" / f"{n}.json" for n in new}
    if new and previous.get("auto_key") == auto_key and not force and all(f.is_file() for f in saved.values()):
        log.info("evaluate: the automatic evaluation is up to date; reading people's judgements again")
        reports = {n: json.loads(f.read_text(encoding="utf-8")) for n, f in saved.items()}
    elif new:
        log.info("evaluate: %s against %s on %d held-out prompts", " and ".join(new), baseline_name, e.limit)
        found = evaluate_policies([stages[n]["path"] for n in new], baseline, rm, d.eval_prompts, d.sft_eval,
                                  e.limit, e.max_new_tokens, e.device, e.kl_limit)
        for name, report in zip(new, found):
            atomic_write_json(saved[name], report)
            reports[name] = report
    for name, path in files.items():
        reports[name] = {**reports[name], **human_part(path, stages[name]["path"], baseline)}
    record["evaluation"] = {"key": key, "auto_key": auto_key, "baseline": baseline, "baseline_name": baseline_name,
                            "reward_model": reward_summary(stages),
                            "policies": {n: headline(r) for n, r in reports.items()},
                            "files": {n: str(f) for n, f in saved.items() if n in reports}}
    record["decision"] = promote(home, record, reports, s.promotion, champion, baseline_name)
    if record["decision"].get("awaiting"):
        record["decision"]["label"] = {n: label_command(stages[n]["path"], baseline, d.eval_prompts, files[n],
                                                        e.limit, e.max_new_tokens)
                                       for n in record["decision"]["awaiting"]}
        for n, command in record["decision"]["label"].items():
            log.warning("%s %s awaits human evaluation; people judge it against %s with:\n  %s\nthen `align run` "
                        "again decides", version, n, baseline_name, command)
    home.write(record)


def gold_decides(prompts: str | None, limit: int) -> bool:
    """Whether the held-out prompts carry gold answers, so that the gold judge can decide without the RM."""
    return bool(prompts) and any(answer is not None for _, answer in load_prompts(prompts, limit))


def human_files(home: Home, version: str, new: list[str]) -> dict[str, Path]:
    return {n: home.root / version / "human" / f"{n}.jsonl" for n in new}


def _same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def human_part(path: Path, policy: str, baseline: str | None) -> dict[str, Any]:
    """The human_… keys of the judgements in `path` that compare `policy` with `baseline` (human_n 0 when none)."""
    rows = [r for r in read_lines(path) if _same(r.get("candidate"), policy) and _same(r.get("baseline"), baseline)]
    if not rows:
        return {"human_n": 0}
    return {k: v for k, v in human_report(rows).items() if k.startswith("human_")}


def label_command(policy: str, baseline: str | None, prompts: str, out: Path, limit: int, max_new_tokens: int) -> str:
    """The `align label` command that shows people the evaluation's own prompts, answered as it answered them."""
    against = f" --against {baseline}" if baseline else ""
    return (f"align label --policy {policy}{against} --prompts {prompts} --limit {limit} --max-new-tokens "
            f"{max_new_tokens} --out {out}")


def promote(home: Home, record: dict[str, Any], reports: dict[str, dict[str, Any]], rule,
            champion: dict[str, Any] | None, baseline_name: str) -> dict[str, Any]:
    """Apply the rule; a promoted policy becomes the champion. On the first version, with no champion yet and no
    policy better than SFT, SFT becomes the first champion (the next round has something to beat)."""
    stages, version = record["stages"], record["version"]
    decision = {**decide(reports, rule, baseline_name), "decided": now(), "previous_champion": champion}
    winner = decision["promote"]
    if winner is None and champion is None and "sft" in stages:
        winner = "sft"
        decision["reason"] += "; SFT becomes the first champion"
    if winner is None:
        if champion is not None and home.champion() != champion:  # a re-evaluation undid this version's win
            home.set_champion(champion)
        decision.update(champion=champion, changed=False)
        log.info("decision: keep %s — %s", baseline_name, decision["reason"])
        return decision
    new = {"version": version, "stage": winner, "path": stages[winner]["path"], "key": stages[winner]["key"],
           "since": now(), "reason": decision["reason"],
           "metrics": headline(reports[winner]) if winner in reports else {}}
    home.set_champion(new)
    decision.update(champion=new, changed=True)
    log.info("decision: %s %s is the champion — %s", version, winner, decision["reason"])
    return decision


def finish(p, home: Home, record: dict[str, Any]) -> None:
    """Merge a newly promoted champion into a plain model directory, then write the report."""

    decision = record.get("decision") or {}
    champion = decision.get("champion") if decision.get("changed") else None
    record["merged"] = None
    if p.settings.merge.enabled and champion is not None:
        out = home.root / record["version"] / "merged"
        log.info("merge: %s %s into %s", champion["version"], champion["stage"], out)
        summary = merge(champion["path"], str(out), p.settings.merge.dtype, force=True)
        record["merged"] = {"path": str(out), "stage": champion["stage"], "dtype": p.settings.merge.dtype,
                            "verification": summary.get("verification")}
    record["status"] = "done"  # the report says so; a failure while writing it sets "failed" again
    record["report"] = str(write_report(home.root, record))
    home.write(record)
