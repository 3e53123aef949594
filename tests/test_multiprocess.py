"""Scale-out: stages under `accelerate launch` with two CPU processes (gloo), as a user launches them.

Two processes with batch b see, at each optimizer step, the same examples as one process with batch b and two
accumulation steps (accelerate hands rank r the batches r, r+2, ... of the same shuffled order), and DDP averages
their gradients, so the adapters must match the one-process run's within float rounding, and both ranks must
hold the same weights (each run records the largest difference in metrics.json).

One launch runs every multi-process job compared here (tests/run_commands.py runs them one after another in the
same two processes), since each launch costs the start-up of two Pythons with torch; the kill test launches twice
more, because it kills a launch.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
    machine without GPUs the processes form a gloo group on CPUs)."""
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


def sft_rows(tmp) -> Path:
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows([(a, 3) for a in range(2, 14)])]
    return write_jsonl(tmp / "sft.jsonl", rows)


def killable_sft_args(tmp, run: str, tiny, train) -> list[str]:
    """The SFT run the kill test cuts: long enough to be killed midway, dropout on (random state must resume)."""
    return [*stage_args("sft", tmp, run, tiny, train, "", 2, 1, "samples=0"), "training.max_steps=24",
            "training.save_steps=4", "lora.dropout=0.1"]


def split_jobs(stdout: str) -> dict[str, str]:
    """The launch's output, job by job (tests/run_commands.py prints `=== NAME` from the main process)."""
    parts = stdout.split("=== ")
    return {part.split("\n", 1)[0]: part for part in parts[1:]}


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir, reward_data_files, sft_run, tiny_reward_run):
    """One `accelerate launch` of two processes runs every multi-process job below (each of SFT, DPO and the reward
    model in two processes with batch 2; the PPO recipe; the uninterrupted run of the kill test), one after another
    in the same processes; then the one-process runs to compare with (batch 2 × 2 accumulation steps) run here, on
    one thread as the launched processes do."""
    tmp = tmp_path_factory.mktemp("launched")
    train, evals = reward_data_files
    sft_train = sft_rows(tmp)
    prompts = write_jsonl(tmp / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pair_rows(
        [(a, 5) for a in range(2, 10)])])
    extra = {"sft": (sft_train, "", "samples=0"),
             "dpo": (train, evals, f"init_from_sft={sft_run}", "beta=0.5", "eval_prompts="),
             "reward": (train, evals)}
    jobs = [{"name": stage, "argv": stage_args(stage, tmp, "two", tiny_model_dir, data, ev, 2, 1, *more)}
            for stage, (data, ev, *more) in extra.items()]
    jobs.append({"name": "ppo-recipe", "script": str(ROOT / "recipes" / "ppo.py"), "argv": [
        f"model.name_or_path={tiny_model_dir}", f"data.train={prompts}", f"init_from_sft={sft_run}",
        f"reward_model={tiny_reward_run}", "training.max_steps=2", "rollout.batch_size=2", "rollout.max_new_tokens=4",
        "training.batch_size=2", "training.save_steps=1", "eval_prompts=", "training.logging_steps=1"]})
    jobs.append({"name": "grpo-recipe", "script": str(ROOT / "recipes" / "grpo.py"), "argv": [
        f"model.name_or_path={tiny_model_dir}", f"data.train={prompts}", f"init_from_sft={sft_run}",
        "rewards=[format]", "training.max_steps=2", "rollout.batch_size=2", "rollout.max_new_tokens=4",
        "grpo.num_generations=2", "training.batch_size=2", "training.save_steps=1", "eval_prompts="]})
    jobs.append({"name": "sft-whole", "argv": killable_sft_args(tmp, "whole", tiny_model_dir, sft_train)})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(launcher(2, [str(ROOT / "tests" / "run_commands.py"), str(tmp / "jobs.json")]), cwd=tmp,
                          env={**ENV, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    from align.cli.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stage, (data, ev, *more) in extra.items():
            assert main(stage_args(stage, tmp, "one", tiny_model_dir, data, ev, 2, 2, *more)) == 0
    finally:
        torch.set_num_threads(threads)
    return {"tmp": tmp, "stdout": proc.stdout, "jobs": split_jobs(proc.stdout), "sft_train": sft_train}


def check_pair(launched, stage: str, atol: float = 2e-5) -> tuple[dict, dict]:
    """`stage` in two processes (batch 2) against one (batch 2 × 2 accumulation steps)."""
    tmp = launched["tmp"]
    assert launched["jobs"][stage].count(f"{stage} finished") == 1  # one summary, from the main process
    m2 = json.loads((tmp / "runs" / "two" / stage / "metrics.json").read_text())
    m1 = json.loads((tmp / "runs" / "one" / stage / "metrics.json").read_text())
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert m2["rank_weight_spread"] <= 1e-7  # both ranks ended with the same weights
    assert not (tmp / "runs" / "two" / f"{stage}.work").exists()
    assert_same_adapter(adapter(tmp / "runs" / "two" / stage), adapter(tmp / "runs" / "one" / stage), atol)
    return m2, m1


def test_one_launch_ran_every_job_and_only_the_main_process_summarised(launched):
    assert list(launched["jobs"]) == ["sft", "dpo", "reward", "ppo-recipe", "grpo-recipe", "sft-whole"]
    # each finished stage printed its summary once in all: the other process printed none anywhere
    assert launched["stdout"].count("sft finished") == 2 and launched["stdout"].count("dpo finished") == 1
    assert launched["stdout"].count("reward finished") == 1 and launched["stdout"].count("ppo finished") == 1
    assert launched["stdout"].count("grpo finished") == 1


def test_sft_two_processes_match_one(launched):
    m2, m1 = check_pair(launched, "sft")
    assert m2["steps"] == m1["steps"] == 3
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-4)


def test_dpo_two_processes_match_one(launched):
    tmp_path = launched["tmp"]
    m2, m1 = check_pair(launched, "dpo")
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


def test_reward_two_processes_match_one(launched):
    m2, m1 = check_pair(launched, "reward")
    assert m2["eval_accuracy"] == pytest.approx(m1["eval_accuracy"], abs=1e-6)


def test_ppo_recipe_under_accelerate_launch(launched):
    """PPO's own loop: each process answers its share of the prompts, gradients are averaged by hand, the KL
    controller and reward statistics see every process's numbers."""
    tmp_path = launched["tmp"]
    assert launched["jobs"]["ppo-recipe"].count("ppo finished") == 1
    out = tmp_path / "runs" / "demo" / "ppo"  # the recipe's own run name, under the launch's directory
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["rank_weight_spread"] <= 1e-7
    assert [h["step"] for h in metrics["log_history"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["reward_mean"])) for h in metrics["log_history"])
    assert set(load_file(out / "adapter_model.safetensors")) and (out / "value" / "value_head.safetensors").is_file()
    assert not (tmp_path / "runs" / "demo" / "ppo.work").exists()


