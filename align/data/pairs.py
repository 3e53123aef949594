"""Preference pairs: every accepted row form, a reason for every bad pair, and encoding for the reward model.

Accepted rows: {"prompt", "chosen", "rejected"} with strings or message lists, and implicit-prompt pairs where
chosen and rejected are whole conversations (message lists or HH-RLHF "\\n\\nHuman: … \\n\\nAssistant: …" text)
whose shared beginning is the prompt. An optional numeric "margin" asks for a larger score gap on that pair.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from align.data.rows import Loaded, _as_messages, char_bound, chars, check_messages, load_rows, shown, type_name
from align.modeling.formatting import Messages, encode_whole
from align.runtime.errors import NotAPair, RowError

IDENTICAL = "'chosen' and 'rejected' are identical: the pair teaches nothing"
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
# labels of a person's judgement (align label) that prefer neither answer: such rows are kept, not used as pairs
NOT_PAIRS = ("tie", "both_bad")


@dataclass
class Pair:
    prompt: Messages
    chosen: Messages
    rejected: Messages
    margin: float = 0.0
    source: str = ""
    row: int = 0


@dataclass
class EncodedPair:
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float
    prompt_len: int = 0  # tokens of the shared prompt at the start of both


def parse_pair(row: Any) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) of one preference row, or RowError.

    With a 'prompt', chosen/rejected are answers (strings or one assistant message). Without one, they are whole
    conversations (message lists, or "\\n\\nHuman: ... \\n\\nAssistant: ..." text) and their shared beginning
    is the prompt.
    """
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type_name(row)}")
    if row.get("label") in NOT_PAIRS and "chosen" not in row:
        raise NotAPair(row["label"])
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(f"missing key '{key}' (a preference row needs 'chosen' and 'rejected', and may have "
                           "'prompt')")
    if "prompt" in row:
        prompt = _as_messages(row["prompt"], "prompt", "user")
        if prompt[-1]["role"] != "user":
            raise RowError("'prompt' must end with a user message")
        chosen, rejected = (_answer(row[k], k) for k in ("chosen", "rejected"))
    else:
        prompt, chosen, rejected = _split_shared_prompt(row["chosen"], row["rejected"])
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise RowError(IDENTICAL)
    return prompt, chosen, rejected


def _answer(value: Any, key: str) -> Messages:
    answer = _as_messages(value, key, "assistant", ordered=False)
    if [m["role"] for m in answer] != ["assistant"]:
        raise RowError(f"'{key}' must be one assistant answer (a string or one assistant message)")
    return answer


def _conversation(value: Any, key: str) -> Messages:
    if isinstance(value, str) and value.startswith("\n\nHuman: "):
        parts = _HH_TURN.split(value)[1:]  # [role, text, role, text, ...]
        value = [{"role": "user" if r == "Human" else "assistant", "content": t.strip()}
                 for r, t in zip(parts[::2], parts[1::2])]
    elif not isinstance(value, list):
        raise RowError(f"without 'prompt', '{key}' must be a whole conversation (a message list or "
                       "'\\n\\nHuman: ... \\n\\nAssistant: ...' text) sharing its beginning with the other side")
    return check_messages(value, key)


def _split_shared_prompt(chosen_raw: Any, rejected_raw: Any) -> tuple[Messages, Messages, Messages]:
    chosen, rejected = _conversation(chosen_raw, "chosen"), _conversation(rejected_raw, "rejected")
    if chosen == rejected:
        raise RowError(IDENTICAL)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prompt, chosen_tail, rejected_tail = chosen[:n], chosen[n:], rejected[n:]
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("'chosen' and 'rejected' do not share a prompt ending in a user message; add a 'prompt' key")
    for key, tail in (("chosen", chosen_tail), ("rejected", rejected_tail)):
        if [m["role"] for m in tail] != ["assistant"]:
            raise RowError(f"after the shared prompt, '{key}' must be exactly one assistant message")
    return prompt, chosen_tail, rejected_tail


def row_margin(row: dict) -> float:
    """The row's own margin; absent, null or blank (a CSV/Parquet row without one) is 0. CSV cells are text, so a
    numeric string is read as its number."""
    value = row.get("margin")
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0.0
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):  # not a number, or an integer too big for a float
            pass
    if number is None or not math.isfinite(number):
        raise RowError(f"'margin' must be a finite number, got {shown(value)}")
    return number


def encode_pair(tokenizer, prompt: Messages, chosen: Messages, rejected: Messages, max_length: int,
                margin: float = 0.0) -> EncodedPair:
    """Both sides through the one formatting path; an answer that does not fit whole rejects the pair."""
    encoded = []
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if chars(prompt + answer) > char_bound(tokenizer, max_length):  # refused without tokenizing megabytes
            raise RowError(f"'{key}': prompt + answer is over the max length {max_length} "
                           f"({chars(prompt + answer):,} characters); the whole answer must fit")
        try:
            encoded.append(encode_whole(tokenizer, prompt, answer, max_length))
        except ValueError as e:
            raise RowError(f"'{key}': {e}") from None
    return EncodedPair(encoded[0].input_ids, encoded[1].input_ids, margin, encoded[0].prompt_len)


def load_pair_data(spec: str, tokenizer, max_length: int, split: str = "train", limit: int | None = None
                   ) -> Loaded:
    """Read, validate and tokenize preference rows; `encoded` holds EncodedPair, `examples` Pair."""
    def convert(raw: Any) -> tuple[EncodedPair, Pair]:
        prompt, chosen, rejected = parse_pair(raw)
        margin = row_margin(raw)
        return encode_pair(tokenizer, prompt, chosen, rejected, max_length, margin), Pair(prompt, chosen, rejected,
                                                                                            margin)

    return load_rows(spec, convert, split, limit)


def pair_loader(data_cfg):
    """For stage.prepare: tokenizer → a loader of preference splits under the stage's data settings."""
    def make(tokenizer):
        def load(spec: str, split: str, limit: int | None) -> Loaded:
            return load_pair_data(spec, tokenizer, data_cfg.max_length, data_cfg.split, limit)
        return load
    return make
