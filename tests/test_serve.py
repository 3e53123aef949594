"""`align serve-rm` through a real HTTP client on loopback: scores, limits, errors and the API key."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import run_align
from servers import ServerThread

from align.runtime.errors import ConfigError
from align.serving.score import load_reward_model, score_rows
from align.serving.serve import Limits, check_bind, make_server

ITEM = {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is 5."}
PAIR = {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "Maybe 9? Not sure."}


@pytest.fixture(scope="module")
def rm(tiny_reward_run):
    return load_reward_model(tiny_reward_run, "cpu")


class Running(ServerThread):
    def __init__(self, rm, limits=None, api_key=None):
        super().__init__(make_server(rm, "127.0.0.1", 0, limits, api_key, log_level="warning"))


def test_scores_equal_the_cli_and_errors_are_json(rm):
    expected = score_rows(rm, [(0, ITEM), (1, PAIR)])
    with Running(rm, Limits(max_items=4)) as srv:
        status, health = srv.call("/health")
        assert status == 200 and health["status"] == "ok" and health["max_items"] == 4
        status, body = srv.call("/score", {"items": [ITEM, PAIR]})
        assert status == 200
        assert body["scores"][0] == pytest.approx(expected[0]["score"], abs=1e-6)
        assert body["scores"][1]["margin"] == pytest.approx(expected[1]["margin"], abs=1e-6)

        status, body = srv.call("/score", raw=b'{"items": [')
        assert status == 400 and body["error"].startswith("malformed JSON")
        status, body = srv.call("/score", {"items": [ITEM] * 5})
        assert status == 413 and "limit is 4" in body["error"]
        status, body = srv.call("/score", {"items": [ITEM, {"prompt": "q"}]})
        assert status == 422 and body["error"].startswith("item 1:") and body["items"][0]["item"] == 1
        status, body = srv.call("/score", {"items": [{"prompt": "q", "response": "word " * 600}]})
        assert status == 422 and "over the max length 512" in body["error"]
        status, body = srv.call("/score", [ITEM])
        assert status == 422 and '{"items": [...]}' in body["error"]
        status, body = srv.call("/score", {"items": []})
        assert status == 422 and "empty" in body["error"]


def test_body_over_the_default_2mb_limit_is_413(rm):
    assert Limits().max_body_bytes == 2 * 1024 * 1024
    with Running(rm) as srv:
        big = json.dumps({"items": [{"prompt": "q", "response": "x" * (2 * 1024 * 1024)}]}).encode()
        status, body = srv.call("/score", raw=big)
        assert status == 413 and "limit" in body["error"]


def test_api_key_is_required_when_set(rm):
    with Running(rm, api_key="s3cret") as srv:
        assert srv.call("/score", {"items": [ITEM]})[0] == 401
        assert srv.call("/health")[0] == 401
        assert srv.call("/score", {"items": [ITEM]}, {"Authorization": "Bearer wrong"})[0] == 401
        assert srv.call("/score", {"items": [ITEM]}, {"Authorization": "Bearer s3cret"})[0] == 200
        assert srv.call("/health", headers={"X-API-Key": "s3cret"})[0] == 200


def test_non_loopback_host_needs_an_api_key():
    with pytest.raises(ConfigError, match="without an API key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "key")
    check_bind("::1", None)
    check_bind("localhost", None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_and_refuses_an_open_host(tiny_reward_run, monkeypatch):
    monkeypatch.delenv("ALIGN_API_KEY", raising=False)
    refused = run_align("serve-rm", "--model", tiny_reward_run, "--host", "0.0.0.0")  # refused before it loads
    assert refused.returncode == 2 and "ALIGN_API_KEY" in refused.stderr

    # a real process listening on a real port: also the one test of `python -m align.cli` as an entry point
    env = {k: v for k, v in os.environ.items() if k != "ALIGN_API_KEY"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "serve-rm", "--model", str(tiny_reward_run),
                             "--port", str(port), "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    health = json.loads(resp.read())
                    assert health["status"] == "ok"
                    assert health["queue"]["queue_size"] == 64  # on a CPU: a short queue, quick 503s
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=json.dumps({"items": [ITEM]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert isinstance(json.loads(resp.read())["scores"][0], float)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
