"""GRPO and RLOO: online RL from rewards you can compute — a checker, a reward model, or both — with no value model.

    align grpo --config recipes/configs/grpo.yaml init_from_sft=runs/demo/sft rewards=[gold]

Each step: `rollout.batch_size` prompts, each answered `grpo.num_generations` times by the policy (one sampling
path: softmax(logits / rollout.temperature), nothing else); every answer scored by the rewards (a weighted sum,
align/stages/rewards.py); each answer's advantage is its reward against the other answers to the same prompt
(grpo: centred and divided by the group's std; Dr. GRPO without the std; rloo: leave-one-out), one number for all
its tokens; then `grpo.epochs` passes of the token-level clipped objective over mini-batches, ratios against the
log-probs the answers were sampled with, plus β·k3 KL to the reference. The maths is align/rl/advantages.py
(group_advantages) and align/rl/losses.py (grpo_policy_loss), pure and tested by hand.

One base in memory: the policy is a trainable adapter (from the SFT adapter's weights), the reference the frozen
SFT adapter — not even loaded when grpo.beta is 0 — and a reward model, when one is among the rewards, the reward
run's adapter and score head. Groups whose answers all score alike teach nothing; they are counted (uniform_share)
and, with grpo.skip_uniform_groups, left out of the update.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.modeling.generate import Sampling, sample_batch
from align.modeling.models import REFERENCE, adapter_params, add_adapter_from, resolve_quantization
from align.modeling.recompute import checkpoint_follows_adapters
from align.modeling.roles import POLICY, Batch, Roles, make_batch
from align.rl.advantages import group_advantages
from align.rl.losses import grpo_policy_loss
from align.rl.masked import masked_mean
from align.runtime.checkpoint import load_checkpoint
from align.runtime.config import GRPOConfig
from align.runtime.distributed import any_rank, is_main, mean_over_ranks, weights_spread, world_size
from align.runtime.errors import TrainingStopped
from align.runtime.guards import oom_as_message
from align.runtime.rundir import nothing_to_train, prepare_output
from align.runtime.runs import make_manifest
from align.stages import online
from align.stages.common import (
    Prepared,
    build_lora_model,
    save_stage,
    use_cuda_defaults,
)
from align.stages.online import checkpoint, kl_guard, optimizer_step, prompt_rows, rewards_of
from align.stages.rewards import model_term, reward_names

log = logging.getLogger(__name__)
STAGE = "grpo"


def setup(cfg: GRPOConfig) -> Prepared:
    """Everything that can fail on user input, before a model is loaded (align/stages/online.py)."""
    return online.setup(cfg)


def build_roles(prep: Prepared) -> Roles:
    """One base: the policy trainable; the reference (only when β > 0) and a reward model frozen, as adapters."""
    cfg = prep.cfg
    model = build_lora_model(prep)  # the policy, from SFT when there is one
    checkpointing = use_cuda_defaults(cfg)["gradient_checkpointing"]
    if checkpointing and resolve_quantization(cfg.model) != "nf4":  # (the 4-bit path does it in attach_lora)
        model.enable_input_require_grads()
    dev = next(p for p in model.parameters()).device
    if cfg.grpo.beta > 0 and prep.sft is not None:
        add_adapter_from(model, REFERENCE, prep.sft, cfg.lora, trainable=False)
    same_base, score_head, separate = online.add_reward_model(model, prep, dev)
    model.base_model.set_adapter(POLICY)
    if checkpointing:  # the reward role's forwards run between the policy's, outside any backward: still safe
        checkpoint_follows_adapters(model)
    roles = Roles(model, None, score_head, separate)
    with roles.role(POLICY):
        pass  # leaves exactly the policy adapter trainable
    reference = ("none (grpo.beta=0)" if cfg.grpo.beta == 0 else "SFT adapter" if prep.sft is not None
                 else "base (adapters off)")
    log.info("one base, roles as adapters: policy%s, reference=%s, reward model=%s",
             f" (from {prep.source})" if prep.source else "", reference,
             "adapter + head" if same_base else "separate model" if separate is not None else "none")
    return roles


# ---------------------------------------------------------------------------------------------- one step


@dataclass
class Groups:
    """A step's sampled answers: `rollout.batch_size` prompts × G answers, each prompt's answers side by side."""

    rows: list[int]            # B·G prompt rows, each repeated G times
    texts: list[str]           # B·G decoded answers
    old_logp: torch.Tensor | None  # (B·G, T) under the policy that sampled them: the ratio's denominator; None
                                   # when one optimizer step takes them all (the policy is still the sampler then)
    ref_logp: torch.Tensor | None  # (B·G, T) under the reference; None when β = 0
    rewards: torch.Tensor      # (B·G,) the rewards' weighted sum, minus the missing-EOS penalty
    terms: dict[str, float]    # each reward's mean
    gen_seconds: float
    score_seconds: float


def sample_groups(roles: Roles, prep: Prepared, rows: list[int]) -> tuple[Batch, Groups]:
    cfg, tok = prep.cfg, prep.tokenizer
    g, temperature = cfg.grpo.num_generations, cfg.rollout.temperature
    distinct, rows = rows, [i for i in rows for _ in range(g)]
    roles.model.eval()
    start = time.monotonic()
    # each prompt read once, its G answers drawn from its cache (tokenized once, when the data was loaded)
    drawn = [answer for answers in sample_batch(
        roles.model, tok, [prep.train.examples[i].prompt for i in distinct], Sampling(temperature, 1.0, g),
        cfg.rollout.max_new_tokens, batch_size=len(rows), encoded=[prep.train.encoded[i] for i in distinct])
        for answer in answers]
    gen_seconds = time.monotonic() - start
    prompt_ids = [prep.train.encoded[i] for i in rows]
    prompts = [prep.train.examples[i].prompt for i in rows]
    texts = [text for text, _ in drawn]
    dev = next(roles.model.parameters()).device
    batch = make_batch(prompt_ids, [tokens for _, tokens in drawn], tok.pad_token_id, tok.eos_token_id, dev,
                       prompt_of=rows)
    # in slices of the update's batch size: the logits of all B·G answers at once would grow with the batch
    slices = [torch.arange(i, min(i + cfg.training.batch_size, len(rows)), device=dev)
              for i in range(0, len(rows), cfg.training.batch_size)]

    def each(fn) -> torch.Tensor:
        return torch.cat([fn(batch.select(s), s.tolist()) for s in slices])

    with torch.no_grad():
        old_logp = None if on_policy(cfg, len(rows)) else each(lambda b, _: roles.policy_logps(b, temperature))
        ref_logp = None
        if cfg.grpo.beta > 0:
            with roles.role(REFERENCE):  # read at the sampling temperature: the KL compares like with like
                ref_logp = each(lambda b, _: roles.policy_logps(b, temperature))
        model_scores = None
        if model_term(prep.terms) is not None:
            model_scores = each(lambda b, idx: roles.rewards(b, [prompts[i] for i in idx], [texts[i] for i in idx]))
    rewards, terms = rewards_of(prep, rows, texts, model_scores)
    rewards = rewards.to(dev) - cfg.rollout.missing_eos_penalty * (~batch.ended).float()
    return batch, Groups(rows, texts, old_logp, ref_logp, rewards, terms, gen_seconds,
                         time.monotonic() - start - gen_seconds)


def on_policy(cfg: GRPOConfig, answers: int) -> bool:
    """Whether one optimizer step takes every answer of a generation batch: then the policy that computes the loss
    is the one that sampled, its ratios are exactly 1 in value, and the sampling-time log-probs need no pass of
    their own (the loss's own log-probs, detached, are they)."""
    return cfg.grpo.epochs == 1 and answers <= cfg.training.batch_size * cfg.training.grad_accum


def update(roles: Roles, cfg: GRPOConfig, batch: Batch, grp: Groups, advantages: torch.Tensor, keep: torch.Tensor,
           optimizer, params: dict[str, list[torch.nn.Parameter]], accelerator, kl: list[float]) -> dict[str, float]:
    """`grpo.epochs` passes of the clipped objective over shuffled mini-batches of the answers in `keep`; each
    answer's KL to the reference (when there is one) goes into `kl`, from its first pass."""
    t, p = cfg.training, cfg.grpo
    roles.model.train()
    sums: dict[str, list[float]] = {}
    accum = 0
    bad: list[str] = []
    for epoch in range(p.epochs):
        order = keep[torch.randperm(len(keep))]
        for start in range(0, len(order), t.batch_size):
            rows = order[start:start + t.batch_size].to(batch.ids.device)
            mb = batch.select(rows)
            logp, ent = roles.policy_logps(mb, cfg.rollout.temperature, with_entropy=True)
            old = logp.detach() if grp.old_logp is None else grp.old_logp[rows]
            loss, m = grpo_policy_loss(logp, old, advantages[rows], mb.resp_mask, p.clip_low,
                                       p.clip_high, None if grp.ref_logp is None else grp.ref_logp[rows], p.beta,
                                       p.loss_norm, cfg.rollout.max_new_tokens)
            if torch.isfinite(loss):
                accelerator.backward(loss / t.grad_accum)
            else:  # reported at the optimizer step, which every process reaches together
                bad.append(f"non-finite GRPO loss {loss.item()}")
            accum += 1
            if accum % t.grad_accum == 0:
                optimizer_step(optimizer, params, t.max_grad_norm, accelerator, sums, bad, "GRPO")
            if epoch == 0 and grp.ref_logp is not None and grp.old_logp is None:
                d = grp.ref_logp[rows] - old
                kl += ((torch.exp(d) - d - 1) * mb.resp_mask).sum(1).tolist()
            for key, value in {"loss": loss, **m, "entropy": masked_mean(ent, mb.resp_mask)}.items():
                sums.setdefault(key, []).append(float(value.detach()))
    if accum % t.grad_accum:
        optimizer_step(optimizer, params, t.max_grad_norm, accelerator, sums, bad, "GRPO")
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _check_rewards(grp: Groups, step: int) -> None:
    bad = ~torch.isfinite(grp.rewards)
    if any_rank(bool(bad.any())) and not bad.any():  # every process skips the step together
        raise FloatingPointError(f"step {step}: non-finite reward(s) in another process")
    if bad.any():
        shown = [f"  answer {grp.texts[i][:80]!r}" for i in torch.nonzero(bad).flatten().tolist()[:3]]
        raise FloatingPointError(f"step {step}: {int(bad.sum())} non-finite reward(s) (a reward model's score of an "
                                 "answer too long for it?), e.g.\n" + "\n".join(shown))


def _step_metrics(batch: Batch, grp: Groups, uniform: torch.Tensor, g: int) -> dict[str, float]:
    m = batch.resp_mask
    groups = grp.rewards.view(-1, g)
    out = {"reward_mean": grp.rewards.mean().item(), "reward_std": grp.rewards.std().item(),
           **{f"reward_{name}": value for name, value in grp.terms.items()},
           "group_std": groups.std(1).mean().item(), "uniform_share": uniform.float().mean().item(),
           "response_tokens": m.sum(1).mean().item(), "no_eos_share": (~batch.ended).float().mean().item(),
           "generation_seconds": grp.gen_seconds, "scoring_seconds": grp.score_seconds}
    return out


@dataclass
class LoopState:
    """What the loop carries between steps; a checkpoint's trainer_state.json holds all of it."""

    scheduler: Any
    step: int = 0
    log_history: list[dict[str, float]] = field(default_factory=list)
    kl_over: int = 0
    bad_steps: int = 0

    def to_checkpoint(self) -> dict[str, Any]:
        return {"log_history": self.log_history, "kl_over": self.kl_over, "bad_steps": self.bad_steps,
                "scheduler": self.scheduler.state_dict(), "step": self.step}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], scheduler) -> LoopState:
        scheduler.load_state_dict(saved["scheduler"])
        return cls(scheduler, saved["step"], saved["log_history"], saved["kl_over"], saved["bad_steps"])


