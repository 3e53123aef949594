"""Scalar heads (reward, later value): one number per sequence, read at its last real token.

The score is read where the formatting path put the answer's EOS — never at padding, whatever the padding side,
and never at "the last token that is not the pad id" (with pad == EOS, as in many chat tokenizers, that rule
reads the token before the EOS).
"""

from __future__ import annotations

import inspect

import torch

from align.modeling.formatting import IGNORE
from align.rl.losses import entropy, last_token_index, sequence_logps, token_logps
from align.runtime.errors import ModelError


def unwrap(model):
    """The transformers model under DDP/accelerate and PEFT wrappers (LoRA layers stay injected in it)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_head(model) -> torch.nn.Module:
    head = getattr(unwrap(model), "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ModelError(f"{type(unwrap(model)).__name__} has no 'score' head; a reward model is a "
                         "…ForSequenceClassification model with num_labels=1")
    return head


def cache_name(model) -> str:
    """The keyword a model's forward and generate() take a KV cache by: transformers 5.25 renamed past_key_values
    to cache (the old name warns), 5.23 knows only the old one."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row sees the same positions as a right-padded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) batch → (B,) float32 scores at each row's last real token.

    The model's own forward runs (so DDP and gradient checkpointing see a normal call); the head's per-position
    output is captured with a hook and gathered at last_token_index, instead of trusting the model's pooling.
    """
    captured: list[torch.Tensor] = []
    head = score_head(model)
    hooks = [head.register_forward_hook(lambda _m, _i, out: captured.append(out))]
    # The head may hold another dtype than the hidden states (TRL keeps trainable weights in bf16 over a 4-bit
    # base whose compute dtype can be fp32): each linear layer of the head takes its input in its own dtype.
    hooks += [m.register_forward_pre_hook(_to_weight_dtype) for m in head.modules() if isinstance(m, torch.nn.Linear)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
              use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    per_token = captured[-1]
    if per_token.dim() != 3 or per_token.shape[-1] != 1:
        raise ModelError(f"the score head gives shape {tuple(per_token.shape)}, expected (batch, time, 1): a reward "
                         "model needs num_labels=1")
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return per_token[rows, last_token_index(attention_mask).to(input_ids.device), 0].float()


def _to_weight_dtype(module: torch.nn.Linear, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right", device: torch.device | str = "cpu",
              min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (input_ids, attention_mask), padded on `side` with `pad_id` to the longest (at least
    `min_width`: a batch of empty responses still has one column)."""
    width = max(min_width, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def answer_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: list[int]) -> torch.Tensor:
    """Labels of a right-padded batch that keep only answer tokens: prompt and padding become IGNORE (-100)."""
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE
    for i, n in enumerate(prompt_lens):
        labels[i, :n] = IGNORE
    return labels


# Above this many (answer tokens × vocabulary) logits, answer log-probs are computed chunk by chunk with the
# vocabulary projection recomputed in the backward pass, so the full logits never exist at once (measured on an
# H100, DPO at seq 2048: the full answer logits and their backward made the peak 15 GB at 0.5B, 25 GB at 7B).
# A chunk's logits, their float32 copy and logsumexp's temporary are alive together: 2^24 elements (110 rows at
# Qwen2.5's 152k vocabulary) keep that under ~200 MB; 2^26 held 0.34 GiB more at the peak of a DPO step
# (bench/cpu_memory.py --chunk-elements, 0.5B widths, seq 1024), for no speed gained on the CPU.
CHUNK_ELEMENTS = 1 << 24


def labelled_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed log-probs of the labelled (answer) tokens and (B,) their count.

    Vocabulary logits are made only for what is scored: from the position before the first labelled token on
    (small batches), or for the labelled positions alone, in chunks (large ones).
    """

    targets = labels[:, 1:]
    picked = targets != IGNORE
    if _chunk(model, int(picked.sum())):
        owner = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[picked]
        per_token = chunked_token_logps(model, input_ids, attention_mask, position_ids(attention_mask), targets,
                                        picked)
        return _per_sequence(per_token, owner, targets.shape[0])
    cols = (labels != IGNORE).any(0).nonzero()
    start = max(int(cols[0]) - 1, 0) if len(cols) else 0
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=labels.shape[1] - start).logits
    return sequence_logps(logits, labels[:, start:])


def packed_logps(model, input_ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
                 owner: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding-free variant of labelled_logps: (1, N) sequences end to end, `positions` restarting at 0 for each
    (transformers then keeps attention inside each sequence), `owner[0, t]` = which of the n sequences token t
    belongs to. Returns (n,) summed answer log-probs and (n,) answer token counts.

    Logits are made only at the positions that predict a labelled token (logits_to_keep as indices), in chunks
    when there are many."""

    targets = labels[:, 1:]
    picked = targets != IGNORE
    rows = owner[:, 1:][picked]
    if _chunk(model, int(picked.sum())):
        return _per_sequence(chunked_token_logps(model, input_ids, None, positions, targets, picked), rows, n)
    keep = picked[0].nonzero().flatten()  # position t predicts token t + 1
    logits = model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=keep).logits
    return _per_sequence(token_logps(logits, targets[:, keep])[0], rows, n)


