"""What the online RL stages (PPO, GRPO) share: prompt rows read with what their rewards need, the prompts of
each step, the synced optimizer step, checkpoints and the KL guard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from align.data.rows import Example, _as_messages, char_bound, chars, load_rows
from align.modeling.formatting import encode_prompt
from align.modeling.generate import Sampling
from align.modeling.models import add_adapter_from
from align.modeling.roles import REWARD, head_from
from align.runtime.checkpoint import save_checkpoint
from align.runtime.distributed import any_rank, sharded_by
from align.runtime.errors import ConfigError, FormatError, RowError, TrainingStopped
from align.serving.trained import open_run
from align.stages.common import Prepared, load_separately, on_same_base, prepare
from align.stages.rewards import Term, check_row, combine, model_term, reward_inputs, terms_of


def setup(cfg: Any) -> Prepared:
    """An RL stage's checks of everything that can fail on user input, before a model is loaded: how it is
    launched, its sampling, its rewards (functions imported, reward model found) and its prompts."""
    name = cfg.stage.upper()
    if sharded_by():
        raise ConfigError(f"{name} switches adapters (its roles) inside one model, which {sharded_by()} would shard "
                          "and wrap; launch it with recipes/accelerate/ddp.yaml (data parallel) instead")
    if cfg.training.compile:
        raise ConfigError(f"training.compile=true is for SFT, reward and DPO; {name}'s rollouts generate token by "
                          "token through the same layers, which compiled layers would recompile as the cache grows. "
                          f"Set training.compile=false for {name}")
    if not Sampling(cfg.rollout.temperature, cfg.rollout.top_p).exact:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p}: {name}'s ratios and KL are log-probs under "
                          "softmax(logits / rollout.temperature); answers drawn from a top-p nucleus come from another "
                          "distribution, so every ratio would be off-policy. Set rollout.top_p=1.0 and shape "
                          "exploration with rollout.temperature instead")
    terms = terms_of(cfg.rewards, cfg.reward_model)
    rm = model_term(terms)
    if rm is not None and (rm.model / "adapter_config.json").is_file():
        open_run(rm.model, ("reward",), "reward_model=")
    prep = prepare(cfg.stage, cfg, prompt_loader(cfg, terms), cfg.init_from_sft)
    prep.inputs.update(reward_inputs(terms))
    prep.terms = terms
    return prep


def add_reward_model(model, prep: Prepared, dev) -> tuple[bool, torch.nn.Linear | None, Any]:
    """The rewards' reward model, if they name one: (on the same base, frozen score head, separate model). A reward
    run on this base becomes the frozen REWARD adapter plus its score head; any other is loaded on its own."""
    rm = model_term(prep.terms)
    if rm is None:
        return False, None, None
    if not on_same_base(rm.model, prep):
        return False, None, load_separately(rm.model)
    add_adapter_from(model, REWARD, rm.model, prep.cfg.lora, trainable=False)
    return True, head_from(rm.model, model.config.hidden_size, torch.float32, dev).requires_grad_(False), None


def prompt_loader(cfg: Any, terms: list[Term] = ()):
    """Rows with a 'prompt' (a string or messages ending with a user turn) that fits data.max_length with room for
    rollout.max_new_tokens, and that every reward term can score; the whole row travels in Example.fields."""
    room = cfg.data.max_length - cfg.rollout.max_new_tokens

    def make(tokenizer):
        def convert(raw: Any) -> tuple[list[int], Example]:
            if not isinstance(raw, dict) or "prompt" not in raw:
                raise RowError(f"a {cfg.stage.upper()} prompt row needs a 'prompt' (a string or a list of messages)")
            prompt = _as_messages(raw["prompt"], "prompt", "user")
            if prompt[-1]["role"] != "user":  # the policy answers the last user message
                raise RowError("'prompt' must end with a user message")
            check_row(terms, raw)
            if chars(prompt) > char_bound(tokenizer, room):  # refused without tokenizing megabytes
                raise FormatError(f"the prompt is over {room} tokens ({chars(prompt):,} characters); with "
                                  f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} only {room} fit in "
                                  f"data.max_length={cfg.data.max_length}")
            ids = encode_prompt(tokenizer, prompt)
            if len(ids) > room:
                raise FormatError(f"the prompt is {len(ids)} tokens; with rollout.max_new_tokens="
                                  f"{cfg.rollout.max_new_tokens} only {room} fit in data.max_length="
                                  f"{cfg.data.max_length}")
            return ids, Example(prompt, None, None, "", 0, fields=raw)

        return lambda spec, split, limit: load_rows(spec, convert, split, limit)

    return make


def rewards_of(prep, rows: list[int], texts: list[str], model_scores: torch.Tensor | None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """(B,) the weighted sum of the rewards of the answers `texts` to the prompts `rows`, and each reward's mean."""
    examples = [prep.train.examples[i] for i in rows]
    totals, means = combine(prep.terms, [e.prompt[-1]["content"] for e in examples], texts,
                            [e.fields for e in examples], [f"{e.source}:{e.row}" for e in examples],
                            None if model_scores is None else model_scores.tolist())
    return torch.tensor(totals, dtype=torch.float32), means


def prompt_rows(n_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The prompts of step `step`: consecutive slices of a reshuffled pass over the data per epoch, a function of
    (seed, step) alone, so a resumed run draws exactly the prompts the uninterrupted one would."""
    rows = []
    position = step * batch_size
    while len(rows) < batch_size:
        epoch, offset = divmod(position, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(batch_size - len(rows), n_prompts - offset)
        rows += order[offset:offset + take].tolist()
        position += take
    return rows


def optimizer_step(optimizer, params: dict[str, list[torch.nn.Parameter]], max_norm: float, accelerator,
                   sums: dict[str, list[float]], bad: list[str], stage: str) -> None:
    """Clip each parameter group's gradients on its own (PPO: a large value-loss gradient early in training must
    not shrink the policy's step through one shared norm), then step.

    A non-finite loss on any process skips the step on all of them (one skipping alone would leave the others
    waiting for its gradients)."""
    if any_rank(bool(bad)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(bad[0] if bad else f"non-finite {stage} loss in another process")
    for role, group in params.items():
        if accelerator.num_processes > 1:  # roles switch adapters inside one module, so sync gradients by hand
            for p in group:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, "mean")
        norm = torch.nn.utils.clip_grad_norm_(group, max_norm)
        sums.setdefault(f"grad_norm_{role}", []).append(float(norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def checkpoint(work: Path, state, named: dict[str, torch.nn.Parameter], optimizer, keep: int, accelerator) -> None:
    if accelerator.is_main_process:  # ranks hold the same weights after each synced step
        save_checkpoint(work, state.step, dict(named), optimizer, state.to_checkpoint(), keep)
    accelerator.wait_for_everyone()


def kl_guard(state, metrics: dict[str, float], section: Any, work: Path) -> None:
    """Stop a run whose KL to the reference stays above section.kl_ceiling for section.kl_ceiling_steps steps."""
    if metrics.get("kl") is None:
        return
    state.kl_over = state.kl_over + 1 if metrics["kl"] > section.kl_ceiling else 0
    if state.kl_over >= section.kl_ceiling_steps:
        raise TrainingStopped(f"the mean KL to the reference stayed above kl_ceiling={section.kl_ceiling} for "
                              f"{state.kl_over} steps (step {metrics['step']}: {metrics['kl']:.2f} nats per answer): "
                              "the policy is running away from the reference. Lower training.learning_rate or "
                              f"strengthen the KL term; the last checkpoint is kept in {work}")
