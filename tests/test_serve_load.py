"""`align serve-rm` under load: many clients at once, batched across requests, with the scores each request
gets alone; a full queue says so (503 + Retry-After + JSON); a client that leaves leaves no work behind."""

import contextlib
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_serve import ITEM, PAIR, Running

from align.serving.batcher import Batcher, QueueFull, Stopped
from align.serving.score import RewardModel, load_reward_model, score_rows
from align.serving.serve import Limits

WORDS = "the answer is five because two plus three makes five and not nine".split()


@pytest.fixture(scope="module")
def rm(tiny_reward_run):
    return load_reward_model(tiny_reward_run, "cpu")


class Gated(RewardModel):
    """The real model, but each pass waits for the test to open the gate: the queue fills deterministically."""

    def score(self, seqs, batch_size=8, progress=False, desc=None):
        assert self.gate.wait(60), "the test never opened the gate"
        return super().score(seqs, batch_size, progress, desc)


def gated(rm) -> Gated:
    g = Gated(rm.model, rm.tokenizer, rm.max_length, rm.source)
    g.gate = threading.Event()
    return g


@contextlib.contextmanager
def opened(gate: threading.Event):
    """Opens the gate on the way out, also when the test failed: the server can then finish and stop."""
    try:
        yield
    finally:
        gate.set()