def _per_sequence(per_token: torch.Tensor, owner: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.zeros(n, dtype=per_token.dtype, device=per_token.device).index_add(0, owner, per_token)
    return sums, torch.bincount(owner, minlength=n)


def _chunk(model, n_tokens: int) -> bool:
    """Whether to take the chunked path: many answer tokens × a large vocabulary."""
    return n_tokens * unwrap(model).get_output_embeddings().weight.shape[0] > CHUNK_ELEMENTS


def pack_batch(seqs: list[list[int]], labels: list[list[int]], device: torch.device | str = "cpu"
               ) -> dict[str, torch.Tensor]:
    """Token lists and their labels → one padding-free row: input_ids, position_ids, labels, owner (all (1, N))."""
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    owner = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(seqs)])
    lab = torch.tensor([t for lab_ in labels for t in lab_], dtype=torch.long)
    lab[positions == 0] = IGNORE  # a sequence's first token is not predicted by the previous sequence's last
    return {k: v[None].to(device) for k, v in
            {"input_ids": ids, "position_ids": positions, "labels": lab, "owner": owner}.items()}


def output_logits(model, states: torch.Tensor) -> torch.Tensor:
    """(…, V) logits from decoder output states, as the model's own forward makes them: the output layer, then the
    transforms some families apply after it (Gemma-2/3's final-logit soft-capping, Cohere's logit_scale,
    Granite's logits_scaling). Every path that reads logits from hidden states goes through here, so a soft-capped
    model is scored by the distribution it samples from."""
    causal = unwrap(model)
    head = causal.get_output_embeddings()
    logits = head(states.to(head.weight.dtype))
    cfg = causal.config
    if getattr(cfg, "logit_scale", None) not in (None, 1.0):
        logits = logits * cfg.logit_scale
    if getattr(cfg, "logits_scaling", None) not in (None, 1.0):
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "final_logit_softcapping", None):
        cap = cfg.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def _tempered_logits(model, states: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = output_logits(model, states)
    return logits if temperature == 1.0 else logits / temperature


def _head_logps(model, states: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return token_logps(_tempered_logits(model, states, temperature)[None], tokens[None])[0]


def _head_logps_entropy(model, states: torch.Tensor, tokens: torch.Tensor, temperature: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _tempered_logits(model, states, temperature)[None]
    return token_logps(logits, tokens[None])[0], entropy(logits)[0]


def states_logps(model, states: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                 with_entropy: bool = False):
    """THE log-prob path from decoder states: (..., H) states and the (...) tokens they predict → (...) log-probs
    under softmax(logits / temperature) (and the entropies of those distributions).

    Logits come from output_logits (the model's own soft-capping and logit scale). `temperature` is the one the
    answers were sampled at, so an RL ratio compares the distribution that drew them. Over CHUNK_ELEMENTS logits
    the vocabulary projection runs over a few rows at a time, recomputed in the backward pass, so the full
    (tokens × vocabulary) logits never exist at once."""
    from torch.utils.checkpoint import checkpoint

    shape = tokens.shape
    flat_states, flat_tokens = states.reshape(-1, states.shape[-1]), tokens.reshape(-1)
    vocab = unwrap(model).get_output_embeddings().weight.shape[0]
    n = len(flat_tokens)
    rows = n if n * vocab <= CHUNK_ELEMENTS else max(1, CHUNK_ELEMENTS // vocab)
    fn = _head_logps_entropy if with_entropy else _head_logps
    parts = []
    for i in range(0, n, rows):
        args = (model, flat_states[i:i + rows], flat_tokens[i:i + rows], temperature)
        parts.append(checkpoint(fn, *args, use_reentrant=False) if rows < n and torch.is_grad_enabled()
                     else fn(*args))
    if with_entropy:
        return (torch.cat([p[0] for p in parts]).reshape(shape), torch.cat([p[1] for p in parts]).reshape(shape))
    return torch.cat(parts).reshape(shape)


def chunked_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        positions: torch.Tensor, targets: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """Log-probs of the picked target tokens, in the order of `targets[picked]`: the decoder runs once, the
    vocabulary projection in chunks (states_logps)."""
    hidden = final_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    return states_logps(model, hidden[:, :-1][picked], targets[picked])


def final_hidden_states(model, **inputs) -> torch.Tensor:
    """(B, T, H) output of the decoder stack, from a call of `model` itself with logits for one position only.

    Calling the model (not its decoder) keeps any wrapper in the path: under DistributedDataParallel only a call of
    the wrapped model prepares the gradient synchronisation of the backward pass."""
    captured: list[torch.Tensor] = []
    hook = unwrap(model).get_decoder().register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1]


def scoring_pad_id(tokenizer) -> int:
    """A pad id that is not the EOS, when the tokenizer has one to spare.

    With pad != EOS, plain transformers' own pooling (last token that is not pad) lands on the EOS too, so a reward
    model loaded without align scores like align does. Only tokens the chat template never emits qualify.
    """
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    for token_id in (tokenizer.pad_token_id, tokenizer.unk_token_id):
        if token_id is not None and token_id not in (eos, bos):
            return token_id
    return tokenizer.pad_token_id
