"""Tiny models of five families, each with a tokenizer built at test time that carries the family's special tokens
and a chat template written from the family's documented turn format (/work/shared/model_families.md): where BOS
comes from, whether the end of a turn is the EOS, whether there is a pad token, a default system prompt, a system
role or none, soft-capped logits. Two decoder layers, widths of 64, a 512-token byte-level BPE."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

LLAMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"
    "\n\n{{ sys }}<|eot_id|>{% for m in msgs %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}<start_of_turn>{{ role }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}")
MISTRAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}[INST] {{ (sys if loop.first else '') + m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass(frozen=True)
class Family:
    name: str
    specials: tuple[str, ...]   # special tokens, in id order from 0
    bos: str | None
    eos: str                    # the tokenizer's EOS as shipped
    turn_end: str               # what closes an assistant turn in the template
    pad: str | None
    adds_bos: bool              # the tokenizer itself prepends BOS
    template: str
    system: bool                # the template takes a system message
    default_system: str | None  # text the template adds when no system message is given
    arch: str


FAMILIES = {f.name: f for f in [
    Family("llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"), "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", None, True, LLAMA3, True,
           "Cutting Knowledge Date", "llama"),
    Family("qwen2.5", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|im_end|>",
           "<|endoftext|>", False, QWEN25, True, "You are Qwen", "qwen2"),
    Family("gemma2", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>",
           "<end_of_turn>", "<pad>", True, GEMMA2, False, None, "gemma2"),
    Family("mistral", ("<unk>", "<s>", "</s>"), "<s>", "</s>", "</s>", None, True, MISTRAL, True, None, "mistral"),
    Family("phi3", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
           "<s>", "<|endoftext|>", "<|end|>", "<|endoftext|>", True, PHI3, True, None, "phi3"),
]}


def _texts() -> list[str]:
    texts = ["User: Assistant: system user assistant model Cutting Knowledge Date You are Qwen"] * 50
    for line in (ROOT / "reward_data" / "prefs" / "train.jsonl").read_text().splitlines()[:200]:
        row = json.loads(line)
        texts += [row["prompt"], row["chosen"], row["rejected"]]
    return texts


def build_tokenizer(family: Family):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_texts(), trainers.BpeTrainer(
        vocab_size=512, special_tokens=list(family.specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if family.adds_bos:
        bos_id = family.specials.index(family.bos)
        bpe.post_processor = processors.TemplateProcessing(single=f"{family.bos} $A", pair=f"{family.bos} $A $B",
                                                           special_tokens=[(family.bos, bos_id)])
    named = {family.bos, family.eos, family.pad, family.turn_end, "<unk>"}
    extra = [t for t in family.specials if t not in named]
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad,
        unk_token="<unk>" if "<unk>" in family.specials else None, chat_template=family.template,
        additional_special_tokens=extra + ([family.turn_end] if family.turn_end != family.eos else []))


def build_model(family: Family, tok, out: Path, shipped_generation: dict | None = None) -> Path:
    """A two-layer model of the family's architecture with `tok`, saved to `out` (with a generation config as an
    instruct model ships one, when given)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("bos", family.bos), ("eos", family.eos),
                                                          ("pad", family.pad)) if v is not None}
    extra = {"gemma2": dict(head_dim=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                            sliding_window=64, query_pre_attn_scalar=16, attn_implementation="eager"),
             }.get(family.arch, {})
    cfg = AutoConfig.for_model(
        family.arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=ids.get("bos"), eos_token_id=ids["eos"], pad_token_id=ids.get("pad"), **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(bos_token_id=ids.get("bos"), eos_token_id=ids["eos"],
                                               pad_token_id=ids.get("pad"), **(shipped_generation or {}))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
