"""Held-out prompts for evaluation and on-policy pairs: a 'prompt' (a string or messages) and, for the gold judge,
an integer 'answer'. Bad rows are skipped with a warning naming file and row."""

from __future__ import annotations

import logging

from align.data.rows import _as_messages, read_rows
from align.modeling.formatting import Messages
from align.runtime.errors import RowError

log = logging.getLogger(__name__)


def load_prompts(spec: str, limit: int) -> list[tuple[Messages, int | None]]:
    """The first `limit` valid rows of `spec` as (messages, gold answer or None)."""
    rows = []
    for source, row_no, raw in read_rows(spec):
        if len(rows) >= limit:
            break
        try:
            if isinstance(raw, RowError):
                raise raw
            if not isinstance(raw, dict) or "prompt" not in raw:
                raise RowError("an eval prompt row needs a 'prompt'")
            prompt = _as_messages(raw["prompt"], "prompt", "user")
        except RowError as e:
            log.warning("%s:%d: skipped: %s", source, row_no, e)
            continue
        answer = raw.get("answer")
        rows.append((prompt, answer if isinstance(answer, int) and not isinstance(answer, bool) else None))
    return rows
