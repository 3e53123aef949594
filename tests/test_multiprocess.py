"""Scale-out: stages under `accelerate launch` with two CPU processes (gloo), as a user launches them.

Two processes with batch b see, at each optimizer step, the same examples as one process with batch b and two
accumulation steps (accelerate hands rank r the batches r, r+2, ... of the same shuffled order), and DDP averages
their gradients, so the adapters must match the one-process run's within float rounding, and both ranks must
hold the same weights (each run records the largest difference in metrics.json).
"""

import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, pair_rows, write_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launcher(processes: int, target: list[str]) -> list[str]:
    """The command a user types: `accelerate launch --config_file recipes/accelerate/ddp.yaml ... TARGET` (on a
    machine without GPUs the processes form a gloo group on CPUs); one process is a plain `python TARGET`."""
    if processes == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "recipes" / "accelerate" / "ddp.yaml"), "--num_processes", str(processes),
            "--main_process_port", str(free_port()), *target]


def launch(processes: int, args: list[str], cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(launcher(processes, ["-m", "align.cli", *args]), cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"adapters differ by up to {worst}"


def stage_args(stage: str, tmp, run: str, tiny, train, evals, batch: int, accum: int, *extra: str) -> list[str]:
    return [stage, f"model.name_or_path={tiny}", f"runs_dir={tmp / 'runs'}", f"run={run}", f"data.train={train}",
            f"data.eval={evals}", f"training.batch_size={batch}", f"training.grad_accum={accum}",
            "training.max_steps=3", "training.learning_rate=5e-3", "training.warmup_ratio=0",
            "training.logging_steps=1",
            "lora.r=4", "lora.alpha=8", "lora.dropout=0", *extra]


def check_pair(tmp, stage: str, tiny, train, evals, *extra: str, atol: float = 2e-5) -> tuple[dict, dict]:
    """Run `stage` in two processes (batch 2) and in one (batch 2 × 2 accumulation steps); compare."""
    two = launch(2, stage_args(stage, tmp, "two", tiny, train, evals, 2, 1, *extra), tmp)
    launch(1, stage_args(stage, tmp, "one", tiny, train, evals, 2, 2, *extra), tmp)
    assert two.stdout.count(f"{stage} finished") == 1  # one summary, from the main process
    m2 = json.loads((tmp / "runs" / "two" / stage / "metrics.json").read_text())
    m1 = json.loads((tmp / "runs" / "one" / stage / "metrics.json").read_text())
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert m2["rank_weight_spread"] <= 1e-7  # both ranks ended with the same weights
    assert not (tmp / "runs" / "two" / f"{stage}.work").exists()
    assert_same_adapter(adapter(tmp / "runs" / "two" / stage), adapter(tmp / "runs" / "one" / stage), atol)
    return m2, m1


def test_sft_two_processes_match_one(tmp_path, tiny_model_dir):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows([(a, 3) for a in range(2, 14)])]
    train = write_jsonl(tmp_path / "sft.jsonl", rows)
    m2, m1 = check_pair(tmp_path, "sft", tiny_model_dir, train, "", "samples=0")
    assert m2["steps"] == m1["steps"] == 3
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-4)


def test_dpo_two_processes_match_one(tmp_path, tiny_model_dir, reward_data_files, sft_run):
    train, evals = reward_data_files
    m2, m1 = check_pair(tmp_path, "dpo", tiny_model_dir, train, evals, f"init_from_sft={sft_run}", "beta=0.5",
                        "eval_prompts=")
    # the same held-out pairs, evaluated by both processes together, give the same preference accuracy
    assert m2["eval_accuracy"] == pytest.approx(m1["eval_accuracy"], abs=1e-6)
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], rel=1e-4)
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-4)
    # the reference pass was shared out over both processes and gathered back in the data's order
    caches = sorted((tmp_path / "runs" / "two" / "cache").glob("reference-logps-*.safetensors"))
    assert len(caches) == 2  # training and held-out pairs
    for cache in caches:
        two = load_file(str(cache))["logps"]
        one = load_file(str(tmp_path / "runs" / "one" / "cache" / cache.name))["logps"]
        assert two.shape == one.shape and torch.allclose(two, one, atol=1e-5)