def _step(prep: Prepared, roles: Roles, state: LoopState, step: int, optimizer,
          params: dict[str, list[torch.nn.Parameter]], accelerator) -> dict[str, float] | None:
    """GRPO step `step` (from 0): its metrics, or None when it was skipped on non-finite numbers."""
    cfg, t, p = prep.cfg, prep.cfg.training, prep.cfg.grpo
    b, world, rank = cfg.rollout.batch_size, accelerator.num_processes, accelerator.process_index
    # each process answers its own share of the step's prompts (rollout.batch_size is per process)
    rows = prompt_rows(len(prep.train.encoded), b * world, step, t.seed)[rank * b:(rank + 1) * b]
    batch, grp = sample_groups(roles, prep, rows)
    start = time.monotonic()
    try:
        _check_rewards(grp, step + 1)
        advantages, uniform = group_advantages(grp.rewards, p.num_generations, p.advantage, p.scale_rewards)
        metrics = _step_metrics(batch, grp, uniform, p.num_generations)
        kl: list[float] = []
        keep = torch.arange(len(grp.rows))
        if p.skip_uniform_groups and world == 1:  # (processes must take the same number of optimizer steps)
            keep = keep[~uniform.repeat_interleave(p.num_generations)]
        if len(keep):
            metrics.update(update(roles, cfg, batch, grp, advantages, keep, optimizer, params, accelerator, kl))
        if grp.ref_logp is not None and grp.old_logp is not None:
            d = grp.ref_logp - grp.old_logp
            kl = ((torch.exp(d) - d - 1) * batch.resp_mask).sum(1).tolist()
        if kl:  # k3 to the reference at the sampling-time policy, summed per answer (on-policy: the trained ones)
            metrics["kl"] = sum(kl) / len(kl)
        metrics["trained_answers"] = len(keep)
        metrics = mean_over_ranks(metrics)
    except FloatingPointError as e:
        state.bad_steps += 1
        log.error("GRPO step %d skipped: %s", step + 1, e)
        if state.bad_steps >= t.max_bad_steps:
            raise TrainingStopped(f"{state.bad_steps} GRPO steps in a row failed on non-finite numbers "
                                  f"(last: {e}). Check the rewards and lower training.learning_rate; the last "
                                  f"checkpoint is kept in {prep.paths.work}") from None
        return None
    state.bad_steps = 0
    with warnings.catch_warnings():  # a step whose groups all scored alike took no optimizer step: still a step
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step", category=UserWarning)
        state.scheduler.step()
    metrics["train_seconds"] = time.monotonic() - start
    metrics["step"] = step + 1
    state.log_history.append(metrics)
    return metrics


