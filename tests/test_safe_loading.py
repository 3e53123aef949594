"""Only safetensors are loaded: a crafted pickle posing as an adapter is refused before anything unpickles it."""

import json
import pickle
import shutil
from pathlib import Path

import pytest

from align.cli.main import main
from align.runtime.config import ModelConfig


class Payload:
    """Unpickling this runs `open(marker, "w")`: proof of code execution if the marker file ever appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def poisoned_copy(src: Path, dst: Path, marker: Path) -> Path:
    """A real stage output with its safetensors weights swapped for a pickle carrying the payload."""
    shutil.copytree(src, dst)
    (dst / "adapter_model.safetensors").unlink()
    with open(dst / "adapter_model.bin", "wb") as f:
        pickle.dump({"weights": Payload(marker)}, f)
    return dst


def test_a_pickle_payload_check_runs_when_unpickled(tmp_path):
    # the payload is real: unpickling it does create the marker (so its absence below means something)
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("argv", [
    lambda d: ["eval", "--policy", str(d), "--limit", "1"],
    lambda d: ["merge", "--adapter", str(d), "--out", str(d.parent / "merged")],
    lambda d: ["pairs", "--policy", str(d), "--prompts", "reward_data/prefs/prompts.jsonl", "--out",
               str(d.parent / "p.jsonl"), "--limit", "1"],
])
def test_commands_refuse_a_pickled_policy_without_unpickling_it(tmp_path, sft_run, capsys, argv):
    marker = tmp_path / "payload-ran"
    bad = poisoned_copy(sft_run, tmp_path / "run" / "sft", marker)
    assert main(argv(bad)) == 2
    err = capsys.readouterr().err
    assert "no adapter_model.safetensors (it has adapter_model.bin: pickle files, which align never loads" in err
    assert not marker.exists()


def test_score_refuses_a_pickled_reward_model(tmp_path, tiny_reward_run, capsys):
    marker = tmp_path / "payload-ran"
    bad = poisoned_copy(tiny_reward_run, tmp_path / "run" / "reward", marker)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "hi", "response": "there"}) + "\n")
    assert main(["score", "--model", str(bad), "--input", str(rows)]) == 2
    assert "pickle files, which align never loads" in capsys.readouterr().err and not marker.exists()


def test_a_stage_refuses_a_pickled_parent(tmp_path, sft_run, tiny_model_dir, reward_data_files):
    from conftest import reward_overrides

    from align.runtime.config import RewardConfig, load_config
    from align.runtime.errors import ModelError
    from align.stages import reward

    marker = tmp_path / "payload-ran"
    bad = poisoned_copy(sft_run, tmp_path / "run" / "sft", marker)
    cfg = load_config(RewardConfig, None, [*reward_overrides(tmp_path, tiny_model_dir, *reward_data_files),
                                           f"init_from_sft={bad}"])
    with pytest.raises(ModelError, match="init_from_sft= .*no adapter_model.safetensors"):
        reward.run(cfg)
    assert not marker.exists() and not (tmp_path / "runs" / "t" / "reward").exists()


def test_a_base_model_with_only_pickled_weights_is_refused(tmp_path, tiny_model_dir):
    from align.modeling.models import load_base
    from align.runtime.errors import ModelError

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload(tmp_path / "payload-ran")}))
    with pytest.raises(ModelError, match="could not load model"):
        load_base(str(base), ModelConfig(name_or_path=str(base)))
    assert not (tmp_path / "payload-ran").exists()


def test_remote_code_is_off_unless_asked_for():
    assert ModelConfig().trust_remote_code is False


def test_trainer_checkpoints_hold_no_pickled_state_and_a_pickled_one_is_refused(tmp_path, tiny_model_dir):
    from conftest import pair_rows, write_jsonl

    from align.runtime.config import SFTConfig, load_config
    from align.runtime.errors import OutputError
    from align.stages import sft

    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                                for r in pair_rows([(a, 3) for a in range(2, 10)])])
    overrides = [f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}", "run=c", f"data.train={data}",
                 "data.eval=", "training.max_steps=2", "training.batch_size=2", "training.save_steps=1", "samples=0"]
    cfg = load_config(SFTConfig, None, [*overrides, "training.save_total_limit=5"])

    class Stop(Exception):
        pass

    import trl
    real = trl.SFTTrainer._save_checkpoint

    def save_then_stop(self, *args, **kwargs):  # a crash right after the first checkpoint
        real(self, *args, **kwargs)
        raise Stop

    trl.SFTTrainer._save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            sft.run(cfg)
    finally:
        trl.SFTTrainer._save_checkpoint = real
    ckpt = tmp_path / "runs" / "c" / "sft.work" / "checkpoint-1"
    names = {p.name for p in ckpt.iterdir()}
    assert {"optimizer.safetensors", "scheduler.json", "rng.safetensors", "trainer_state.json"} <= names
    assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}
    assert json.loads((ckpt / "training_args.json").read_text())["save_steps"] == 1
    # the same checkpoint, its optimizer state swapped for a pickle carrying a payload: refused, not loaded
    marker = tmp_path / "payload-ran"
    (ckpt / "optimizer.safetensors").unlink()
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"state": Payload(marker)}))
    with pytest.raises(OutputError, match="pickle files \\(optimizer.pt\\), which align never loads"):
        sft.run(cfg)
    assert not marker.exists() and (ckpt / "optimizer.pt").exists()
