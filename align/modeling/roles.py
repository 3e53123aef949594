"""PPO's four roles on ONE base: policy and value (trainable adapters), reference (the frozen SFT adapter, or the
base with adapters off) and reward (the reward run's adapter + score head, frozen). Switching role switches the
active adapter; no weights are copied. A reward model trained on another base is loaded separately (and logged).

Sequences are laid out as [left-padded prompt (P) | right-padded response (T)], so the response's token t sits
at position P + t and is predicted from position P + t − 1 — logits, values and entropies are computed only
there, never over the whole vocabulary at prompt positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from align.modeling.heads import cache_name, pad_batch, position_ids, states_logps, unwrap
from align.modeling.models import REFERENCE, adapter_role, reference_role
from align.rl.losses import last_token_index
from align.runtime.errors import ModelError

log = logging.getLogger(__name__)
POLICY, VALUE, REWARD = "default", "value", "reward"
TRAINABLE = (POLICY, VALUE)


@dataclass
class Batch:
    """A rollout batch laid out for scoring and training."""

    ids: torch.Tensor        # (B, P + T)
    mask: torch.Tensor       # (B, P + T) attention mask
    responses: torch.Tensor  # (B, T) response token ids (pad after the end)
    resp_mask: torch.Tensor  # (B, T) float, 1.0 on response tokens
    prompt_len: int          # P
    ended: torch.Tensor      # (B,) bool: the response ends with EOS
    prompt_of: torch.Tensor | None = None  # (B,) which prompt each row answers, when rows share prompts (GRPO)

    def select(self, rows: torch.Tensor) -> Batch:
        return Batch(self.ids[rows], self.mask[rows], self.responses[rows], self.resp_mask[rows], self.prompt_len,
                     self.ended[rows], None if self.prompt_of is None else self.prompt_of[rows])


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, eos_id: int, device,
               prompt_of: list[int] | None = None) -> Batch:
    """`prompt_of`: each row's prompt (rows with the same number hold the same prompt tokens), so that the decoder
    reads each distinct prompt once (shared_prompt_states)."""
    p_ids, p_mask = pad_batch(prompts, pad_id, side="left", device=device)
    r_ids, r_mask = pad_batch(responses, pad_id, side="right", device=device, min_width=1)
    ended = torch.tensor([bool(r) and r[-1] == eos_id for r in responses], device=device)
    return Batch(torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), r_ids, r_mask.float(),
                 p_ids.shape[1], ended, None if prompt_of is None else torch.tensor(prompt_of, device=device))


class Roles:
    """The PEFT model with its adapters plus the value and score heads, and how to run each role."""

    def __init__(self, model, value_head: torch.nn.Linear, score_head: torch.nn.Linear | None,
                 separate_rm=None):
        self.model = model
        self.value_head = value_head
        self.score_head = score_head
        self.separate_rm = separate_rm  # a RewardModel on its own base, when the bases differ

    def role(self, name: str):
        if name == REFERENCE:
            return reference_role(self.model, TRAINABLE)
        return adapter_role(self.model, name, TRAINABLE)

    def _hidden(self, batch: Batch) -> torch.Tensor:
        shared = shared_prompt_states(self.model, batch)
        if shared is not None:
            return shared
        decoder = unwrap(self.model).get_decoder()
        out = decoder(input_ids=batch.ids, attention_mask=batch.mask, position_ids=position_ids(batch.mask),
                      use_cache=False)
        return out.last_hidden_state

    def _response_states(self, batch: Batch) -> torch.Tensor:
        h = self._hidden(batch)
        P, T = batch.prompt_len, batch.responses.shape[1]
        return h[:, P - 1:P + T - 1]

    def policy_logps(self, batch: Batch, temperature: float = 1.0, with_entropy: bool = False):
        """(B, T) log-probs of the response tokens under the active adapter at the sampling `temperature` (and
        the entropies of those distributions), through the one log-prob path (chunked over a large vocabulary)."""
        return states_logps(self.model, self._response_states(batch), batch.responses, temperature, with_entropy)

    def values(self, batch: Batch) -> torch.Tensor:
        """(B, T) value estimates, with the value adapter active."""
        h = self._response_states(batch)
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def rewards(self, batch: Batch, prompts: list, texts: list[str]) -> torch.Tensor:
        """(B,) reward-model scores read at each response's last token (its EOS when it has one)."""
        if self.separate_rm is not None:
            return _separate_scores(self.separate_rm, prompts, texts).to(batch.ids.device)
        with self.role(REWARD):
            h = self._hidden(batch)
        # read where every score is read: the row's last real token (its EOS when it has one)
        h_last = h[torch.arange(h.shape[0], device=h.device), last_token_index(batch.mask).to(h.device)]
        return self.score_head(h_last.to(self.score_head.weight.dtype)).squeeze(-1).float()


def shared_prompt_states(model, batch: Batch) -> torch.Tensor | None:
    """(B, P + T, H) decoder states as one pass over the whole batch makes them, with each distinct prompt read
    once: the prompts' keys and values (and their gradients) are shared by every row that answers them. GRPO's G
    answers per prompt otherwise send the same prompt through the decoder G times; with the embedded model's ~56
    prompt tokens and answers of up to 40, a step of 6 prompts × 6 answers reads ~1,800 tokens instead of ~3,400.

    None when there is nothing to share, or under gradient checkpointing in training (a recomputed layer would
    append to the shared cache a second time): the caller makes one pass over the whole batch then."""
    if batch.prompt_of is None:
        return None
    first: dict[int, int] = {}
    for row, prompt in enumerate(batch.prompt_of.tolist()):
        first.setdefault(prompt, row)
    causal = unwrap(model)
    if len(first) == len(batch.prompt_of) or (causal.is_gradient_checkpointing and causal.training
                                              and torch.is_grad_enabled()):
        return None
    device = batch.ids.device
    rep = torch.tensor(list(first.values()), device=device)
    slot = {prompt: i for i, prompt in enumerate(first)}
    inverse = torch.tensor([slot[p] for p in batch.prompt_of.tolist()], device=device)
    decoder, positions, P = causal.get_decoder(), position_ids(batch.mask), batch.prompt_len
    prefix = decoder(input_ids=batch.ids[rep, :P], attention_mask=batch.mask[rep, :P], position_ids=positions[rep, :P],
                     use_cache=True)
    name = cache_name(model)
    cache = getattr(prefix, name)
    cache.batch_select_indices(inverse)  # indexing: the backward pass sums each row's gradient into its prompt
    rest = decoder(input_ids=batch.ids[:, P:], attention_mask=batch.mask, position_ids=positions[:, P:],
                   use_cache=True, **{name: cache})
    return torch.cat([prefix.last_hidden_state[inverse], rest.last_hidden_state], 1)


def _separate_scores(rm, prompts: list, texts: list[str]) -> torch.Tensor:
    # an answer too long for the reward model has no score: NaN, reported by the NaN guard
    return torch.tensor([float("nan") if s is None else s for s in rm.score_answers(prompts, texts)])


def head_from(adapter_dir: Path, hidden: int, dtype, device) -> torch.nn.Linear:
    """The reward run's trained score head as a plain Linear (read from its safetensors, no pickle)."""
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    keys = [k for k in state if k.endswith("score.weight")]
    if not keys:
        raise ModelError(f"{adapter_dir} has no trained score head (score.weight); is it a reward run?")
    weight = state[keys[0]]
    if weight.shape != (1, hidden):
        raise ModelError(f"the score head in {adapter_dir} has shape {tuple(weight.shape)}, expected (1, {hidden})")
    head = torch.nn.Linear(hidden, 1, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head
