"""`align chat`: through a pipe (plain and JSON lines), through a real terminal (a pty), and its pieces: the
answer streamed equals the answer returned, the oldest turns are dropped when the context is full, and every kind
of policy directory loads."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_align


@pytest.fixture(scope="module")
def speaker(sft_run):
    from align.serving.chat import Speaker
    from align.serving.policies import load_any_policy

    model, tok = load_any_policy(sft_run, "cpu")
    return Speaker(str(sft_run), model, tok)


def test_streamed_pieces_make_the_returned_answer(speaker):
    from align.modeling.generate import Sampling
    from align.serving.chat import reply

    pieces: list[str] = []
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    answer = reply(speaker, messages, Sampling(temperature=1.0), 24, pieces.append, seed=3)
    assert len(pieces) > 1  # shown as it came, not at the end
    assert "".join(pieces).strip() == answer
    # the same seed draws the same answer; greedy equals the evaluation's greedy answer
    assert reply(speaker, messages, Sampling(temperature=1.0), 24, seed=3) == answer
    from align.modeling.generate import answer as greedy_answer

    assert reply(speaker, messages, Sampling(), 24) == greedy_answer(speaker.model, speaker.tokenizer, messages, 24)


def test_oldest_turns_are_dropped_when_the_context_is_full(speaker, monkeypatch):
    from align.serving.chat import fit_context

    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "ok " * 5}]
    messages = [system] + turns + [{"role": "user", "content": "last question"}]
    full, dropped = fit_context(speaker, messages, 8)
    assert dropped == 0
    monkeypatch.setattr(type(speaker), "context", property(lambda s: len(full) - 20))
    ids, dropped = fit_context(speaker, messages, 8)
    assert dropped >= 2 and dropped % 2 == 0 and len(ids) + 8 <= len(full) - 20
    text = speaker.tokenizer.decode(ids)
    assert "Be brief." in text and "last question" in text and "question 0" not in text


def test_piped_plain_and_json(sft_run, tmp_path):
    ran = run_align("chat", "--model", sft_run, "--temperature", "0", "--max-new-tokens", "12",
                    stdin="What is 2 + 3?\n\nWhat is 4 + 5?\n")
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    rows = ['{"prompt": "What is 2 + 3?", "id": 7}', "not json",
            json.dumps({"messages": [{"role": "system", "content": "Short."}, {"role": "user", "content": "Hi"}]}),
            '{"prompt": ""}']
    ran = run_align("chat", "--model", sft_run, "--compare", sft_run, "--temperature", "0", "--max-new-tokens", "12",
                    "--json", stdin="\n".join(rows) + "\n")
    assert ran.returncode == 1
    out = [json.loads(line) for line in ran.stdout.splitlines()]
    assert len(out) == 4
    assert out[0]["id"] == 7 and out[0]["answer"] == out[0]["compare"] == lines[0].replace("\\n", "\n")
    assert out[1] == {"line": 2, "error": out[1]["error"]} and "not JSON" in out[1]["error"]
    assert "answer" in out[2] and "error" in out[3]
    assert "line 2" in ran.stderr and "2 input lines failed" in ran.stderr and "Traceback" not in ran.stderr


def test_escaped_one_line_answers_round_trip():
    from align.serving.chat import one_line

    text = "a\nb \\n c"
    line = one_line(text)
    assert "\n" not in line
    assert line.replace("\\\\", "\0").replace("\\n", "\n").replace("\0", "\\") == text


def test_every_kind_of_policy_directory_loads_or_says_why(sft_run, tmp_path):
    from align.runtime.errors import ModelError
    from align.serving.policies import load_any_policy

    run_dir = sft_run.parent  # runs/<run>/ holding one policy stage
    model, _ = load_any_policy(run_dir, "cpu")
    assert model.peft_config  # the SFT adapter, found inside
    merged = tmp_path / "merged"
    ran = run_align("merge", "--adapter", sft_run, "--out", merged)
    assert ran.returncode == 0, ran.stderr
    model, tok = load_any_policy(merged, "cpu")
    assert not hasattr(model, "peft_config") and tok.chat_template
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no finished policy stage"):
        load_any_policy(tmp_path / "empty")
    with pytest.raises(ModelError, match="no such directory"):
        load_any_policy(tmp_path / "missing")
    ran = run_align("chat", "--model", tmp_path / "empty", stdin="hi\n")
    assert ran.returncode == 2 and "which policy?" in ran.stderr and "Traceback" not in ran.stderr


def _read_until(fd: int, wanted: str, seconds: float = 120) -> str:
    seen = b""
    deadline = time.monotonic() + seconds
    while wanted.encode() not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"{wanted!r} never appeared; the terminal showed:\n{seen.decode(errors='replace')}")
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
    return seen.decode(errors="replace")


def test_in_a_real_terminal(sft_run):
    """The console entry in a pty: the greeting, an answer, /reset, an unknown command, /exit."""
    main, child = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm"}
    argv = ["chat", "--model", str(sft_run), "--temperature", "1", "--seed", "1", "--max-new-tokens", "8"]
    proc = subprocess.Popen([sys.executable, "-m", "align", "-q", *argv], stdin=child, stdout=child, stderr=child,
                            cwd=ROOT, env=env, close_fds=True)
    os.close(child)
    try:
        screen = _read_until(main, "you> ")
        assert "chatting with" in screen and "/reset" in screen
        os.write(main, b"What is 2 + 3?\r")
        screen = _read_until(main, "you> ")
        answer = screen.split("What is 2 + 3?", 1)[1].rsplit("you> ", 1)[0].strip()
        assert answer and "empty answer" not in answer, repr(screen)  # an answer was shown before the next prompt
        os.write(main, b"/nonsense\r")
        assert "unknown command /nonsense" in _read_until(main, "you> ")
        os.write(main, b"/reset\r")
        assert "(conversation reset)" in _read_until(main, "you> ")
        os.write(main, b"/exit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)


def test_interactive_keeps_each_models_side(speaker):
    """With two speakers, each answer is labelled and each model's history holds its own answers."""
    from align.modeling.generate import Sampling
    from align.serving.chat import Speaker, interactive

    other = Speaker("other", speaker.model, speaker.tokenizer)
    inputs = iter(["What is 2 + 3?", "And 4 + 5?", "/reset", "/exit"])
    out = io.StringIO()
    histories = []

    def read(prompt: str) -> str:
        line = next(inputs)
        if line == "/reset":
            histories.append([list(s.history) for s in (speaker, other)])
        return line

    assert interactive([speaker, other], Sampling(), 8, "Be brief.", read, out) == 0
    first, second = histories[0]
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert first[0]["content"] == "Be brief." and first == second  # same greedy model, same turns
    assert out.getvalue().count(f"[{speaker.name}]") == 2 and out.getvalue().count("[other]") == 2
    assert "(conversation reset)" in out.getvalue()
    assert speaker.history == [{"role": "system", "content": "Be brief."}]
    assert torch.is_grad_enabled()  # generation's no_grad did not leak


