"""`align chat`: talk to a trained policy in the terminal, or answer prompts from a pipe.

Every turn goes through the one formatting path (the chat template the policy trained with, its EOS) and the one
sampling path (`draw`: every sampling setting stated, nothing taken from the base's generation_config.json), so
what a person sees in a chat is what evaluation and RL sampled. In a terminal, tokens are shown as they are drawn;
with `--compare` each turn is answered by both models, each keeping its own side of the conversation. Without a
terminal (a pipe, a file) each input line is one single-turn prompt and one output line its answer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

import torch
from transformers.generation.streamers import BaseStreamer

from align.data.rows import check_messages
from align.modeling.formatting import Messages, encode_prompt
from align.modeling.generate import Sampling, draw
from align.runtime.errors import AlignError, FormatError, RowError

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D), /help"


@dataclass
class Speaker:
    """One model in the chat and its side of the conversation."""

    name: str
    model: Any
    tokenizer: Any
    history: Messages = field(default_factory=list)
    adapter: str | None = None  # the adapter to answer with when several policies share the model

    @property
    def context(self) -> int:
        """Tokens the model can attend to (None-safe: a config without it is taken as unbounded)."""
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None) or 1 << 30


class _Stream(BaseStreamer):
    """Hands each newly decoded piece of the answer to `write`. Decoding the whole answer each time (not token by
    token) keeps multi-byte characters and merged spaces right; a piece ending in an incomplete character waits."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)  # whatever is left, an unfinished character included: the answer has ended

    def _show(self, final: bool) -> None:
        decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        text = decoded.strip() if final else decoded.lstrip()
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)


def fit_context(speaker: Speaker, messages: Messages, max_new_tokens: int) -> tuple[list[int], int]:
    """The prompt's token ids, dropping the oldest turns (never the system message or the last question) until
    the prompt and the answer fit the model; and how many messages were dropped."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = encode_prompt(speaker.tokenizer, system + turns)
        if len(ids) + max_new_tokens <= speaker.context or len(turns) <= 1:
            return ids, dropped
        turns = turns[2:]  # one question and its answer
        dropped += 2


def reply(speaker: Speaker, messages: Messages, sampling: Sampling, max_new_tokens: int,
          write: Callable[[str], None] | None = None, seed: int | None = None, ids: list[int] | None = None) -> str:
    """One answer to `messages` (whose last message is the user's), shown piece by piece through `write`; `ids`:
    the prompt's tokens when the caller already fitted them (fit_context)."""
    if ids is None:
        ids, _ = fit_context(speaker, messages, max_new_tokens)
    if speaker.adapter is not None:
        speaker.model.set_adapter(speaker.adapter)
    device = next(speaker.model.parameters()).device
    tensor = torch.tensor([ids], device=device)
    if seed is not None:
        torch.manual_seed(seed)
    tok = speaker.tokenizer
    stream = _Stream(tok, write) if write else None
    out = draw(speaker.model, tensor, torch.ones_like(tensor), sampling, max_new_tokens, tok.eos_token_id,
               tok.pad_token_id, streamer=stream)
    tokens = out[0, tensor.shape[1]:].tolist()
    if tok.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tok.eos_token_id)]
    return tok.decode(tokens, skip_special_tokens=True).strip()


def _start(system: str | None) -> Messages:
    return [{"role": "system", "content": system}] if system else []


def interactive(speakers: list[Speaker], sampling: Sampling, max_new_tokens: int, system: str | None,
                read: Callable[[str], str] = input, out: IO[str] | None = None, seed: int | None = None) -> int:
    """The terminal chat: a question, then each model's answer as it is drawn; /reset, /exit."""
    out = out or sys.stdout
    names = ", ".join(s.name for s in speakers)
    print(f"chatting with {names} ({'greedy' if sampling.temperature <= 0 else f'temperature {sampling.temperature:g}'}"
          f", up to {max_new_tokens} new tokens). {HELP}", file=out, flush=True)
    for s in speakers:
        s.history = _start(system)
    while True:
        try:
            line = read("you> ")
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print("\n(interrupted: /exit to leave)", file=out, flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            for s in speakers:
                s.history = _start(system)
            print("(conversation reset)", file=out, flush=True)
            continue
        if text == "/help" or (text.startswith("/") and " " not in text):
            print(HELP if text == "/help" else f"unknown command {text}; {HELP}", file=out, flush=True)
            continue
        for s in speakers:
            _answer_turn(s, text, sampling, max_new_tokens, out, len(speakers) > 1, seed)


def _answer_turn(s: Speaker, text: str, sampling: Sampling, max_new_tokens: int, out: IO[str], labelled: bool,
                 seed: int | None) -> None:
    messages = s.history + [{"role": "user", "content": text}]
    if labelled:
        print(f"[{s.name}]", file=out, flush=True)
    try:
        ids, dropped = fit_context(s, messages, max_new_tokens)
        if dropped:
            print(f"(the oldest {dropped} messages no longer fit {s.name}'s context and are left out)", file=out)
        answer = reply(s, messages, sampling, max_new_tokens, lambda piece: print(piece, end="", file=out,
                                                                                 flush=True), seed, ids)
    except FormatError as e:
        print(f"(cannot answer that: {e})", file=out, flush=True)
        return
    print("(an empty answer: the model ended at once)" if not answer else "", file=out, flush=True)
    s.history = messages + [{"role": "assistant", "content": answer}]


def _prompt_of(line: str, number: int, as_json: bool, system: str | None) -> tuple[Messages, dict[str, Any]]:
    """The messages of one input line and the row the answer is written into."""
    if not as_json:
        return _start(system) + [{"role": "user", "content": line}], {}
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise AlignError(f"line {number}: not JSON ({e.msg} at column {e.colno}); with --json each line is "
                         '{"prompt": "..."} or {"messages": [...]}') from None
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return _start(system) + [{"role": "user", "content": row["prompt"]}], row
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        try:
            messages = check_messages(row["messages"], "messages")
        except RowError as e:
            raise AlignError(f"line {number}: {e}") from None
        if messages[-1]["role"] != "user":
            raise AlignError(f"line {number}: 'messages' must end with a user message (the one to answer)")
        return messages, row
    raise AlignError(f"line {number}: expected an object with a non-empty 'prompt' string or a 'messages' list")


def one_line(text: str) -> str:
    """An answer on one line: a backslash and a newline written as their escapes (use --json for exact text)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def piped(speakers: list[Speaker], lines: Iterable[str], sampling: Sampling, max_new_tokens: int,
          system: str | None, as_json: bool, out: IO[str] | None = None, seed: int | None = None) -> int:
    """One answer per input line (blank lines skipped); a bad line gets an error line and the rest go on.
    Returns how many lines failed."""
    out = out or sys.stdout
    failed = 0
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            messages, row = _prompt_of(line, number, as_json, system)
            answers = [reply(s, messages, sampling, max_new_tokens, seed=seed) for s in speakers]
        except (AlignError, FormatError) as e:
            failed += 1
            print(f"error: {e}" if isinstance(e, AlignError) else f"error: line {number}: {e}", file=sys.stderr)
            print(json.dumps({"line": number, "error": str(e)}) if as_json else "", file=out, flush=True)
            continue
        if as_json:
            extra = {"compare": answers[1]} if len(answers) > 1 else {}
            print(json.dumps({**row, "answer": answers[0], **extra}, ensure_ascii=False), file=out, flush=True)
        else:
            print("\t".join(one_line(a) for a in answers), file=out, flush=True)
    return failed
