"""THE one path from (prompt, response) to tokens. Every stage — SFT, reward, DPO, PPO, scoring, evaluation —
calls `encode`/`encode_prompt` here, so the tokens a model is trained on are the tokens it is scored on.

Rules, each guarding against a failure seen in other tools:
- The chat template renders the whole conversation once; the prompt is the rendering of the prompt turns with
  the generation prompt, and the answer is what follows it. Rendering prompt and answer separately would repeat
  a template's default system prompt.
- Tokens come from the rendered text with `add_special_tokens=False`: a template that writes BOS itself does
  not get a second one. A BOS the tokenizer would add but the template omits is added once.
- The answer ends with exactly one EOS: the template's end-of-turn token when that is the EOS (anything the
  template renders after it, like a newline, is dropped), else an appended EOS. Reward models read their score
  at this EOS, so it must be the same token at training and at scoring time.
- Truncation keeps the start: the prompt is kept whole and the answer is cut at the end (losing its EOS). If
  the prompt alone fills `max_length`, there is nothing left to learn and the example is rejected.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from align.runtime.errors import FormatError

IGNORE = -100
Messages = list[dict[str, str]]



@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    prompt_len: int  # tokens before the answer starts
    truncated: bool  # the answer lost its end (and its EOS) to max_length

    @property
    def completion_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len:]


@functools.lru_cache(maxsize=8)
def _bos_ids(tokenizer) -> tuple[int, ...]:
    """(BOS,) when the tokenizer adds one on its own (so the model was trained with it), else ()."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ()
    probe = tokenizer("a").input_ids
    return (bos,) if probe and probe[0] == bos else ()


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = list(_bos_ids(tokenizer))
    if bos and ids[:1] != bos:
        ids = bos + ids
    while bos and ids[:2] == bos * 2:  # a template that writes BOS into a tokenizer that adds one
        ids = ids[1:]
    return ids


def _render(tokenizer, messages: Messages, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - templates raise anything (TemplateError, TypeError, ...)
        raise FormatError(f"the chat template cannot render this role order: {e}") from None


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


_PROBE = "Probe answer 7"


def end_of_turn(tokenizer) -> str | None:
    """The special token the chat template writes first after an assistant answer (<|im_end|>, <|eot_id|>,
    <end_of_turn>, <|end|>, </s>), or None when the template ends answers with plain text or cannot render one."""
    messages = [{"role": "user", "content": "Probe question"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - templates raise anything; the formatting path reports it where it matters
        return None
    if _PROBE not in text:
        return None
    after = text[text.rindex(_PROBE) + len(_PROBE):]
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    found = [(after.find(t), t) for t in specials if t and t in after]
    return min(found)[1] if found else None


def check_special_tokens(tokenizer, texts: list[str]) -> None:
    """Reject text that spells a special token: it would be parsed as a control token, not as text."""
    for text in texts:
        for special in tokenizer.all_special_tokens:
            if special and special in text:
                raise FormatError(f"text contains the special token {special!r}; remove it from the data")


def encode_prompt(tokenizer, prompt: Messages) -> list[int]:
    """Token ids of a prompt ready for generation (ends with the assistant header)."""
    check_special_tokens(tokenizer, [m["content"] for m in prompt])
    return _with_bos(tokenizer, _tokens(tokenizer, _render(tokenizer, prompt, True)))


def _answer_ids(tokenizer, prompt: Messages, completion: Messages) -> tuple[list[int], list[int]]:
    prompt_text = _render(tokenizer, prompt, True)
    full_text = _render(tokenizer, prompt + completion, False)
    if not full_text.startswith(prompt_text):
        raise FormatError("the chat template renders the prompt differently once an answer follows, so the "
                          "prompt/answer boundary cannot be found")
    prompt_ids = _with_bos(tokenizer, _tokens(tokenizer, prompt_text))
    answer_ids = _tokens(tokenizer, full_text[len(prompt_text):])
    eos = tokenizer.eos_token_id
    if eos in answer_ids:
        answer_ids = answer_ids[: answer_ids.index(eos) + 1]
    else:
        answer_ids = answer_ids + [eos]
    return prompt_ids, answer_ids


def encode(tokenizer, prompt: Messages | None, completion: Messages | None, text: str | None = None,
           max_length: int = 512, completion_only: bool = True) -> Encoded:
    """One example -> token ids and labels. `text` rows (no prompt) are trained on every token."""
    if text is not None:
        check_special_tokens(tokenizer, [text])
        ids = _with_bos(tokenizer, _tokens(tokenizer, text)) + [tokenizer.eos_token_id]
        truncated = len(ids) > max_length
        ids = ids[:max_length]
        return Encoded(ids, list(ids), 0, truncated)
    if not prompt or not completion:
        raise FormatError("an example needs a prompt and an answer, or a text")
    check_special_tokens(tokenizer, [m["content"] for m in prompt + completion])
    prompt_ids, answer_ids = _answer_ids(tokenizer, prompt, completion)
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise FormatError(f"nothing left to learn after truncation: the prompt alone is {len(prompt_ids)} tokens "
                          f"and data.max_length is {max_length}")
    truncated = len(answer_ids) > room
    answer_ids = answer_ids[:room]
    ids = prompt_ids + answer_ids
    labels = ([IGNORE] * len(prompt_ids) + answer_ids) if completion_only else list(ids)
    return Encoded(ids, labels, len(prompt_ids), truncated)


def encode_whole(tokenizer, prompt: Messages, completion: Messages, max_length: int = 512) -> Encoded:
    """A whole (prompt, answer) as `encode` makes it (prompt masked in labels), but never truncated.

    A reward model reads its score at the answer's final EOS, and DPO compares whole answers; a cut answer
    would be judged as if it were complete, so an answer that does not fit is an error, not a truncation.
    """
    if not prompt or not completion:
        raise FormatError("a scored example needs a prompt and an answer")
    check_special_tokens(tokenizer, [m["content"] for m in prompt + completion])
    prompt_ids, answer_ids = _answer_ids(tokenizer, prompt, completion)
    if len(prompt_ids) >= max_length:
        raise FormatError(f"nothing left of the answer after truncation: the prompt alone is {len(prompt_ids)} "
                          f"tokens and the max length is {max_length}")
    n = len(prompt_ids) + len(answer_ids)
    if n > max_length:
        raise FormatError(f"prompt + answer is {n} tokens, over the max length {max_length}; the score is read at "
                          "the answer's final EOS, so the whole answer must fit: raise the max length or shorten it")
    return Encoded(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids, len(prompt_ids), False)


def encode_scored(tokenizer, prompt: Messages, completion: Messages, max_length: int = 512) -> list[int]:
    """Token ids of a whole (prompt, answer) for a reward model (see encode_whole)."""
    return encode_whole(tokenizer, prompt, completion, max_length).input_ids
