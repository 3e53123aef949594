"""Answering prompts with a model through the one formatting path (used for samples, evaluation and rollouts).

THE one sampling path: every answer align draws comes from `draw`, which states the whole distribution. transformers
fills every generation setting a call leaves unset from the model's generation_config.json (Qwen2.5-Instruct ships
top_k 20, top_p 0.8, temperature 0.7, repetition_penalty 1.05) and then from its own defaults (top_k 50). A PPO
ratio, a KL estimate or an on-policy pair assumes answers drawn from softmax(logits / temperature) alone, so `draw`
runs with a bare generation config and sets each logits-shaping option to its neutral value; only the stop and pad
ids are the tokenizer's.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from align.modeling.formatting import Messages, encode_prompt
from align.modeling.heads import cache_name, pad_batch, position_ids, unwrap


@torch.no_grad()
def answer(model, tokenizer, prompt: Messages, max_new_tokens: int = 64) -> str:
    """Greedy answer to one prompt, decoded without special tokens."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=model.device)
    out = draw(model, ids, torch.ones_like(ids), Sampling(), max_new_tokens, tokenizer.eos_token_id,
               tokenizer.pad_token_id)
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
    """How answers are drawn: greedy when temperature is 0, else from softmax(logits / temperature), truncated to
    the top-p nucleus only when top_p < 1 (then the draw is no longer the policy's own distribution: `exact`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1  # answers per prompt

    @property
    def exact(self) -> bool:
        """Whether answers are drawn from softmax(logits / temperature) itself, as RL log-probs assume."""
        return self.temperature > 0 and self.top_p >= 1.0

    def generation_config(self, max_new_tokens: int, stop_id: int, pad_id: int):
        """A complete transformers GenerationConfig: nothing left for generate() to fill from elsewhere."""
        from transformers import GenerationConfig

        # greedy ignores the truncation settings (and transformers warns when they are set): sampling only
        truncation = dict(top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
        neutral = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                       length_penalty=1.0, min_length=0, min_new_tokens=None, bad_words_ids=None,
                       suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
                       forced_eos_token_id=None, sequence_bias=None, exponential_decay_length_penalty=None,
                       renormalize_logits=False, num_beams=1, use_cache=True)
        if self.temperature <= 0:
            chosen = dict(do_sample=False)
        else:
            chosen = dict(truncation, do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return GenerationConfig(**{**neutral, **chosen}, max_new_tokens=max_new_tokens, eos_token_id=stop_id,
                                pad_token_id=pad_id, num_return_sequences=self.n)


@contextlib.contextmanager
def _bare_generation_config(model):
    """The model's own generation_config (from its generation_config.json) set aside while align samples, so that
    generate() has nothing of it to fill a setting from."""
    from transformers import GenerationConfig

    inner = unwrap(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def draw(model, ids: torch.Tensor, mask: torch.Tensor, sampling: Sampling, max_new_tokens: int, stop_id: int,
         pad_id: int, scores: bool = False, streamer=None):
    """Every generate() call of align: (rows × n, prompt + answer) token ids, or with `scores` the generate output
    holding the processed logits each token was drawn from (tests compare them with the RL log-probs). `streamer`
    (one row only) is handed each token as it is drawn (`align chat` shows them as they come)."""
    config = sampling.generation_config(max_new_tokens, stop_id, pad_id)
    if scores:
        config.update(return_dict_in_generate=True, output_scores=True)
    extra = {}
    if sampling.n > 1 and ids.shape[1] > 1:
        # generate() would copy each prompt n times and read every copy: read it once, hand the n rows its cache
        name = cache_name(model)
        cache = getattr(model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids(
            mask[:, :-1]), use_cache=True, logits_to_keep=1), name)  # the last token is generate()'s to read
        cache.batch_repeat_interleave(sampling.n)
        ids, mask = ids.repeat_interleave(sampling.n, 0), mask.repeat_interleave(sampling.n, 0)
        config.num_return_sequences = 1
        extra[name] = cache
    with _bare_generation_config(model):
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=streamer,
                              **extra)


# On a CPU a decoding step of a small batch is bound by reading every weight once, not by arithmetic: on the
# embedded model 64 greedy answers took 23 s in one batch and 36 s in batches of 16 (2 cores). Up to 64 answers
# share a step there, fewer when prompts are long, so that a larger model's KV cache stays a few GB.
CPU_BATCH_TOKENS = 8192
CPU_MAX_BATCH = 64
GPU_BATCH = 16


def generation_batch(device: torch.device, tokens_per_answer: int) -> int:
    """Answers per generate() call when the caller does not say."""
    if device.type != "cpu":
        return GPU_BATCH
    return max(1, min(CPU_MAX_BATCH, CPU_BATCH_TOKENS // max(tokens_per_answer, 1)))


@torch.no_grad()
def answer_batch(model, tokenizer, prompts: list[Messages], max_new_tokens: int = 64, batch_size: int | None = None,
                 desc: str | None = None) -> list[tuple[str, list[int]]]:
    """Greedy answers to many prompts, batched with left padding: (text, answer token ids ending at the EOS if
    the model produced one), in prompt order."""
    return [answers[0] for answers in sample_batch(model, tokenizer, prompts, Sampling(), max_new_tokens,
                                                  batch_size, desc)]


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: list[Messages], sampling: Sampling, max_new_tokens: int = 64,
                 batch_size: int | None = None, desc: str | None = None, encoded: list[list[int]] | None = None
                 ) -> list[list[tuple[str, list[int]]]]:
    """`sampling.n` answers to each prompt, as (text, answer token ids ending at the EOS when the model produced
    one), in prompt order. Prompts are batched by length with left padding, so a batch wastes little.
    `batch_size` counts answers per generate() call (default: `generation_batch`). `encoded`: the prompts' token
    ids when the caller already has them (from encode_prompt)."""

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if encoded is None:
        encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[list[tuple[str, list[int]]]] = [[] for _ in encoded]
    eos = tokenizer.eos_token_id
    if batch_size is None:
        batch_size = generation_batch(device, max(map(len, encoded), default=0) + max_new_tokens)
    per_batch = max(1, batch_size // sampling.n)  # batch_size counts answers, not prompts
    bar = tqdm(total=len(order), desc=desc, unit="prompt", file=sys.stderr, disable=desc is None)
    for start in range(0, len(order), per_batch):
        idx = order[start:start + per_batch]
        ids, mask = pad_batch([encoded[i] for i in idx], tokenizer.pad_token_id, side="left", device=device)
        gen = draw(model, ids, mask, sampling, max_new_tokens, eos, tokenizer.pad_token_id)
        for row in range(gen.shape[0]):
            tokens = gen[row, ids.shape[1]:].tolist()
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            out[idx[row // sampling.n]].append((tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens))
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return out
