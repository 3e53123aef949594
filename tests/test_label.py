"""`align label` through its HTTP API: judgements become preference rows the trainers read (ties and "both bad"
kept but left out of the pairs), bad submissions are refused with a reason and lose nothing, a torn last line is
repaired, a restart resumes, answers are drawn ahead from policies, and the comparison stays blind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, pair_rows, write_jsonl
from servers import RunningLabel

from align.runtime.errors import ConfigError, DataError
from align.serving.label_items import Setup
from align.serving.label_session import LabelSession


def pairs_file(tmp_path, n=6):
    rows = pair_rows([(a, 3) for a in range(2, 2 + n)])
    rows.append({"prompt": "What is 9 + 9?", "chosen": "18", "rejected": "18"})  # identical: not shown
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def judge(srv, item, label, annotator="ana", comment=""):
    return srv.call("/api/judge", {"item": item, "annotator": annotator, "label": label, "comment": comment})


def test_judgements_are_preference_rows_and_ties_are_left_out_of_pairs(tmp_path, tiny_tok):
    from align.data.pairs import load_pair_data

    out = tmp_path / "labels.jsonl"
    with RunningLabel(LabelSession(Setup(pairs=str(pairs_file(tmp_path))), out)) as srv:
        shown = []
        for label in ("a", "b", "tie", "both_bad", "skip"):
            body = srv.wait_for_item("ana")
            assert body["status"] == "item" and set(body["item"]) == {"id", "prompt", "a", "b", "same"}
            shown.append(body["item"])
            status, reply = judge(srv, body["item"]["id"], label, comment="  checked  " if label == "a" else "")
            assert status == 200 and reply["status"] == "recorded", reply
        assert reply["judged"] == 4 and reply["skipped"] == 1 and reply["total"] == 6
        status, health = srv.call("/health")
        assert status == 200 and health["judgements"] == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["a", "b", "tie", "both_bad"]
    first, second = rows[0], rows[1]
    assert first["chosen"] == shown[0]["a"] and first["rejected"] == shown[0]["b"] and first["comment"] == "checked"
    assert second["chosen"] == shown[1]["b"] and second["rejected"] == shown[1]["a"]
    assert {first["written_by"][s] for s in "ab"} == {"chosen", "rejected"} and first["annotator"] == "ana"
    assert "chosen" not in rows[2] and rows[2]["answer_a"] == shown[2]["a"] and rows[2]["time"].endswith("+00:00")
    loaded = load_pair_data(str(out), tiny_tok, 256)
    assert len(loaded.encoded) == 2 and loaded.left_out == 2 and not loaded.rejects
    # one judgement per line: the skip is kept apart, not in the preference file
    assert len(out.with_name("labels.jsonl.skips.jsonl").read_text().splitlines()) == 1


def test_bad_duplicate_and_stale_submissions_are_refused_and_lose_nothing(tmp_path):
    out = tmp_path / "labels.jsonl"
    with RunningLabel(LabelSession(Setup(pairs=str(pairs_file(tmp_path))), out)) as srv:
        item = srv.wait_for_item("ana")["item"]["id"]
        assert judge(srv, item, "a")[0] == 200
        before = out.read_bytes()
        cases = [
            (srv.call("/api/judge", raw=b"{not json"), 400, "malformed JSON"),
            (srv.call("/api/judge", raw=b"[]"), 422, "JSON object"),
            (srv.call("/api/judge", {"item": item}, content_type="text/plain"), 415, "Content-Type"),
            (judge(srv, item, "a"), 409, "already judged"),  # a second tab, or a double click
            (judge(srv, "0123456789abcdef", "a"), 409, "reload the page"),  # a page from another session
            (judge(srv, item, "maybe", annotator="bo"), 422, "'label'"),
            (judge(srv, item, "a", annotator="<b>x</b>"), 422, "'annotator'"),
            (judge(srv, item, "a", annotator="bo", comment="x" * 2001), 413, "comment"),
            (srv.call("/api/judge", raw=b"{" + b" " * 70000 + b"}"), 413, "limit"),
            (srv.call("/api/next?annotator="), 422, "annotator"),
        ]
        for (status, body), want, words in cases:
            assert status == want and words in body["error"], (status, body)
        assert out.read_bytes() == before
        assert judge(srv, item, "b", annotator="bo")[0] == 200  # another person may judge the same item


def test_a_torn_last_line_is_set_aside_and_a_restart_resumes(tmp_path):
    out = tmp_path / "labels.jsonl"
    setup = Setup(pairs=str(pairs_file(tmp_path)))
    with RunningLabel(LabelSession(setup, out)) as srv:
        first = srv.wait_for_item("ana")["item"]["id"]
        judge(srv, first, "a")
        second = srv.wait_for_item("ana")["item"]["id"]
        judge(srv, second, "skip")
    with open(out, "ab") as f:
        f.write(b'{"prompt": "half a li')  # what a full disk could leave
    session = LabelSession(setup, out)
    assert out.read_bytes().endswith(b"\n")
    assert (tmp_path / "labels.jsonl.torn").read_bytes() == b'{"prompt": "half a li\n'
    with RunningLabel(session) as srv:
        body = srv.wait_for_item("ana")
        assert body["item"]["id"] not in (first, second) and body["judged"] == 1 and body["skipped"] == 1
        assert srv.wait_for_item("cy")["item"]["id"] == first  # another person starts at the beginning
    other = Setup(pairs=str(write_jsonl(tmp_path / "other.jsonl", pair_rows([(5, 5), (6, 6)]))))
    with pytest.raises(DataError, match="another label setup"):
        LabelSession(other, out)


def test_a_killed_writer_never_leaves_half_a_line(tmp_path):
    out = tmp_path / "log.jsonl"
    code = ("import sys; from pathlib import Path; from align.serving.label_store import AppendLog\n"
            "log = AppendLog(Path(sys.argv[1])); i = 0\n"
            "while True:\n    log.append({'i': i, 'text': 'x' * (i % 5000)}); i += 1\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT)
    deadline = time.time() + 60
    while (not out.exists() or out.stat().st_size < 200_000) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = out.read_bytes()
    assert data.endswith(b"\n")
    numbers = [json.loads(line)["i"] for line in data.splitlines()]
    assert numbers == list(range(len(numbers))) and len(numbers) > 10


def test_setups_that_cannot_work_are_refused():
    for setup, words in [(Setup(), "name what to label"), (Setup(pairs="p", policy="x"), "name what to label"),
                         (Setup(policy="x"), "--prompts"), (Setup(policy="x", prompts="p", temperature=0), "greedy"),
                         (Setup(pairs="p", limit=0), ">= 1")]:
        with pytest.raises(ConfigError, match=words):
            setup.check()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("label-prompts")
    return write_jsonl(d / "prompts.jsonl", [{"prompt": f"What is {a} + 4?", "answer": a + 4} for a in range(2, 8)])


def policy_loader(specs):
    from align.serving.policies import load_policies

    return load_policies([("--policy", s) for s in specs], "cpu")


def test_two_policies_are_compared_blind_with_answers_drawn_ahead(tmp_path, sft_run, prompts_file):
    out = tmp_path / "human.jsonl"
    other = sft_run.parent.parent.parent / "other-policy"
    if not other.exists():
        import shutil

        shutil.copytree(sft_run, other)  # the same weights under another name: answers equal, sides tracked
    setup = Setup(policy=str(sft_run), against=str(other), prompts=str(prompts_file), temperature=1.0,
                  max_new_tokens=8)
    session = LabelSession(setup, out, policy_loader, ahead=2)
    with RunningLabel(session) as srv:
        status, first = srv.call("/api/next?annotator=ana")
        assert status == 200 and first["status"] in ("waiting", "item")
        for _ in range(4):
            body = srv.wait_for_item("ana")
            assert body["status"] == "item" and str(sft_run) not in json.dumps(body)  # blind: no writer shown
            assert judge(srv, body["item"]["id"], "a")[0] == 200
        deadline = time.time() + 120
        while srv.call("/health")[1]["made"] < 6 and time.time() < deadline:
            time.sleep(0.2)
    assert session.first_item_s is not None
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["candidate"] == str(sft_run) and r["baseline"] == str(other) for r in rows)
    assert all(r["chosen"] == r["answer_a"] and isinstance(r["gold"], int) for r in rows)
    items = [json.loads(line) for line in out.with_name("human.jsonl.items.jsonl").read_text().splitlines()]
    assert len(items) == 6 and len({i["id"] for i in items}) == 6
    assert all(set(i["written_by"].values()) == {str(sft_run), str(other)} for i in items)


def test_the_order_of_a_and_b_is_drawn_per_item_and_fixed():
    from align.serving.label_items import arrange

    orders = [arrange(f"item-{i}", ("x", "first"), ("y", "second"))["written_by"]["a"] for i in range(200)]
    assert 70 < orders.count("first") < 130  # about half each way (binomial 200, 1/2: outside is p < 1e-4)
    assert arrange("item-7", ("x", "first"), ("y", "second")) == arrange("item-7", ("x", "first"), ("y", "second"))


def test_one_policy_sampled_twice_collects_preferences(tmp_path, sft_run, prompts_file):
    out = tmp_path / "collect.jsonl"
    setup = Setup(policy=str(sft_run), prompts=str(prompts_file), limit=3, max_new_tokens=8)
    with RunningLabel(LabelSession(setup, out, policy_loader)) as srv:
        body = srv.wait_for_item("ana")
        assert body["item"]["a"] != body["item"]["b"]
        assert judge(srv, body["item"]["id"], "b")[0] == 200
    row = json.loads(out.read_text())
    assert row["written_by"] == {"a": f"{sft_run} (sample 1)", "b": f"{sft_run} (sample 2)"} or \
        row["written_by"] == {"a": f"{sft_run} (sample 2)", "b": f"{sft_run} (sample 1)"}
    assert row["chosen"] == body["item"]["b"] and "candidate" not in row


def test_the_page_needs_the_key_when_one_is_set(tmp_path):
    from align.serving.label_app import make_server

    with pytest.raises(ConfigError, match="API key"):
        make_server(LabelSession(Setup(pairs=str(pairs_file(tmp_path))), tmp_path / "x.jsonl"), "0.0.0.0")
    session = LabelSession(Setup(pairs=str(pairs_file(tmp_path))), tmp_path / "k.jsonl")
    with RunningLabel(session, api_key="s3cret") as srv:
        assert srv.call("/api/next?annotator=ana")[0] == 401
        assert srv.call("/api/next?annotator=ana", headers={"X-API-Key": "s3cret"})[0] == 200
        import urllib.request

        with urllib.request.urlopen(srv.url + "/") as resp:  # the page itself holds no data
            assert resp.status == 200 and "script-src 'self'" in resp.headers["Content-Security-Policy"]


def test_label_command_refuses_a_bad_setup_before_loading_anything(tmp_path):
    from conftest import run_align

    ran = run_align("label", "--policy", tmp_path, "--out", tmp_path / "o.jsonl")
    assert ran.returncode == 2 and "--prompts" in ran.stderr and "Traceback" not in ran.stderr
    ran = run_align("label", "--help")
    assert ran.returncode == 0 and "--against" in ran.stdout and "Cohen" in ran.stdout


def test_a_port_in_use_is_named_before_anything_loads(tmp_path):
    import socket

    from conftest import run_align

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        ran = run_align("label", "--pairs", pairs_file(tmp_path), "--out", tmp_path / "o.jsonl", "--port", port)
    assert ran.returncode == 2 and f"127.0.0.1:{port}" in ran.stderr and "--port" in ran.stderr
    assert not (tmp_path / "o.jsonl").exists()
