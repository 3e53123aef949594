"""Answering prompts with a model through the one formatting path (used for samples, evaluation and rollouts)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from align.modeling.formatting import Messages, encode_prompt
from align.modeling.heads import pad_batch


@torch.no_grad()
def answer(model, tokenizer, prompt: Messages, max_new_tokens: int = 64) -> str:
    """Greedy answer to one prompt, decoded without special tokens."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def compare_with_base(peft_model, tokenizer, prompts: list[Messages], max_new_tokens: int = 64) -> list[dict]:
    """Each prompt answered by base + adapter and by the base alone (adapter disabled, same weights)."""
    was_training = peft_model.training
    peft_model.eval()
    rows = []
    for prompt in prompts:
        tuned = answer(peft_model, tokenizer, prompt, max_new_tokens)
        with peft_model.disable_adapter():
            base = answer(peft_model, tokenizer, prompt, max_new_tokens)
        rows.append({"prompt": prompt[-1]["content"], "base": base, "adapter": tuned})
    peft_model.train(was_training)
    return rows


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn: greedy when temperature is 0, else sampled with temperature and top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1  # answers per prompt

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@torch.no_grad()
def answer_batch(model, tokenizer, prompts: list[Messages], max_new_tokens: int = 64, batch_size: int = 16,
                 desc: str | None = None) -> list[tuple[str, list[int]]]:
    """Greedy answers to many prompts, batched with left padding: (text, answer token ids ending at the EOS if
    the model produced one), in prompt order."""
    return [answers[0] for answers in sample_batch(model, tokenizer, prompts, Sampling(), max_new_tokens,
                                                  batch_size, desc)]


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: list[Messages], sampling: Sampling, max_new_tokens: int = 64,
                 batch_size: int = 16, desc: str | None = None, encoded: list[list[int]] | None = None
                 ) -> list[list[tuple[str, list[int]]]]:
    """`sampling.n` answers to each prompt, as (text, answer token ids ending at the EOS when the model produced
    one), in prompt order. Prompts are batched by length with left padding, so a batch wastes little.
    `encoded`: the prompts' token ids when the caller already has them (from encode_prompt)."""

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if encoded is None:
        encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[list[tuple[str, list[int]]]] = [[] for _ in encoded]
    eos = tokenizer.eos_token_id
    per_batch = max(1, batch_size // sampling.n)  # batch_size counts answers, not prompts
    bar = tqdm(total=len(order), desc=desc, unit="prompt", file=sys.stderr, disable=desc is None)
    for start in range(0, len(order), per_batch):
        idx = order[start:start + per_batch]
        ids, mask = pad_batch([encoded[i] for i in idx], tokenizer.pad_token_id, side="left", device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             num_return_sequences=sampling.n, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id, **sampling.generate_kwargs())
        for row in range(gen.shape[0]):
            tokens = gen[row, ids.shape[1]:].tolist()
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            out[idx[row // sampling.n]].append((tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens))
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return out