def _log_step(m: dict[str, float]) -> None:
    terms = ", ".join(f"{k[7:]} {v:.3f}" for k, v in m.items() if k.startswith("reward_") and k[7:] not in
                      ("mean", "std"))
    log.info("step %d: reward %.3f ± %.3f (%s), group std %.3f, %.0f%% uniform groups, KL %s, entropy %s, clip "
             "%s/%s, %.1f tokens, %.0f%% no EOS, gen %.1fs / train %.1fs", m["step"], m["reward_mean"],
             m["reward_std"], terms, m["group_std"], 100 * m["uniform_share"],
             f"{m['kl']:.3f}" if "kl" in m else "-", _fmt(m, "entropy"), _fmt(m, "clip_low_fraction"),
             _fmt(m, "clip_high_fraction"), m["response_tokens"], 100 * m["no_eos_share"], m["generation_seconds"],
             m["train_seconds"])


def _fmt(m: dict[str, float], key: str) -> str:
    return f"{m[key]:.3f}" if key in m else "-"


def train_loop(prep: Prepared, roles: Roles, resume_from: Path | None) -> dict[str, Any]:
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    t = prep.cfg.training
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    named = adapter_params(roles.model, (POLICY,))
    params = {"policy": list(named.values())}
    optimizer = torch.optim.AdamW(params["policy"], lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * t.max_steps),
                              num_training_steps=t.max_steps)
    state = LoopState(scheduler)
    torch.manual_seed(t.seed + accelerator.process_index)  # processes sample different answers
    if resume_from is not None:
        weights, saved = load_checkpoint(resume_from, optimizer)
        with torch.no_grad():
            for name, value in weights.items():
                named[name].copy_(value)
        state = LoopState.from_checkpoint(saved, scheduler)
        if accelerator.num_processes > 1:  # the checkpoint holds the main process's random state only
            torch.manual_seed(t.seed + accelerator.process_index + state.step * accelerator.num_processes)
            log.warning("multi-process GRPO resumed at step %d: sampling continues from fresh seeds, so the run is "
                        "not an exact continuation", state.step)
        log.info("resumed GRPO at step %d from %s", state.step, resume_from)
    bar = tqdm(range(state.step, t.max_steps), initial=state.step, total=t.max_steps, desc="grpo", unit="step",
               file=sys.stderr)
    for step in bar:
        metrics = _step(prep, roles, state, step, optimizer, params, accelerator)
        state.step = step + 1
        if metrics is None:
            continue
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", uniform=f"{metrics['uniform_share']:.2f}")
        if state.step % t.logging_steps == 0:
            _log_step(metrics)
        kl_guard(state, metrics, prep.cfg.grpo, prep.paths.work)
        if state.step % t.save_steps == 0 and state.step < t.max_steps:
            checkpoint(prep.paths.work, state, named, optimizer, t.save_total_limit, accelerator)
    bar.close()
    return {"steps": t.max_steps, "log_history": state.log_history}


