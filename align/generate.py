"""Answering prompts with a model through the one formatting path (used for samples, evaluation and rollouts)."""

from __future__ import annotations

import torch

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
