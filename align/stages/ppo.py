"""PPO: the policy adapter learns to raise a trained reward model's score, held near the SFT policy by a KL
penalty — classic RLHF on one base model (see align/modeling/roles.py for the four roles).

    align ppo --config recipes/configs/ppo.yaml init_from_sft=runs/demo/sft reward_model=runs/demo/reward

Each step: sample answers to a batch of prompts (rollouts), score them with the reward model (at the EOS; an
answer cut off before its EOS loses `rollout.missing_eos_penalty`), subtract a per-token KL penalty against the
reference, estimate advantages with GAE over the value adapter's estimates, then run `ppo.epochs` passes of
clipped policy and value updates over mini-batches. The maths is in align/rl/advantages.py and align/rl/losses.py
(pure, tested by hand). TRL 1.16 has no PPO, so the loop is ours; devices and gradient sync come from accelerate.

The value model is a separate trainable adapter plus a scalar head, started from the reward model (its LoRA
weights, as in InstructGPT) when the shapes allow: a value head sharing the policy's adapter would let value-loss
gradients reshape the policy's features, and its loss scale would then need tuning against the policy's. Its head
starts from the reward model's only when rewards are not normalised: with `ppo.normalize_reward` the returns it
learns are scores centred and scaled by their running statistics, so the raw-score head would start every value
off by the reward model's mean (a bias in the first advantages that grows with answer length); it starts at zero,
the normalised returns' mean.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.modeling.formatting import Messages
from align.modeling.generate import Sampling, sample_batch
from align.modeling.models import (
    REFERENCE,
    adapter_of,
    adapter_params,
    add_adapter_from,
    lora_like,
    peft_lora_config,
    resolve_quantization,
)
from align.modeling.recompute import checkpoint_follows_adapters
from align.modeling.roles import POLICY, VALUE, Batch, Roles, head_from, make_batch
from align.rl.advantages import (
    KLController,
    RunningMoments,
    gae,
    kl_per_token,
    shaped_rewards,
    whiten,
)
from align.rl.losses import ppo_policy_loss, ppo_value_loss
from align.rl.masked import masked_mean, masked_var
from align.runtime.checkpoint import load_checkpoint
from align.runtime.config import PPOConfig
from align.runtime.distributed import (
    any_rank,
    gather,
    is_main,
    mean_over_ranks,
    weights_spread,
    world_size,
)
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
STAGE = "ppo"


# ---------------------------------------------------------------------------------------------- setup


def setup(cfg: PPOConfig) -> Prepared:
    """Everything that can fail on user input, before a model is loaded (align/stages/online.py)."""
    return online.setup(cfg)


def build_roles(prep: Prepared) -> Roles:
    """One base; policy (+ value) trainable, reference and reward frozen, all as adapters on it."""

    cfg, rm = prep.cfg, model_term(prep.terms)
    quantized = resolve_quantization(cfg.model) == "nf4"
    lora = lora_like(cfg.lora, prep.source) if prep.source is not None else cfg.lora
    model = build_lora_model(prep)  # the policy, from SFT when there is one
    hidden = model.config.hidden_size
    checkpointing = use_cuda_defaults(cfg)["gradient_checkpointing"]
    if checkpointing and not quantized:  # (the 4-bit path does it in attach_lora); checkpointing itself: below
        model.enable_input_require_grads()
    dev = next(p for p in model.parameters()).device
    if prep.sft is not None:
        add_adapter_from(model, REFERENCE, prep.sft, cfg.lora, trainable=False)
    same_base, score_head, separate = online.add_reward_model(model, prep, dev)
    if same_base:
        add_adapter_from(model, VALUE, rm.model, cfg.lora, trainable=True)  # the value model starts as the RM
        value_head = head_from(rm.model, hidden, torch.float32, dev)
        if cfg.ppo.normalize_reward:  # its targets are normalised returns, not the RM's raw scores: see above
            torch.nn.init.zeros_(value_head.weight)
    else:
        model.add_adapter(VALUE, peft_lora_config(lora))  # no reward model to start from: a fresh value model
        value_head = torch.nn.Linear(hidden, 1, bias=False, device=dev)
        torch.nn.init.zeros_(value_head.weight)
    model.base_model.set_adapter(POLICY)
    if checkpointing:  # the value forward's role ends before the one backward pass of policy + value loss
        checkpoint_follows_adapters(model)
    roles = Roles(model, value_head, score_head, separate)
    with roles.role(POLICY):
        pass  # leaves exactly the policy and value adapters trainable
    log.info("one base, roles as adapters: policy%s, reference=%s, reward model=%s, value",
             f" (from {prep.source})" if prep.source else "", "SFT adapter" if prep.sft else "base (adapters off)",
             "adapter + head" if same_base else "separate model" if separate is not None else "none")
    return roles


# ---------------------------------------------------------------------------------------------- one step


@dataclass
class Rollout:
    """What a step needs of its sampled answers besides their Batch: B prompts, answers of up to T tokens."""

    prompts: list[Messages]   # B, shown when a reward is not finite
    texts: list[str]          # B decoded answers, which a reward model on another base re-encodes
    old_logp: torch.Tensor    # (B, T) under the policy that sampled them: the ratio's denominator
    ref_logp: torch.Tensor    # (B, T) under the reference, for the KL penalty
    old_values: torch.Tensor  # (B, T) before the update: GAE's baseline and the value clip's centre
    scores: torch.Tensor      # (B,) the rewards' weighted sum, before the missing-EOS penalty and normalisation
    terms: dict[str, float]   # each reward's mean over the batch
    gen_seconds: float
    score_seconds: float      # the four scoring passes above, after generation


@dataclass
class Advantages:
    advantages: torch.Tensor     # (B, T) GAE, whitened when ppo.whiten_advantages
    returns: torch.Tensor        # (B, T) the value model's targets
    kl: torch.Tensor             # (B,) per-answer KL to the reference (summed over tokens)
    shaped_scores: torch.Tensor  # (B,) the scores as the rewards used them: penalised, normalised, clipped


def rollout(roles: Roles, prep: Prepared, rows: list[int]) -> tuple[Batch, Rollout]:
    """Sample answers to the prompts `rows` with the policy; return the batch and what the step needs of it."""
    cfg, tok = prep.cfg, prep.tokenizer
    prompts = [prep.train.examples[i].prompt for i in rows]
    roles.model.eval()
    start = time.monotonic()
    prompt_ids = [prep.train.encoded[i] for i in rows]  # tokenized once, when the data was loaded
    temperature = cfg.rollout.temperature
    drawn = sample_batch(roles.model, tok, prompts, Sampling(temperature, 1.0, 1), cfg.rollout.max_new_tokens,
                         batch_size=len(prompts), encoded=prompt_ids)
    gen_seconds = time.monotonic() - start
    responses = [tokens for ((_, tokens),) in drawn]
    texts = [text for ((text, _),) in drawn]
    dev = next(roles.model.parameters()).device
    batch = make_batch(prompt_ids, responses, tok.pad_token_id, tok.eos_token_id, dev)
    # scored in slices of the update's batch size: the logits of a whole rollout batch at once would make the
    # peak memory grow with rollout.batch_size (64 prompts × 128 tokens × 152k vocabulary ≈ 4.6 GiB per tensor)
    slices = [torch.arange(i, min(i + cfg.training.batch_size, len(rows)), device=dev)
              for i in range(0, len(rows), cfg.training.batch_size)]

    def each(fn) -> torch.Tensor:
        return torch.cat([fn(batch.select(rows_), rows_.tolist()) for rows_ in slices])

    with torch.no_grad():
        old_logp = each(lambda b, _: roles.policy_logps(b, temperature))
        with roles.role(REFERENCE):  # the reference read at the same temperature: the KL compares like with like
            ref_logp = each(lambda b, _: roles.policy_logps(b, temperature))
        with roles.role(VALUE):
            old_values = each(lambda b, _: roles.values(b))
        model_scores = None
        if model_term(prep.terms) is not None:
            model_scores = each(lambda b, idx: roles.rewards(b, [prompts[i] for i in idx], [texts[i] for i in idx]))
    scores, terms = rewards_of(prep, rows, texts, model_scores)
    return batch, Rollout(prompts, texts, old_logp, ref_logp, old_values, scores.to(dev), terms, gen_seconds,
                          time.monotonic() - start - gen_seconds)


def advantages_of(cfg: PPOConfig, batch: Batch, r: Rollout, kl_coef: float, moments: RunningMoments) -> Advantages:
    """Rewards → per-token shaped rewards → GAE advantages and returns."""
    p = cfg.ppo
    scores = r.scores - cfg.rollout.missing_eos_penalty * (~batch.ended).float()
    moments.update(gather(scores))  # every process normalises with the statistics of all processes' rewards
    if p.normalize_reward:
        scores = (scores - moments.mean) / max(moments.std, 1e-6)
    if p.reward_clip is not None:
        scores = scores.clamp(-p.reward_clip, p.reward_clip)
    kl = kl_per_token(r.old_logp, r.ref_logp, p.kl_estimator) * batch.resp_mask
    rewards = shaped_rewards(scores, kl, batch.resp_mask, kl_coef)
    adv, returns = gae(rewards, r.old_values, batch.resp_mask, p.gamma, p.lam)
    if p.whiten_advantages:
        adv = whiten(adv, batch.resp_mask)
    return Advantages(adv, returns, kl.sum(1), scores)


def update(roles: Roles, cfg: PPOConfig, batch: Batch, r: Rollout, a: Advantages,
           optimizer, params: dict[str, list[torch.nn.Parameter]], accelerator) -> dict[str, float]:
    """`ppo.epochs` passes of clipped policy and value updates over shuffled mini-batches."""
    t = cfg.training
    roles.model.train()
    sums: dict[str, list[float]] = {}
    n = batch.ids.shape[0]
    accum = 0
    bad: list[str] = []
    for _ in range(cfg.ppo.epochs):
        order = torch.randperm(n)
        for start in range(0, n, t.batch_size):
            rows = order[start:start + t.batch_size].to(batch.ids.device)
            mb = batch.select(rows)
            logp, ent = roles.policy_logps(mb, cfg.rollout.temperature, with_entropy=True)
            pg_loss, pg = ppo_policy_loss(logp, r.old_logp[rows], a.advantages[rows], mb.resp_mask,
                                          cfg.ppo.clip_range)
            with roles.role(VALUE):
                values = roles.values(mb)
            vf_loss, vf = ppo_value_loss(values, r.old_values[rows], a.returns[rows], mb.resp_mask,
                                         cfg.ppo.value_clip_range)
            loss = pg_loss + cfg.ppo.value_coef * vf_loss
            if torch.isfinite(loss):
                accelerator.backward(loss / t.grad_accum)
            else:  # reported at the optimizer step, which every process reaches together
                bad.append(f"non-finite PPO loss (policy {pg_loss.item()}, value {vf_loss.item()})")
            accum += 1
            if accum % t.grad_accum == 0:
                optimizer_step(optimizer, params, t.max_grad_norm, accelerator, sums, bad, "PPO")
            for key, value in {"policy_loss": pg_loss, "value_loss": vf_loss, **pg, **vf,
                               "entropy": masked_mean(ent, mb.resp_mask)}.items():
                sums.setdefault(key, []).append(float(value.detach()))
    if accum % t.grad_accum:
        optimizer_step(optimizer, params, t.max_grad_norm, accelerator, sums, bad, "PPO")
    return {k: sum(v) / len(v) for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------- the loop


def _trainable(roles: Roles) -> dict[str, torch.nn.Parameter]:
    named = adapter_params(roles.model, (POLICY, VALUE))
    named["value_head.weight"] = roles.value_head.weight
    return named


def _check_scores(r: Rollout, step: int) -> None:
    bad = ~torch.isfinite(r.scores)
    if any_rank(bool(bad.any())) and not bad.any():  # every process skips the step together
        raise FloatingPointError(f"step {step}: non-finite reward(s) in another process")
    if bad.any():
        shown = [f"  prompt {r.prompts[i][-1]['content'][:80]!r} -> answer {r.texts[i][:80]!r}"
                 for i in torch.nonzero(bad).flatten().tolist()[:3]]
        raise FloatingPointError(f"step {step}: {int(bad.sum())} non-finite reward(s), e.g.\n" + "\n".join(shown))


def _step_metrics(batch: Batch, r: Rollout, a: Advantages, kl_coef: float) -> dict[str, float]:
    m = batch.resp_mask
    residual = masked_var(a.returns - r.old_values, m)
    return {
        "reward_mean": r.scores.mean().item(), "reward_std": r.scores.std().item() if len(r.scores) > 1 else 0,
        **{f"reward_{name}": value for name, value in r.terms.items()},
        "kl": a.kl.mean().item(), "kl_coef": kl_coef,
        "response_tokens": m.sum(1).mean().item(), "no_eos_share": (~batch.ended).float().mean().item(),
        "explained_variance": 1.0 - (residual / masked_var(a.returns, m).clamp(min=1e-8)).item(),
        "value_mean": masked_mean(r.old_values, m).item(),
        "generation_seconds": r.gen_seconds, "scoring_seconds": r.score_seconds}


@dataclass
class LoopState:
    """What the loop carries from one step to the next. A checkpoint's trainer_state.json holds all of it under
    the keys below (the scheduler, controller and moments as their state), so a resume continues exactly."""

    scheduler: Any            # the learning-rate schedule, stepped once per successful PPO step
    controller: KLController  # the KL coefficient, adaptive when ppo.target_kl is set
    moments: RunningMoments   # the reward statistics normalisation uses, over every step so far
    step: int = 0             # steps done, skipped ones included: the next step is step + 1
    log_history: list[dict[str, float]] = field(default_factory=list)
    kl_over: int = 0          # steps in a row above ppo.kl_ceiling
    bad_steps: int = 0        # steps in a row skipped on non-finite numbers

    def to_checkpoint(self) -> dict[str, Any]:
        return {"log_history": self.log_history, "kl_over": self.kl_over, "bad_steps": self.bad_steps,
                "scheduler": self.scheduler.state_dict(), "controller": vars(self.controller),
                "moments": vars(self.moments), "step": self.step}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], scheduler) -> LoopState:
        """`saved` as load_checkpoint returns it; `scheduler`, built over the same optimizer, takes its state."""
        scheduler.load_state_dict(saved["scheduler"])
        return cls(scheduler, KLController(**saved["controller"]), RunningMoments(**saved["moments"]), saved["step"],
                   saved["log_history"], saved["kl_over"], saved["bad_steps"])


def _optimizer(cfg: PPOConfig, named: dict[str, torch.nn.Parameter]
               ) -> tuple[dict[str, list[torch.nn.Parameter]], torch.optim.Optimizer, LoopState]:
    """The policy's and the value model's parameter groups, their optimizer, and a fresh loop state over it."""
    from transformers import get_scheduler

    t, p = cfg.training, cfg.ppo
    params = {"policy": [w for n, w in named.items() if adapter_of(n) == POLICY],
              "value": [w for n, w in named.items() if adapter_of(n) != POLICY]}  # the value adapter and head
    # one optimizer, two groups: the value model may learn at its own pace (its loss weight barely matters to AdamW)
    optimizer = torch.optim.AdamW([{"params": params["policy"], "lr": t.learning_rate},
                                   {"params": params["value"], "lr": p.value_learning_rate or t.learning_rate}],
                                  weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * t.max_steps),
                              num_training_steps=t.max_steps)
    return params, optimizer, LoopState(scheduler, KLController(p.kl_coef, p.target_kl, p.kl_horizon), RunningMoments())


def _resume(path: Path, named: dict[str, torch.nn.Parameter], optimizer, scheduler, accelerator,
            seed: int) -> LoopState:
    """Weights, optimizer, random state and loop state from the checkpoint at `path`."""
    weights, saved = load_checkpoint(path, optimizer)
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value)
    state = LoopState.from_checkpoint(saved, scheduler)
    if accelerator.num_processes > 1:  # the checkpoint holds the main process's random state only
        torch.manual_seed(seed + accelerator.process_index + state.step * accelerator.num_processes)
        log.warning("multi-process PPO resumed at step %d: the processes' sampling continues from fresh seeds, "
                    "so the run is not an exact continuation", state.step)
    log.info("resumed PPO at step %d from %s", state.step, path)
    return state


def _step(prep: Prepared, roles: Roles, state: LoopState, step: int, optimizer,
          params: dict[str, list[torch.nn.Parameter]], accelerator) -> dict[str, float] | None:
    """PPO step `step` (from 0): its metrics, or None when it was skipped on non-finite numbers."""
    cfg, t = prep.cfg, prep.cfg.training
    b, world, rank = cfg.rollout.batch_size, accelerator.num_processes, accelerator.process_index
    # each process answers its own share of the step's prompts (rollout.batch_size is per process)
    rows = prompt_rows(len(prep.train.encoded), b * world, step, t.seed)[rank * b:(rank + 1) * b]
    batch, r = rollout(roles, prep, rows)
    start = time.monotonic()
    try:
        _check_scores(r, step + 1)
        a = advantages_of(cfg, batch, r, state.controller.coef, state.moments)
        metrics = _step_metrics(batch, r, a, state.controller.coef)
        metrics.update(update(roles, cfg, batch, r, a, optimizer, params, accelerator))
        metrics = mean_over_ranks(metrics)  # one KL for the controller, one set of numbers in the log
    except FloatingPointError as e:
        state.bad_steps += 1
        log.error("PPO step %d skipped: %s", step + 1, e)
        if state.bad_steps >= t.max_bad_steps:
            raise TrainingStopped(f"{state.bad_steps} PPO steps in a row failed on non-finite numbers "
                                  f"(last: {e}). Check the reward model and lower training.learning_rate; the "
                                  f"last checkpoint is kept in {prep.paths.work}") from None
        return None
    state.bad_steps = 0
    state.scheduler.step()
    metrics["train_seconds"] = time.monotonic() - start
    metrics["step"] = step + 1
    state.controller.update(metrics["kl"], cfg.rollout.batch_size)
    state.log_history.append(metrics)
    return metrics


def _log_step(metrics: dict[str, float]) -> None:
    log.info("step %d: reward %.3f ± %.3f, KL %.3f (coef %.3g), entropy %.3f, clip %.2f, value loss %.4f, "
             "expl. var %.2f, %.1f tokens, %.0f%% no EOS, gen %.1fs / train %.1fs", metrics["step"],
             metrics["reward_mean"], metrics["reward_std"], metrics["kl"], metrics["kl_coef"],
             metrics["entropy"], metrics["clip_fraction"], metrics["value_loss"],
             metrics["explained_variance"], metrics["response_tokens"], 100 * metrics["no_eos_share"],
             metrics["generation_seconds"], metrics["train_seconds"])


def train_loop(prep: Prepared, roles: Roles, resume_from: Path | None) -> dict[str, Any]:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    t = prep.cfg.training
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    named = _trainable(roles)
    params, optimizer, state = _optimizer(prep.cfg, named)
    torch.manual_seed(t.seed + accelerator.process_index)  # processes sample different answers
    if resume_from is not None:
        state = _resume(resume_from, named, optimizer, state.scheduler, accelerator, t.seed)
    bar = tqdm(range(state.step, t.max_steps), initial=state.step, total=t.max_steps, desc="ppo", unit="step",
               file=sys.stderr)
    for step in bar:
        metrics = _step(prep, roles, state, step, optimizer, params, accelerator)
        state.step = step + 1
        if metrics is None:
            continue
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
        if state.step % t.logging_steps == 0:
            _log_step(metrics)
        kl_guard(state, metrics, prep.cfg.ppo, prep.paths.work)
        if state.step % t.save_steps == 0 and state.step < t.max_steps:
            checkpoint(prep.paths.work, state, named, optimizer, t.save_total_limit, accelerator)
    bar.close()
    return {"steps": t.max_steps, "log_history": state.log_history}


def train(prep: Prepared) -> Path:
    cfg = prep.cfg
    if nothing_to_train(cfg, prep.paths, prep.inputs, "base model, data, reward model and config"):
        return prep.paths.out
    ckpt = prepare_output(cfg, prep.paths, prep.inputs)
    from transformers import set_seed

    set_seed(cfg.training.seed)  # fresh adapters and heads start from seeded random weights
    roles = build_roles(prep)
    quantization = resolve_quantization(cfg.model)
    metrics: dict[str, Any] = {"n_prompts": len(prep.train.encoded), "n_rejected": len(prep.train.rejects),
                               "trainable_params": sum(p.numel() for p in _trainable(roles).values()),
                               "quantization": quantization, "resumed_from": ckpt.name if ckpt else None}
    start = time.time()
    with oom_as_message(STAGE, cfg, prep.paths.work, f"; generation holds rollout.batch_size={cfg.rollout.batch_size} "
                        f"answers of up to rollout.max_new_tokens={cfg.rollout.max_new_tokens} at once"):
        metrics.update(train_loop(prep, roles, ckpt))
    metrics["train_seconds"] = time.time() - start
    metrics.update(processes=world_size(), rank_weight_spread=weights_spread(_trainable(roles)))
    if not is_main():  # the main process evaluates and writes the output
        return prep.paths.out
    history = metrics["log_history"]
    if history:
        k = max(1, len(history) // 5)
        metrics["reward_first"] = sum(h["reward_mean"] for h in history[:k]) / k
        metrics["reward_last"] = sum(h["reward_mean"] for h in history[-k:]) / k
        metrics["kl_last"] = sum(h["kl"] for h in history[-k:]) / k
    parent = str(prep.sft.resolve()) if prep.sft is not None else None
    manifest = make_manifest(STAGE, cfg.run, prep.inputs, prep.model_ref.description, parent=parent,
                             extra={"quantization": quantization, "seed": cfg.training.seed, **prep.lineage(),
                                    "rewards": reward_names(prep.terms),
                                    "reward_model": cfg.reward_model and str(Path(cfg.reward_model).resolve())})

    def value_head(out: Path) -> None:
        from safetensors.torch import save_file
        save_file({"weight": roles.value_head.weight.detach().cpu().contiguous()},
                  str(out / VALUE / "value_head.safetensors"))

    return save_stage(cfg, prep.paths, roles.model, prep.tokenizer, metrics, manifest, adapters=[POLICY, VALUE],
                      extra_files=value_head)


def run(cfg: PPOConfig) -> Path:
    return train(setup(cfg))
