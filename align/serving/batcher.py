"""The queue between `align serve-rm`'s requests and its one model.

Why it exists: scoring each request on its own behind a lock runs the model on batches of 1–8 sequences (most
of a forward pass is fixed cost), lets waiting requests pile up without bound, and answers nothing about it.
Here every request puts its token sequences in one bounded queue and one worker thread — the only thread that
touches the model — takes what is queued (after waiting up to `max_wait_s` for a fuller pass), sorts it by
length so that padding stays small, scores it in passes of at most `batch_size` sequences and
`max_batch_tokens` padded tokens, and answers each request as soon as its last sequence is scored, with its
scores in its own order. A pass pads shorter sequences, which does not change their scores (the score is read at
each sequence's own EOS under the attention mask), so a request scores the same batched as alone.

A full queue is refused at once (`QueueFull`, which the server turns into 503 + Retry-After) instead of letting
latency grow without bound; a request whose client went away is cancelled and its queued sequences dropped.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

# A round takes up to this many passes' worth of queued sequences: sorting a wider window pads less, while a
# narrow one lets requests that arrive during a round get into the next one sooner.
WINDOW_PASSES = 4


class QueueFull(Exception):
    def __init__(self, depth: int, limit: int, retry_after: int):
        super().__init__(f"the scoring queue is full ({depth} sequences waiting; the limit is {limit})")
        self.depth, self.limit, self.retry_after = depth, limit, retry_after


class Stopped(Exception):
    """The batcher was stopped (the server is shutting down) before this request was scored."""


class Job:
    """One request's sequences; `future` gets their scores, in their order."""

    def __init__(self, seqs: list[list[int]]):
        self.seqs = seqs
        self.scores: list[float] = [0.0] * len(seqs)
        self.taken = 0  # sequences the worker has taken off the queue (they are taken in order)
        self.left = len(seqs)  # sequences not yet scored
        self.cancelled = False
        self.future: Future = Future()


class Batcher:
    def __init__(self, score: Callable[[list[list[int]]], list[float]], batch_size: int = 8,
                 max_batch_tokens: int = 16384, max_wait_s: float = 0.005, queue_size: int = 1024):
        """`score(seqs)` scores one pass (called from the worker thread only); `queue_size` is in sequences."""
        self._score = score
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.max_wait_s, self.queue_size = max_wait_s, queue_size
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._depth = 0  # sequences queued and not yet taken
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rate: float | None = None  # sequences/s of recent passes, for Retry-After
        self.scored = self.dropped = self.passes = 0
        self.scoring = 0  # sequences in the pass running now

    # ------------------------------------------------------------------ the request side (any thread)

    def submit(self, seqs: list[list[int]]) -> Job:
        job = Job(seqs)
        with self._cond:
            if self._stopping:
                raise Stopped("the server is shutting down")
            # an empty queue takes any request, so one larger than the bound still gets scored eventually
            if self._depth and self._depth + len(seqs) > self.queue_size:
                raise QueueFull(self._depth, self.queue_size, self._retry_after())
            if not seqs:
                job.future.set_result([])
                return job
            self._start()
            self._jobs.append(job)
            self._depth += len(seqs)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop what is left of a request whose answer nobody will read; a pass already running finishes."""
        with self._cond:
            if job.future.done():
                return
            job.cancelled = True
            untaken = len(job.seqs) - job.taken
            self._depth -= untaken
            self.dropped += untaken  # the ones already taken are counted when the worker skips them
            job.taken = len(job.seqs)
            job.future.cancel()

    def stats(self) -> dict:
        with self._cond:  # held only for bookkeeping, never during a pass: /health does not wait on the model
            return {"queued": self._depth, "queue_size": self.queue_size, "scored": self.scored,
                    "dropped": self.dropped, "passes": self.passes, "scoring": self.scoring,
                    "worker_alive": self.alive}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _retry_after(self) -> int:
        if not self._rate:
            return 1
        return max(1, min(60, math.ceil(self._depth / self._rate)))

    # ------------------------------------------------------------------ lifecycle

    def _start(self) -> None:
        # started on the first request (under the lock): an app used without its lifespan still works
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="align-rm-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker after the pass it is in; requests still queued fail with `Stopped`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker thread

    def _take(self) -> list[tuple[Job, int]] | None:
        with self._cond:
            while not self._stopping and not self._depth:
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            while not self._stopping and self._depth < self.batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping:
                self._fail_queued()
                return None
            window: list[tuple[Job, int]] = []
            limit = self.batch_size * WINDOW_PASSES
            while self._jobs and len(window) < limit:
                job = self._jobs[0]
                n = min(len(job.seqs) - job.taken, limit - len(window))
                window += [(job, i) for i in range(job.taken, job.taken + n)]
                job.taken += n
                self._depth -= n
                if job.taken == len(job.seqs):
                    self._jobs.popleft()
            return window

    def _fail_queued(self) -> None:
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(Stopped("the server is shutting down"))
        self._jobs.clear()
        self._depth = 0

    def _passes(self, window: list[tuple[Job, int]]) -> list[list[tuple[Job, int]]]:
        """Longest first, so each pass holds sequences of similar length; a pass's padded size is its first's."""
        window = sorted(window, key=lambda it: len(it[0].seqs[it[1]]), reverse=True)
        out: list[list[tuple[Job, int]]] = []
        for it in window:
            cur = out[-1] if out else None
            if cur is None or len(cur) >= self.batch_size or \
                    (len(cur) + 1) * len(cur[0][0].seqs[cur[0][1]]) > self.max_batch_tokens:
                out.append([it])
            else:
                cur.append(it)
        return out

    def _run(self) -> None:
        while (window := self._take()) is not None:
            for chunk in self._passes(window):
                live = [(job, i) for job, i in chunk if not job.cancelled and not job.future.done()]
                if len(live) < len(chunk):
                    with self._cond:
                        self.dropped += len(chunk) - len(live)
                if live:
                    self._score_pass(live)

    def _score_pass(self, live: list[tuple[Job, int]]) -> None:
        with self._cond:
            self.scoring = len(live)
        start = time.perf_counter()
        try:
            scores = self._score([job.seqs[i] for job, i in live])
        except Exception as e:  # the requests in this pass fail (500); the worker goes on with the others
            with self._cond:
                self.scoring = 0
                for job, _ in live:
                    if not job.future.done():
                        job.future.set_exception(e)
            return
        seconds = time.perf_counter() - start
        with self._cond:  # with cancel() under the same lock, a future is never set after it was cancelled
            for (job, i), s in zip(live, scores):
                if job.future.done():
                    continue
                job.scores[i] = s
                job.left -= 1
                if not job.left:
                    job.future.set_result(job.scores)
            self.scored += len(live)
            self.passes += 1
            self.scoring = 0
            rate = len(live) / max(seconds, 1e-6)
            self._rate = rate if self._rate is None else 0.8 * self._rate + 0.2 * rate