def test_grpo_recipe_under_accelerate_launch(launched):
    """GRPO's loop in two processes: each answers its share of the prompts (whole groups), gradients averaged by
    hand, both end with the same weights."""
    tmp_path = launched["tmp"]
    assert launched["jobs"]["grpo-recipe"].count("grpo finished") == 1
    out = tmp_path / "runs" / "demo" / "grpo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["rank_weight_spread"] <= 1e-7
    assert [h["step"] for h in metrics["log_history"]] == [1, 2]
    assert all(h["trained_answers"] == 4 for h in metrics["log_history"])  # uniform groups kept: same step counts
    assert not (tmp_path / "runs" / "demo" / "grpo.work").exists()


def test_two_process_run_killed_midway_resumes_to_the_same_adapter(launched, tiny_model_dir):
    """SIGKILL to the whole launcher once a checkpoint is complete, then the same command: each process picks up
    its own random state (dropout is on) and the run ends where an uninterrupted one (in the shared launch) does."""
    import signal
    import time

    from align.runtime.checkpoint import checkpoints

    tmp_path, train = launched["tmp"], launched["sft_train"]
    assert json.loads((tmp_path / "runs" / "whole" / "sft" / "metrics.json").read_text())["steps"] == 24
    proc = subprocess.Popen(launcher(2, ["-m", "align.cli", *killable_sft_args(tmp_path, "cut", tiny_model_dir,
                                                                                train)]),
                            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
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
    launch(2, killable_sft_args(tmp_path, "cut", tiny_model_dir, train), tmp_path)
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
