"""What the label page shows: items of one prompt and two answers, from a pairs file or drawn from policies.

Three sources, one item shape {"id", "prompt", "a", "b", "written_by": {"a", "b"}, ...}:
  review   a preference file's rows (is the data right?): chosen and rejected, in random order
  collect  one policy sampled twice on each prompt (new preferences)
  compare  two policies on each prompt, blind and in random order (human evaluation: "candidate" and "baseline"
           say which policy is which, the page never shows it)
The A/B order of an item is drawn from its id, so every annotator sees the same item the same way and a restart
shows it again as before; ids come from the setup and the prompt, so a restarted session knows what was judged.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import asdict, dataclass
from typing import Any

from align.data.pairs import parse_pair
from align.data.prompts import load_prompts
from align.data.rows import read_rows
from align.modeling.formatting import Messages
from align.runtime.errors import ConfigError, DataError, RowError
from align.runtime.runs import json_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """Where a label session's items come from; its signature ties an items file to it."""

    pairs: str | None = None
    policy: str | None = None
    against: str | None = None
    prompts: str | None = None
    limit: int | None = None  # None: every row / prompt
    temperature: float | None = None  # None: greedy when comparing two policies, 0.7 when sampling one twice
    max_new_tokens: int = 128
    seed: int = 0

    @property
    def mode(self) -> str:
        return "review" if self.pairs else "compare" if self.against else "collect"

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.mode == "compare" else 0.7

    def check(self) -> None:
        if bool(self.pairs) == bool(self.policy):
            raise ConfigError("name what to label: --pairs FILE (review preference data), --policy RUN --prompts "
                              "FILE (two samples of one policy), or --policy RUN --against OTHER --prompts FILE "
                              "(human evaluation of two policies)")
        if self.against and not self.policy:
            raise ConfigError("--against needs --policy (the candidate it is compared with)")
        if self.policy and not self.prompts:
            raise ConfigError("--policy needs --prompts FILE: the prompts its answers are drawn for")
        if self.mode == "collect" and self.sampling_temperature <= 0:
            raise ConfigError("two greedy answers of one policy are the same answer: sampling twice needs "
                              "--temperature > 0")
        if (self.limit is not None and self.limit < 1) or self.max_new_tokens < 1:
            raise ConfigError("--limit and --max-new-tokens must be >= 1")

    def signature(self) -> str:
        kept = {k: v for k, v in asdict(self).items() if k != "limit"}  # more items later is the same session
        return json_hash({**kept, "temperature": self.sampling_temperature})[:16]


def shown_prompt(messages: Messages) -> str | Messages:
    """A prompt as a preference row holds it: the question alone when it is one user message."""
    return messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages


def item_id(*parts: Any) -> str:
    return hashlib.sha256(json_hash(parts).encode()).hexdigest()[:16]


def arrange(item_id_: str, first: tuple[str, str], second: tuple[str, str]) -> dict[str, Any]:
    """A and B of an item in the order its id draws: {"a", "b", "written_by"} from (text, writer) pairs."""
    if random.Random(item_id_).random() < 0.5:
        first, second = second, first
    return {"a": first[0], "b": second[0], "written_by": {"a": first[1], "b": second[1]}}


def review_items(spec: str, limit: int | None, signature: str) -> list[dict[str, Any]]:
    """Items from a preference file's rows; rows the trainers would refuse are left out with a warning."""
    items, seen, bad = [], set(), 0
    for source, row_no, raw in read_rows(spec):
        if limit is not None and len(items) >= limit:
            break
        try:
            if isinstance(raw, RowError):
                raise raw
            prompt, chosen, rejected = parse_pair(raw)
        except RowError as e:
            bad += 1
            log.warning("%s:%d: not shown: %s", source, row_no, e)
            continue
        key = item_id(signature, prompt, chosen, rejected)
        if key in seen:  # the same pair twice in the file: one judgement is enough
            continue
        seen.add(key)
        items.append({"id": key, "prompt": shown_prompt(prompt), "source": f"{source}:{row_no}",
                      **arrange(key, (chosen[0]["content"], "chosen"), (rejected[0]["content"], "rejected"))})
    if not items:
        raise DataError(f"{spec}: no preference row to show ({bad} rows refused; see the warnings above)")
    return items


def prompt_list(setup: Setup) -> list[tuple[str, Messages, int | None]]:
    """(item id, messages, gold answer) of each prompt to draw answers for."""
    assert setup.prompts is not None
    prompts = load_prompts(setup.prompts, setup.limit or 1 << 31)
    if not prompts:
        raise DataError(f"{setup.prompts}: no usable prompt (each row needs a 'prompt')")
    signature = setup.signature()
    return [(item_id(signature, i, messages), messages, gold) for i, (messages, gold) in enumerate(prompts)]


def drawn_item(setup: Setup, key: str, messages: Messages, gold: int | None, first: str, second: str
               ) -> dict[str, Any] | None:
    """An item from two drawn answers. Two samples of one policy that came out the same give none (nothing to
    choose); two policies that answer the same are shown all the same, as the automatic evaluation counts them (a
    tie), so that people's win-rate is over the same prompts."""
    if first.strip() == second.strip() and setup.mode != "compare":
        return None
    item: dict[str, Any] = {"id": key, "prompt": shown_prompt(messages)}
    if setup.mode == "compare":
        item.update(arrange(key, (first, setup.policy), (second, setup.against)), candidate=setup.policy,
                    baseline=setup.against)
    else:
        item.update(arrange(key, (first, f"{setup.policy} (sample 1)"), (second, f"{setup.policy} (sample 2)")))
    if gold is not None:
        item["gold"] = gold
    return item
