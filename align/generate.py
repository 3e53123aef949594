"""Answering prompts with a model through the one formatting path (used for samples, evaluation and rollouts)."""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from .formatting import Messages, encode_prompt


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


@torch.no_grad()
def answer_batch(model, tokenizer, prompts: list[Messages], max_new_tokens: int = 64, batch_size: int = 16,
                 desc: str | None = None) -> list[tuple[str, list[int]]]:
    """Greedy answers to many prompts, batched with left padding: (text, answer token ids ending at the EOS if
    the model produced one), in prompt order."""
    from .heads import pad_batch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[tuple[str, list[int]]] = [("", [])] * len(encoded)
    eos = tokenizer.eos_token_id
    bar = tqdm(total=len(order), desc=desc, unit="prompt", file=sys.stderr, disable=desc is None)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        bar.update(len(idx))
        ids, mask = pad_batch([encoded[i] for i in idx], tokenizer.pad_token_id, side="left", device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        for row, i in enumerate(idx):
            tokens = gen[row, ids.shape[1]:].tolist()
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            out[i] = (tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens)
    bar.close()
    model.train(was_training)
    return out
