"""One labelling session: the items (made ahead in the background), who judged what, and the files behind them.

Files, all append-only (label_store): OUT (the judgements, a preference file), OUT.items.jsonl (every item shown,
with its answers, so a restart and every annotator see the same answers) and OUT.skips.jsonl (items an annotator
passed over, so a reload does not show them again). A restart with the same setup resumes; one with another setup
refuses the items file rather than mix two sessions' answers.

Answers are drawn by a background thread a few prompts ahead of the slowest annotator, so a person never waits for
the model: the first item comes after one prompt's answers, then the thread keeps `ahead` items in reserve.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from align.runtime.errors import AlignError, DataError
from align.serving.label_items import Setup, drawn_item, prompt_list, review_items
from align.serving.label_store import AppendLog, Rejected, check_submission, judgement_row

log = logging.getLogger(__name__)
Loader = Callable[[list[str]], list[Any]]  # policy specs -> loaded policies (align.serving.policies.Policy)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LabelSession:
    def __init__(self, setup: Setup, out: Path, loader: Loader | None = None, ahead: int = 8, batch: int = 4):
        setup.check()
        self.setup, self.out = setup, Path(out)
        self.judged_log = AppendLog(self.out)
        self.items_log = AppendLog(self.out.with_name(self.out.name + ".items.jsonl"))
        self.skips_log = AppendLog(self.out.with_name(self.out.name + ".skips.jsonl"))
        self.loader, self.ahead, self.batch = loader, ahead, batch
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.items: list[dict[str, Any]] = []
        self.by_id: dict[str, dict[str, Any]] = {}
        self.done: dict[tuple[str, str], str] = {}  # (annotator, item) -> "judged" | "skipped"
        self.judgements: list[dict[str, Any]] = []
        self.total = 0
        self.status = "starting"
        self.error: str | None = None
        self.stopping = False
        self.started = time.monotonic()
        self.first_item_s: float | None = None
        self._thread: threading.Thread | None = None
        self._resume()

    # ------------------------------------------------------------------ start, resume
    def _resume(self) -> None:
        signature = self.setup.signature()
        for row in self.items_log.read():
            if row.get("setup") != signature:
                raise DataError(f"{self.items_log.path} holds items of another label setup (its answers come from "
                                "other models, prompts or settings): use another --out, or move those files away")
            self._add(row)
        for row in self.judged_log.read():
            if row.get("item") in self.by_id and row.get("annotator"):
                self.judgements.append(row)
                self.done[(row["annotator"], row["item"])] = "judged"
        for row in self.skips_log.read():
            self.done.setdefault((row.get("annotator", ""), row.get("item", "")), "skipped")
        if self.items:
            log.info("resuming %s: %d items made, %d judgements", self.out, len(self.items), len(self.judgements))

    def _add(self, item: dict[str, Any]) -> None:
        if item["id"] not in self.by_id:
            self.items.append(item)
            self.by_id[item["id"]] = item
            if self.first_item_s is None:
                self.first_item_s = time.monotonic() - self.started
                if self.setup.mode != "review":
                    log.info("the first pair is ready, %.1f s after the start", self.first_item_s)

    def start(self) -> None:
        """Make the items: at once from a pairs file, else in a background thread."""
        if self.setup.mode == "review":
            made = review_items(self.setup.pairs, self.setup.limit, self.setup.signature())
            with self.lock:
                for item in made:
                    if item["id"] not in self.by_id:
                        self._record(item)
                self.total, self.status = len(self.items), "ready"
            return
        self._thread = threading.Thread(target=self._draw_all, name="label-answers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _record(self, item: dict[str, Any]) -> None:
        self.items_log.append({**item, "setup": self.setup.signature()})
        self._add(item)

    # ------------------------------------------------------------------ drawing answers ahead
    def _draw_all(self) -> None:
        try:
            self._draw()
        except (AlignError, RuntimeError, OSError, ValueError) as e:
            log.error("drawing answers failed: %s", e)
            with self.lock:
                self.status, self.error = "failed", str(e)

    def _draw(self) -> None:
        # torch and generation: only when answers are drawn (reviewing a pairs file needs neither)
        import torch

        from align.modeling.generate import Sampling, sample_batch  # with torch: only when answers are drawn

        prompts = prompt_list(self.setup)
        with self.lock:
            self.total = len(prompts)
            todo = [p for p in prompts if p[0] not in self.by_id]
            self.status = "loading the model" if todo else "ready"
        if not todo:
            return
        setup = self.setup
        specs = [setup.policy] + ([setup.against] if setup.against else [])
        policies = self.loader(specs)  # type: ignore[misc]
        n = 1 if setup.against else 2
        sampling = Sampling(temperature=setup.sampling_temperature, n=n)
        with self.lock:
            self.status = "drawing answers"
        size = 1  # the first item as soon as possible, then a few at a time
        while todo:
            with self.lock:
                while not self.stopping and self._reserve() >= self.ahead:
                    self.wake.wait(timeout=1.0)
                if self.stopping:
                    return
            chunk, todo = todo[:size], todo[size:]
            size = self.batch
            torch.manual_seed(setup.seed + len(self.items))
            answers = []
            for policy in policies:
                policy.activate()
                answers.append(sample_batch(policy.model, policy.tokenizer, [m for _, m, _ in chunk], sampling,
                                            setup.max_new_tokens))
            for i, (key, messages, gold) in enumerate(chunk):
                texts = [a[0] for per_model in answers for a in per_model[i]]
                item = drawn_item(setup, key, messages, gold, texts[0], texts[1])
                with self.lock:
                    if item is None:
                        self.total -= 1
                        log.info("a prompt got the same answer twice: nothing to choose, not shown")
                    else:
                        self._record(item)
        with self.lock:
            self.status = "ready"

    def _reserve(self) -> int:
        """Items made that the annotator furthest behind has not seen yet (a lower bound over annotators)."""
        annotators = {a for a, _ in self.done} or {""}
        return min(sum((a, item["id"]) not in self.done for item in self.items) for a in annotators)

    # ------------------------------------------------------------------ what the page asks
    def next_item(self, annotator: str) -> dict[str, Any]:
        with self.lock:
            self.wake.notify_all()  # someone moved on: the drawer may be waiting for room
            for item in self.items:
                if (annotator, item["id"]) not in self.done:
                    return {"status": "item", "item": self._public(item), **self._progress(annotator)}
            finished = self.status in ("ready", "failed") and len(self.items) >= self.total
            state = "failed" if self.status == "failed" else "done" if finished else "waiting"
            return {"status": state, "message": self.error or self.status, **self._progress(annotator)}

    @staticmethod
    def _public(item: dict[str, Any]) -> dict[str, Any]:
        """What the page may show: never who wrote which answer (the comparison is blind)."""
        return {"id": item["id"], "prompt": item["prompt"], "a": item["a"], "b": item["b"],
                "same": item["a"].strip() == item["b"].strip()}

    def _progress(self, annotator: str) -> dict[str, Any]:
        mine = [s for (a, _), s in self.done.items() if a == annotator]
        return {"judged": mine.count("judged"), "skipped": mine.count("skipped"), "total": self.total,
                "made": len(self.items), "mode": self.setup.mode, "annotators": len({a for a, _ in self.done})}

    def progress(self, annotator: str) -> dict[str, Any]:
        with self.lock:
            return {**self._progress(annotator), "status": self.status, "error": self.error}

    def submit(self, payload: Any) -> dict[str, Any]:
        item_key, annotator, label, comment = check_submission(payload)
        with self.lock:
            item = self.by_id.get(item_key)
            if item is None:
                raise Rejected(409, f"item {item_key} is not one of this session's items (a page from another "
                                    "session?): reload the page")
            previous = self.done.get((annotator, item_key))
            if previous is not None:
                raise Rejected(409, f"{annotator} has already {previous} this item; the first answer is kept: "
                                    "reload the page for the next item")
            if label in ("a", "b") and item["a"].strip() == item["b"].strip():
                raise Rejected(422, "answers A and B are the same text: choose tie or both bad")
            if label == "skip":
                self.skips_log.append({"item": item_key, "annotator": annotator, "time": _now()})
                self.done[(annotator, item_key)] = "skipped"
            else:
                row = judgement_row(item, annotator, label, comment, _now())
                self.judged_log.append(row)
                self.judgements.append(row)
                self.done[(annotator, item_key)] = "judged"
            self.wake.notify_all()
            return {"status": "recorded", **self._progress(annotator)}