def pool(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        q = f"What is {k} + {k % 7}?"
        out.append({"prompt": q, "chosen": text, "rejected": text[::-1] + "?"} if k % 4 == 0
                   else {"prompt": q, "response": text})
    return out


def wait_for(srv, check, what: str, seconds: float = 60):
    deadline = time.time() + seconds
    while True:
        status, health = srv.call("/health")
        assert status == 200
        if check(health["queue"]):
            return health
        assert time.time() < deadline, f"never saw {what}: {health}"
        time.sleep(0.02)


def post_with_headers(srv, body):
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/score", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def as_number(s):
    return s["margin"] if isinstance(s, dict) else s


def test_many_clients_get_the_scores_each_request_gets_alone(rm):
    items = pool(24)
    alone = [as_number(r.get("score", r.get("margin"))) for r in (score_rows(rm, [(0, it)])[0] for it in items)]
    rng = random.Random(1)
    good = [rng.sample(range(len(items)), rng.randint(1, 6)) for _ in range(60)]
    bad = [(b'{"items": [', 400), ({"items": [ITEM] * 9}, 413), ({"items": [ITEM, {"prompt": "q"}]}, 422),
           ({"items": [{"prompt": "q", "response": "word " * 600}]}, 422), ({"items": []}, 422), ([ITEM], 422)]
    jobs = [("good", g) for g in good] + [("bad", b) for b in bad] * 2
    rng.shuffle(jobs)
    answers: list = [None] * len(jobs)
    limits = Limits(max_items=8, batch_size=4, max_batch_tokens=400, max_wait_ms=20, queue_size=64)
    with Running(rm, limits) as srv:
        def client(k):
            for j in range(k, len(jobs), 24):
                kind, spec = jobs[j]
                if kind == "good":
                    answers[j] = srv.call("/score", {"items": [items[i] for i in spec]})
                elif isinstance(spec[0], bytes):
                    answers[j] = srv.call("/score", raw=spec[0])
                else:
                    answers[j] = srv.call("/score", spec[0])

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        _, health = srv.call("/health")
        app = srv.server.config.app
    assert not app.state.batcher.alive  # stopping the server stopped its worker
    retried = 0
    for (kind, spec), (status, body) in zip(jobs, answers):
        if kind == "bad":
            assert status == spec[1] and "error" in body, (spec, status, body)
            continue
        if status == 503:  # the queue may fill under this load: a refusal that says so is allowed, nothing else
            assert "retry" in body["error"]
            retried += 1
            continue
        assert status == 200, body
        assert [as_number(s) for s in body["scores"]] == pytest.approx([alone[i] for i in spec], abs=1e-5)
    answered = len(good) - retried
    assert answered > 0 and health["requests_answered"] == answered
    assert health["queue"]["queued"] == 0 and health["queue"]["dropped"] == 0
    assert health["queue"]["passes"] < health["queue"]["scored"]  # sequences of many requests shared passes


def test_a_full_queue_answers_503_with_retry_after_and_recovers(rm):
    g = gated(rm)
    with Running(g, Limits(max_items=4, batch_size=1, max_wait_ms=0, queue_size=4)) as srv, opened(g.gate):
        first: dict = {}
        threading.Thread(target=lambda: first.update(r=srv.call("/score", {"items": [ITEM]})), daemon=True).start()
        wait_for(srv, lambda q: q["scoring"] == 1, "the first request in a pass")
        second: dict = {}
        threading.Thread(target=lambda: second.update(r=srv.call("/score", {"items": [PAIR, ITEM]})),
                         daemon=True).start()
        health = wait_for(srv, lambda q: q["queued"] == 3, "the second request queued")  # a pair is 2 sequences
        assert health["status"] == "ok"  # /health answers while the worker is busy

        status, headers, body = post_with_headers(srv, {"items": [ITEM, ITEM]})
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert "queue is full" in body["error"] and body["queue_size"] == 4 and body["retry_after"] >= 1

        g.gate.set()
        deadline = time.time() + 60
        while "r" not in first or "r" not in second:
            assert time.time() < deadline
            time.sleep(0.02)
        expected = score_rows(rm, [(0, PAIR), (1, ITEM)])
        assert first["r"][0] == 200 and second["r"][0] == 200
        assert second["r"][1]["scores"][0]["margin"] == pytest.approx(expected[0]["margin"], abs=1e-5)
        assert second["r"][1]["scores"][1] == pytest.approx(expected[1]["score"], abs=1e-5)
        assert first["r"][1]["scores"][0] == pytest.approx(expected[1]["score"], abs=1e-5)
        status, body = srv.call("/score", {"items": [ITEM, ITEM]})
        assert status == 200 and len(body["scores"]) == 2
        _, health = srv.call("/health")
        assert health["status"] == "ok" and health["queue"]["queued"] == 0 and health["queue"]["scored"] == 6


def test_a_client_that_leaves_leaves_no_work_behind(rm):
    g = gated(rm)
    with Running(g, Limits(max_items=8, batch_size=1, max_wait_ms=0)) as srv, opened(g.gate):
        first: dict = {}
        threading.Thread(target=lambda: first.update(r=srv.call("/score", {"items": [ITEM]})), daemon=True).start()
        wait_for(srv, lambda q: q["scoring"] == 1, "the first request in a pass")
        body = json.dumps({"items": [ITEM] * 5}).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            wait_for(srv, lambda q: q["queued"] == 5, "the leaving client's request queued")
        wait_for(srv, lambda q: q["queued"] == 0 and q["dropped"] == 5, "the queued sequences dropped")
        g.gate.set()
        deadline = time.time() + 60
        while "r" not in first:
            assert time.time() < deadline
            time.sleep(0.02)
        assert first["r"][0] == 200
        _, health = srv.call("/health")
        assert health["queue"]["scored"] == 1 and health["requests_answered"] == 1


def test_batcher_passes_are_sorted_bounded_and_answer_in_order():
    passes = []

    def score(seqs):
        passes.append([len(s) for s in seqs])
        return [float(sum(s)) for s in seqs]

    b = Batcher(score, batch_size=3, max_batch_tokens=12, max_wait_s=0.0, queue_size=100)
    gate = threading.Event()
    blocker = Batcher(lambda seqs: (gate.wait(30), [0.0] * len(seqs))[1])  # only to hold a job in flight
    rng = random.Random(0)
    reqs = [[[rng.randint(1, 9) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 5))]
            for _ in range(12)]
    with b._cond:  # all of them queued before the worker takes any: one window holds requests from many
        b._start()
        jobs = [b.submit(r) for r in reqs]
    for r, job in zip(reqs, jobs):
        assert job.future.result(timeout=30) == [float(sum(s)) for s in r]
    for p in passes:
        assert len(p) <= 3 and p == sorted(p, reverse=True) and (len(p) == 1 or len(p) * p[0] <= 12)
    assert b.stats()["scored"] == sum(map(len, reqs)) and b.stats()["queued"] == 0

    held = blocker.submit([[1]])
    while blocker.stats()["scoring"] != 1:
        time.sleep(0.01)
    queued = blocker.submit([[1], [2]])
    blocker.cancel(queued)
    assert queued.future.cancelled() and blocker.stats()["dropped"] == 2 and blocker.stats()["queued"] == 0
    pending = blocker.submit([[3]])
    blocker.queue_size = 1
    with pytest.raises(QueueFull):
        blocker.submit([[4]])
    gate.set()
    blocker.stop()
    b.stop()
    assert held.future.result(timeout=30) == [0.0] and not blocker.alive and not b.alive
    assert pending.future.done()  # scored before the stop, or failed by it; never left hanging
    with pytest.raises(Stopped):
        b.submit([[1]])
