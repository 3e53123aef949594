"""The label page's files: append-only JSON lines that a kill never tears, and the judgement rows they hold.

A judgement is one line written by one `os.write` on a file opened with O_APPEND, then fsync'd: a process killed
mid-call leaves either the whole line or none of it, and two writers never interleave lines. A file whose last
line has no newline (a disk that filled up, a copy cut short) is repaired on open: that unfinished line is moved to
FILE.torn and the rest is kept, so nothing already judged is lost and nothing half-written is read as a judgement.

A judgement row is a preference row as `align reward`, `align dpo` and `align run data.preferences=` read it:
{"prompt", "chosen", "rejected"} when the person preferred one answer. Ties and "both bad" keep their label and
both answers but no chosen/rejected, and the readers leave them out of the pairs (align.data.pairs.NOT_PAIRS).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from align.runtime.errors import DataError

log = logging.getLogger(__name__)

LABELS = ("a", "b", "tie", "both_bad")
MAX_COMMENT = 2000
ANNOTATOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class Rejected(Exception):
    """A submission that is refused: an HTTP status and a message that says what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def repair(path: Path) -> None:
    """Move an unfinished last line (no newline) aside to PATH.torn, keeping every whole line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    torn = path.with_name(path.name + ".torn")
    with open(torn, "ab") as f:
        f.write(data[keep:] + b"\n")
    os.truncate(path, keep)
    log.warning("%s ended in an unfinished line (%d bytes); it was moved to %s and the %s whole lines are kept",
                path, len(data) - keep, torn, data[:keep].count(b"\n"))


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every row of an append-only file (after repair); a line that is not a JSON object is an error naming it."""
    repair(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not JSON ({e.msg}); this file is written by align label: fix or "
                                "remove that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: not a JSON object")
            rows.append(row)
    return rows


class AppendLog:
    """One append-only JSON-lines file, safe for concurrent requests of one server."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> list[dict[str, Any]]:
        with self.lock:
            return read_lines(self.path)

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
                if written != len(data):  # a full disk: take the partial line back out rather than leave it torn
                    os.ftruncate(fd, os.fstat(fd).st_size - written)
                    raise OSError(f"only {written} of {len(data)} bytes could be written to {self.path}")
                os.fsync(fd)
            finally:
                os.close(fd)


def check_submission(payload: Any) -> tuple[str, str, str, str]:
    """(item, annotator, label or 'skip', comment) of a submitted judgement, or Rejected naming the bad field."""
    if not isinstance(payload, dict):
        raise Rejected(422, 'send a JSON object {"item", "annotator", "label", "comment"}')
    item, annotator, label = payload.get("item"), payload.get("annotator"), payload.get("label")
    comment = payload.get("comment", "") or ""
    if not isinstance(item, str) or not item:
        raise Rejected(422, "'item' must be the id of the item shown")
    if not isinstance(annotator, str) or not ANNOTATOR.match(annotator):
        raise Rejected(422, "'annotator' must be a name of 1-64 letters, digits, '_', '.', '@' or '-'")
    if label not in (*LABELS, "skip"):
        raise Rejected(422, f"'label' must be one of {', '.join(LABELS)} or skip")
    if not isinstance(comment, str):
        raise Rejected(422, "'comment' must be text")
    if len(comment) > MAX_COMMENT:
        raise Rejected(413, f"the comment is {len(comment)} characters; the limit is {MAX_COMMENT}")
    return item, annotator, label, comment


def judgement_row(item: dict[str, Any], annotator: str, label: str, comment: str, when: str) -> dict[str, Any]:
    """The row written for one judgement: a preference pair when one answer won, else both answers and the label."""
    row: dict[str, Any] = {"prompt": item["prompt"]}
    if label in ("a", "b"):
        other = "b" if label == "a" else "a"
        row.update(chosen=item[label], rejected=item[other])
    row.update(label=label, answer_a=item["a"], answer_b=item["b"], written_by=item["written_by"],
               item=item["id"], annotator=annotator, time=when)
    for key in ("candidate", "baseline", "gold", "source"):
        if item.get(key) is not None:
            row[key] = item[key]
    if comment.strip():
        row["comment"] = comment.strip()
    return row