def test_two_adapters_on_one_base_share_it_and_each_answers_as_itself(sft_run, tmp_path):
    """--compare (and align label's comparison) of two adapters on the same base loads the base once; each policy
    still gives exactly the logits it gives when loaded alone."""
    import shutil

    from safetensors.torch import load_file, save_file

    from align.serving.policies import load_any_policy, load_policies

    other = tmp_path / "other"
    shutil.copytree(sft_run, other)
    weights = load_file(str(other / "adapter_model.safetensors"))
    save_file({k: v * 3 + 0.01 if "lora_B" in k else v for k, v in weights.items()},
              str(other / "adapter_model.safetensors"))
    first, second = load_policies([("--model", str(sft_run)), ("--compare", str(other))], "cpu")
    assert first.model is second.model and {first.adapter, second.adapter} == {"policy_0", "policy_1"}
    ids = torch.tensor([first.tokenizer("What is 2 + 3?").input_ids])
    for policy, path in ((first, sft_run), (second, other)):
        policy.activate()
        with torch.no_grad():
            shared = policy.model(input_ids=ids).logits
            alone = load_any_policy(path, "cpu")[0](input_ids=ids).logits
        assert torch.allclose(shared, alone, atol=1e-5)
    first.activate()
    with torch.no_grad():
        assert not torch.allclose(first.model(input_ids=ids).logits, shared, atol=1e-3)  # the adapters differ
