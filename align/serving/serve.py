"""`align serve-rm`: a trained reward model over HTTP (Starlette on uvicorn).

    POST /score   {"items": [{"prompt": "...", "response": "..."}, {"messages": [...]},
                             {"prompt": "...", "chosen": "...", "rejected": "..."}]}
              →   {"scores": [1.23, ..., {"chosen_score": .., "rejected_score": .., "margin": .., "correct": ..}]}
    GET  /health  {"status": "ok", "model": ..., "max_length": .., "max_items": .., "max_body_bytes": ..,
                   "queue": {"queued": .., "queue_size": .., "scored": .., "dropped": .., ...}}

Scores are the CLI's (same encoding, same scoring code). Requests are scored together: each one's sequences go
into one bounded queue that a single worker thread batches across requests (batcher.py says why and how).
Errors are JSON {"error": "..."} with no traceback: 400 malformed JSON, 401 missing/wrong API key, 413 body or
item count over the limit, 422 a bad item (named by its index) or one longer than the max length, 503 with
Retry-After when the queue is full. Past --max-connections open connections uvicorn itself answers a plain 503.
The server listens on loopback unless an API key is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import Any

from align.runtime.errors import ConfigError
from align.serving.batcher import Batcher, Job, QueueFull, Stopped
from align.serving.score import RewardModel, encode_rows, fill_scores

log = logging.getLogger(__name__)
API_KEY_ENV = "ALIGN_API_KEY"


# sequences that may wait, by device: a GPU scores hundreds a second, so a deep queue drains in seconds; on a CPU
# a pass of 8 sequences of the 135M demo model took ~2 s on 2 cores (bench/results/serve_load_after.txt), so 1024
# queued would mean minutes of waiting where a quick 503 + Retry-After serves a client better
QUEUE_SIZE = {"cuda": 1024, "cpu": 64}


def default_queue_size(rm: RewardModel) -> int:
    return QUEUE_SIZE.get(next(rm.model.parameters()).device.type, QUEUE_SIZE["cpu"])


@dataclass
class Limits:
    max_body_bytes: int = 2 * 1024 * 1024
    max_items: int = 64
    batch_size: int = 8  # sequences per forward pass
    max_length: int | None = None  # None = the length the model was trained with
    queue_size: int = 1024  # sequences waiting to be scored; past it a request gets 503 + Retry-After
    max_batch_tokens: int = 16384  # padded tokens per forward pass (sequences x the longest): bounds memory
    max_wait_ms: float = 5.0  # how long a pass that is not full waits for more requests
    max_connections: int = 1024  # open connections (uvicorn's limit_concurrency); past it a plain 503


class _Reject(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"refusing to listen on {host}, which other machines can reach, without an API key: set "
                          f"{API_KEY_ENV} (clients then send 'Authorization: Bearer <key>'), or keep the default "
                          "--host 127.0.0.1")


def _authorized(headers, api_key: str | None) -> bool:
    if not api_key:
        return True
    given = headers.get("x-api-key", "")
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    # constant time: the comparison must not reveal how much of a guessed key was right
    return hmac.compare_digest(given.encode(), api_key.encode())


# A body over the limit is still read (and thrown away) up to this size before the 413 goes out, so that a
# client still sending gets the answer instead of a broken pipe; beyond it the connection is simply closed.
DRAIN_BYTES = 16 * 1024 * 1024


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    over = size is not None and size > limit
    body = bytearray()
    total = 0
    if not (over and size > DRAIN_BYTES):
        async for chunk in request.stream():
            total += len(chunk)
            over = over or total > limit
            if total > DRAIN_BYTES:
                break
            if not over:
                body.extend(chunk)
    if over:
        shown = f"{size} bytes" if size is not None else "over the limit"
        raise _Reject(413, f"request body is {shown}; the limit is {limit} bytes")
    return bytes(body)


def _parse_json(body: bytes) -> Any:
    if not body.strip():
        raise _Reject(400, 'the request body is empty; send a JSON object {"items": [...]}')
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Reject(400, f"malformed JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # valid syntax json cannot hold: a huge number, deep nesting
        why = "arrays/objects nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise _Reject(400, f"malformed JSON: {why}") from None


def _items(payload: Any, limits: Limits) -> list[Any]:
    items = payload.get("items") if isinstance(payload, dict) else None
    if not isinstance(items, list):
        raise _Reject(422, 'the body must be a JSON object {"items": [...]} with a list of items to score')
    if not items:
        raise _Reject(422, "'items' is empty: nothing to score")
    if len(items) > limits.max_items:
        raise _Reject(413, f"{len(items)} items in one request; the limit is {limits.max_items}: split the request")
    return items


async def _client_left(request) -> None:
    """Returns when the client disconnects (the body is already read, so the next ASGI message is the disconnect;
    servers also send it once the response is complete, by which time nobody waits on this)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _scores_unless_left(request, batcher: Batcher, job: Job) -> list[float] | None:
    """The job's scores, or None when the client went away first — then its queued sequences are dropped."""
    answer = asyncio.wrap_future(job.future)
    left = asyncio.ensure_future(_client_left(request))
    try:
        done, _ = await asyncio.wait({answer, left}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        batcher.cancel(job)
        raise
    finally:
        left.cancel()
    if answer in done:
        return answer.result()
    batcher.cancel(job)
    return None


def _busy(message: str, retry_after: int, **extra: Any):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, "retry_after": retry_after, **extra}, status_code=503,
                        headers={"Retry-After": str(retry_after)})