def train(prep: Prepared) -> Path:
    cfg = prep.cfg
    if nothing_to_train(cfg, prep.paths, prep.inputs, "base model, data, rewards and config"):
        return prep.paths.out
    ckpt = prepare_output(cfg, prep.paths, prep.inputs)
    from transformers import set_seed

    set_seed(cfg.training.seed)
    roles = build_roles(prep)
    quantization = resolve_quantization(cfg.model)
    metrics: dict[str, Any] = {"n_prompts": len(prep.train.encoded), "n_rejected": len(prep.train.rejects),
                               "trainable_params": sum(p.numel() for p in adapter_params(roles.model, (POLICY,))
                                                       .values()),
                               "quantization": quantization, "resumed_from": ckpt.name if ckpt else None}
    start = time.time()
    answers = cfg.rollout.batch_size * cfg.grpo.num_generations
    with oom_as_message(STAGE, cfg, prep.paths.work, f"; sampling holds rollout.batch_size × grpo.num_generations = "
                        f"{answers} answers of up to rollout.max_new_tokens={cfg.rollout.max_new_tokens} at once"):
        metrics.update(train_loop(prep, roles, ckpt))
    metrics["train_seconds"] = time.time() - start
    metrics.update(processes=world_size(), rank_weight_spread=weights_spread(adapter_params(roles.model, (POLICY,))))
    if not is_main():  # the main process evaluates and writes the output
        return prep.paths.out
    history = metrics["log_history"]
    if history:
        k = max(1, len(history) // 5)
        for key in ("reward_mean", "uniform_share", "kl"):
            if all(key in h for h in history):
                metrics[f"{key}_first"] = sum(h[key] for h in history[:k]) / k
                metrics[f"{key}_last"] = sum(h[key] for h in history[-k:]) / k
    parent = str(prep.sft.resolve()) if prep.sft is not None else None
    manifest = make_manifest(STAGE, cfg.run, prep.inputs, prep.model_ref.description, parent=parent,
                             extra={"quantization": quantization, "seed": cfg.training.seed, **prep.lineage(),
                                    "rewards": reward_names(prep.terms)})
    return save_stage(cfg, prep.paths, roles.model, prep.tokenizer, metrics, manifest, adapters=[POLICY])


def run(cfg: GRPOConfig) -> Path:
    return train(setup(cfg))