def test_reward_two_processes_match_one(tmp_path, tiny_model_dir, reward_data_files):
    train, evals = reward_data_files
    m2, m1 = check_pair(tmp_path, "reward", tiny_model_dir, train, evals)
    assert m2["eval_accuracy"] == pytest.approx(m1["eval_accuracy"], abs=1e-6)


def test_ppo_recipe_under_accelerate_launch(tmp_path, tiny_model_dir, sft_run, tiny_reward_run):
    """PPO's own loop: each process answers its share of the prompts, gradients are averaged by hand, the KL
    controller and reward statistics see every process's numbers."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pair_rows(
        [(a, 5) for a in range(2, 10)])])
    proc = subprocess.run(launcher(2, [
        str(ROOT / "recipes" / "ppo.py"), f"model.name_or_path={tiny_model_dir}", f"data.train={prompts}",
        f"init_from_sft={sft_run}",
        f"reward_model={tiny_reward_run}", "training.max_steps=2", "rollout.batch_size=2", "rollout.max_new_tokens=4",
        "training.batch_size=2", "training.save_steps=1", "eval_prompts=", "training.logging_steps=1"]),
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("ppo finished") == 1
    out = tmp_path / "runs" / "demo" / "ppo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["rank_weight_spread"] <= 1e-7
    assert [h["step"] for h in metrics["log_history"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["reward_mean"])) for h in metrics["log_history"])
    assert set(load_file(out / "adapter_model.safetensors")) and (out / "value" / "value_head.safetensors").is_file()
    assert not (tmp_path / "runs" / "demo" / "ppo.work").exists()


def test_two_process_run_killed_midway_resumes_to_the_same_adapter(tmp_path, tiny_model_dir):
    """SIGKILL to the whole launcher once a checkpoint is complete, then the same command: each process picks up
    its own random state (dropout is on) and the run ends where an uninterrupted one does."""
    import signal
    import time

    from align.runtime.checkpoint import checkpoints

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows([(a, 3) for a in range(2, 14)])]
    train = write_jsonl(tmp_path / "sft.jsonl", rows)

    def args(run: str) -> list[str]:
        return [*stage_args("sft", tmp_path, run, tiny_model_dir, train, "", 2, 1, "samples=0"),
                "training.max_steps=24", "training.save_steps=4", "lora.dropout=0.1"]

    launch(2, args("whole"), tmp_path)
    proc = subprocess.Popen(launcher(2, ["-m", "align.cli", *args("cut")]), cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = tmp_path / "runs" / "cut" / "sft.work"
    deadline = time.monotonic() + 300
    while not (work.is_dir() and any(c.name == "checkpoint-8" for c in checkpoints(work))):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before checkpoint-8"
        time.sleep(0.05)
    import psutil

    parent = psutil.Process(proc.pid)
    everyone = [*parent.children(recursive=True), parent]  # workers run in process groups of their own
    for p in everyone:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(everyone, timeout=30)
    assert not (tmp_path / "runs" / "cut" / "sft").exists()  # killed before it finished
    launch(2, args("cut"), tmp_path)
    m = json.loads((tmp_path / "runs" / "cut" / "sft" / "metrics.json").read_text())
    assert m["resumed_from"] and m["rank_weight_spread"] == 0
    assert_same_adapter(adapter(tmp_path / "runs" / "cut" / "sft"), adapter(tmp_path / "runs" / "whole" / "sft"),
                        atol=1e-6)


def test_what_does_not_scale_out_says_so(tmp_path, monkeypatch, capsys):
    """`align run` drives one process, and PPO cannot run sharded: both refuse with a message, before any work."""
    from align.cli.main import main
    from align.runtime.config import PPOConfig, load_config
    from align.runtime.errors import ConfigError
    from align.stages import ppo

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "name=x", f"runs_dir={tmp_path}"]) == 2
    assert "`align run` drives the whole loop from one process" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="launch it with recipes/accelerate/ddp.yaml"):
        ppo.setup(load_config(PPOConfig, None, [f"runs_dir={tmp_path}"]))
