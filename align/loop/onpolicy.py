"""On-policy preference pairs: the policy answers each prompt n times, a judge scores the answers, and the best
and worst answer of a prompt become a pair (prompts whose answers all score alike give none).

    align pairs --policy runs/demo/sft --prompts reward_data/prefs/train.jsonl --out runs/demo/pairs.jsonl

Pairs made from the policy's own samples teach it about the mistakes it actually makes; templated pairs mostly
contrast answers the policy would never give. The judge is the gold judge (rows carry an integer "answer") or a
reward run; the output is a pair file every stage reads (prompt, chosen, rejected, chosen_score,
rejected_score).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from align.data.prompts import load_prompts
from align.data.shipped import require_gold_judge
from align.modeling.formatting import Messages
from align.modeling.generate import Sampling, sample_batch
from align.runtime.errors import ConfigError, OutputError
from align.runtime.runs import atomic_write_text
from align.serving.score import load_reward_model
from align.serving.trained import load_policy

log = logging.getLogger(__name__)


def _unique(prompts: list[tuple[Messages, int | None]]) -> list[tuple[Messages, int | None]]:
    seen, out = set(), []
    for messages, answer in prompts:
        key = json.dumps(messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((messages, answer))
    return out


def _gold_scorer(prompts: list[tuple[Messages, int | None]], judge):
    def score(i: int, texts: list[str]) -> list[float | None]:
        messages, answer = prompts[i]
        return [judge.gold_score(messages[-1]["content"], t, answer) for t in texts]

    return score


def _rm_scorer(path: str, prompts: list[tuple[Messages, int | None]], samples: list[list[str]], device: str):
    """Scores every sample with the reward model up front (batched), then hands them out per prompt."""

    rm = load_reward_model(path, device)
    n = len(samples[0]) if samples else 0
    # an answer too long for the reward model gets None: not judged
    flat = rm.score_answers([p for p, _ in prompts for _ in range(n)], [t for texts in samples for t in texts])
    return lambda i, texts: flat[i * n:(i + 1) * n]


def best_vs_worst(candidates: list[tuple[float | None, str, bool]]
                  ) -> tuple[tuple[float, str], tuple[float, str]] | None:
    """(score, text) of the best and the worst of one prompt's answers, given as (score, text, ended with EOS).

    Answers without a score, empty ones and ones cut off before their EOS are not candidates (a pair contrasts
    whole answers); among equal scores the shorter answer is taken. None when fewer than two distinct scores.
    """
    scored = [(x, t) for x, t, ended in candidates if x is not None and t.strip() and ended]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda st: (st[0], -len(st[1])))
    worst = min(scored, key=lambda st: (st[0], -len(st[1])))
    return (best, worst) if best[0] - worst[0] > 1e-9 else None


USED_FILE = "used-prompts.jsonl"  # in a pipeline directory: the prompts its rounds have drawn pairs from


def _key(messages: Messages) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def used_prompts(pipeline: Path) -> set[str]:
    path = pipeline / USED_FILE
    if not path.is_file():
        return set()
    return {json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def _record_used(pipeline: Path, prompts: list[tuple[Messages, int | None]], out: Path) -> None:
    """Append what this run drew from to the pipeline's ledger (rewritten whole, atomically)."""
    path = pipeline / USED_FILE
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    new = "".join(json.dumps({"prompt": _key(m), "pairs": str(out)}, ensure_ascii=False) + "\n" for m, _ in prompts)
    atomic_write_text(path, old + new)


def sample_pairs(policy: str, prompts_spec: str, out: str, judge: str = "gold",
                 sampling: Sampling = Sampling(1.0, 1.0, 4), max_new_tokens: int = 64, limit: int | None = None,
                 seed: int = 0, batch_size: int = 64,
                 device: str = "auto", force: bool = False, skip: int = 0, fresh: bool = False) -> dict[str, Any]:
    """Pairs from `policy`'s own answers to the prompts of `prompts_spec`, after the first `skip` of them (and, with
    `fresh`, only prompts the pipeline directory `policy` has not drawn pairs from before), at most `limit`."""
    if sampling.n < 2:
        raise ConfigError("--n must be at least 2: a pair needs two answers to the same prompt")
    out_path = Path(out)
    if out_path.exists() and not force:
        raise OutputError(f"--out {out} already exists; pass --force to replace it")
    pipeline = Path(policy)
    if fresh and not (pipeline / "champion.json").is_file():
        raise ConfigError(f"--fresh needs --policy to be a pipeline directory (runs/<name>, with champion.json): its "
                          f"ledger {USED_FILE} says which prompts earlier rounds used; {policy} is not one")
    all_prompts = _unique(load_prompts(prompts_spec, 10**12))
    used = used_prompts(pipeline) if fresh else set()
    new = [(m, a) for m, a in all_prompts if _key(m) not in used]
    if fresh and not new:
        raise ConfigError(f"--fresh: all {len(all_prompts)} prompts of {prompts_spec} were used by earlier rounds "
                          f"({pipeline / USED_FILE}); bring new prompts, or leave out --fresh to reuse them")
    prompts = new[skip:]
    if limit is not None:
        prompts = prompts[:limit]
    if judge == "gold":
        gold = require_gold_judge("--judge gold", "pass --judge runs/<run>/reward to judge with a reward model")
        without = sum(a is None for _, a in prompts)
        prompts = [(p, a) for p, a in prompts if a is not None]
        if without:
            log.warning("%d prompts have no integer 'answer' for the gold judge and are skipped", without)
    if not prompts:
        raise ConfigError(f"--prompts {prompts_spec}: no usable prompts" +
                          (" with an integer 'answer' (the gold judge needs one)" if judge == "gold" else ""))
    model, tokenizer, _ = load_policy(policy, device)
    torch.manual_seed(seed)
    start = time.monotonic()
    drawn = sample_batch(model, tokenizer, [p for p, _ in prompts], sampling, max_new_tokens, batch_size,
                         desc="sampling answers")
    gen_seconds = time.monotonic() - start
    eos = tokenizer.eos_token_id
    texts = [[t for t, _ in answers] for answers in drawn]
    scorer = _gold_scorer(prompts, gold) if judge == "gold" else _rm_scorer(judge, prompts, texts, device)
    rows, all_scores = [], []
    for i, (messages, answer) in enumerate(prompts):
        scores = scorer(i, texts[i])
        all_scores += [x for x in scores if x is not None]
        ended = [bool(tok) and tok[-1] == eos for _, tok in drawn[i]]
        pair = best_vs_worst(list(zip(scores, texts[i], ended)))
        if pair is None:
            continue
        (chosen_score, chosen), (rejected_score, rejected) = pair
        row = {"prompt": messages[0]["content"] if len(messages) == 1 else messages, "chosen": chosen,
               "rejected": rejected, "chosen_score": chosen_score, "rejected_score": rejected_score}
        if answer is not None:
            row["answer"] = answer
        rows.append(row)
    atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if fresh:
        _record_used(pipeline, prompts, out_path)
    n_samples = sum(len(t) for t in texts)
    return {"prompts": len(prompts), "skipped_as_used": len(all_prompts) - len(new), "samples": n_samples,
            "pairs": len(rows),
            "mean_score": sum(all_scores) / len(all_scores) if all_scores else None,
            "no_eos_share": sum(not tok or tok[-1] != eos for a in drawn for _, tok in a) / max(n_samples, 1),
            "generation_seconds": round(gen_seconds, 1), "out": str(out_path)}