def create_app(rm: RewardModel, limits: Limits | None = None, api_key: str | None = None):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    limits = limits or Limits()
    # one thread owns the model and scores every request's sequences in shared passes (batcher.py)
    batcher = Batcher(lambda seqs: rm.score(seqs, len(seqs)), limits.batch_size, limits.max_batch_tokens,
                      limits.max_wait_ms / 1000, limits.queue_size)
    served = {"requests": 0, "items": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn runs this after the open requests were answered: the worker has nothing left to do
        batcher.stop()

    def denied():
        return JSONResponse({"error": "missing or wrong API key"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    async def health(request):
        if not _authorized(request.headers, api_key):
            return denied()
        return JSONResponse({"status": "ok", "model": rm.source, "max_length": limits.max_length or rm.max_length,
                             "max_items": limits.max_items, "max_body_bytes": limits.max_body_bytes,
                             "queue": batcher.stats(), "requests_answered": served["requests"],
                             "items_scored": served["items"]})

    async def score(request):
        if not _authorized(request.headers, api_key):
            return denied()
        try:
            body = await _read_body(request, limits.max_body_bytes)
            payload = _parse_json(body)
            items = _items(payload, limits)
            results, slots, seqs = encode_rows(rm, list(enumerate(items)), limits.max_length)
            bad = [(r["row"], r["error"]) for r in results if "error" in r]
            if bad:
                raise _Reject(422, "; ".join(f"item {i}: {why}" for i, why in bad[:5]),
                              items=[{"item": i, "error": why} for i, why in bad])
            job = batcher.submit(seqs)
        except _Reject as e:
            return JSONResponse({"error": e.message, **e.extra}, status_code=e.status)
        except QueueFull as e:
            return _busy(f"{e}: the server is busy, retry after {e.retry_after} s", e.retry_after,
                         queued=e.depth, queue_size=e.limit)
        try:
            scored = await _scores_unless_left(request, batcher, job)
        except Stopped:
            return _busy("the server is shutting down", 5)
        if scored is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        fill_scores(results, slots, scored)
        served["requests"] += 1
        served["items"] += len(items)
        scores = [r["score"] if "score" in r else {k: r[k] for k in ("chosen_score", "rejected_score", "margin",
                                                                         "correct")} for r in results]
        return JSONResponse({"scores": scores})

    async def failed(request, exc):
        log.exception("scoring failed")
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    app = Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/score", score, methods=["POST"])],
                    exception_handlers={Exception: failed}, lifespan=lifespan)
    app.state.batcher = batcher
    return app


def make_server(rm: RewardModel, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
                api_key: str | None = None, log_level: str = "info"):
    """A uvicorn server for the app (call .run(), or run it in a thread and set .should_exit to stop it)."""
    import uvicorn

    check_bind(host, api_key)
    limits = limits or Limits()
    config = uvicorn.Config(create_app(rm, limits, api_key), host=host, port=port, log_level=log_level,
                            limit_concurrency=limits.max_connections, backlog=max(2048, limits.max_connections),
                            timeout_keep_alive=5, server_header=False)
    return uvicorn.Server(config)
