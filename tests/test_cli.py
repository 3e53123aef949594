"""Commands run the way a user runs them, reading what they print. Most run in this process (conftest.run_align:
align.cli.main with stdout/stderr captured); the console script `align` and a recipe script each run once as a
real process here, and `python -m align.cli` in tests/test_serve.py (serve-rm listening on a port)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, chat, run_align, write_jsonl

ALIGN = Path(sys.executable).parent / "align"


def run(args, cwd, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_help_explains_every_config_key(tmp_path):
    # the installed console script, as a real process: the one test of the `align` entry point itself
    proc = run([str(ALIGN), "sft", "--help"], tmp_path)
    assert proc.returncode == 0
    for text in ("training.learning_rate = 0.0003", "model.quantization = auto", "KEY=VALUE", "--print-config"):
        assert text in proc.stdout, text
    proc = run_align("reward", "--help", cwd=tmp_path)
    for text in ("init_from_sft =", "margin = 0.0", "data.train = reward_data/prefs/train.jsonl"):
        assert text in proc.stdout, text


@pytest.mark.parametrize("verb, texts", [
    ("score", ["--input", "--output", "--batch-size", "--max-length", "exit status", '"chosen_score"']),
    ("serve-rm", ["--host", "--port", "ALIGN_API_KEY", "413", "POST /score"]),
])
def test_scoring_commands_explain_themselves(tmp_path, verb, texts):
    proc = run_align(verb, "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for text in texts:
        assert text in proc.stdout, text


def test_config_error_is_one_message_without_traceback(tmp_path):
    proc = run_align("sft", "training.learnin_rate=1e-4", cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: unknown config key 'training.learnin_rate' (did you mean 'training.learning_rate'?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_print_config_shows_resolved_values(tmp_path):
    proc = run_align("sft", "--config", ROOT / "recipes/configs/sft.yaml", "--print-config", "lora.r=4", cwd=tmp_path)
    assert proc.returncode == 0
    assert "  r: 4\n" in proc.stdout and "learning_rate: 0.0003" in proc.stdout


def test_bad_data_error_names_file_and_row(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("q", "a"), {"messages": [{"role": "robot", "content": "x"}]}])
    proc = run_align("sft", f"model.name_or_path={tiny_model_dir}", f"data.train={bad}", "data.eval=",
                     f"runs_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}:2: messages[0] has unknown role 'robot'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "demo" / "sft").exists()


def test_recipe_script_as_a_user_runs_it(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(f"What is {i} + 1?", f"The answer is {i + 1}.") for i in range(8)])
    proc = run([sys.executable, str(ROOT / "recipes" / "sft.py"), f"model.name_or_path={tiny_model_dir}",
                f"data.train={data}", f"data.eval={data}", "training.max_steps=3", "training.batch_size=4",
                "run=recipe"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "recipe" / "sft"  # runs_dir is relative to where the user stands
    assert "sft finished: runs/recipe/sft" in proc.stdout and "eval_loss_after" in proc.stdout
    cfg = (out / "config.yaml").read_text()
    assert "max_steps: 3" in cfg and "learning_rate: 0.0003" in cfg  # override + the recipe's own YAML
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


@pytest.mark.embedded
def test_demo_commands_on_the_embedded_model(tmp_path, embedded_dir, tokenizer):
    """The README's main job, shortened: SFT, then the reward model from it, then scoring with it — on the
    embedded SmolLM2 with the shipped data."""
    from align.data.rows import load_sft_data

    # the whole shipped held-out set is valid on the embedded model's tokenizer; the run below is evaluated on
    # its first 8 rows (held-out loss before and after, 7 s at 16 rows, is a third of this command's time)
    held_out_sft = load_sft_data(str(ROOT / "reward_data/sft/eval.jsonl"), tokenizer, 512, True)
    assert len(held_out_sft.encoded) == 100 and not held_out_sft.rejects
    proc = run_align("sft", "--config", ROOT / "recipes/configs/sft.yaml", "data.limit=16", "data.eval_limit=8",
                     "training.max_steps=2", "training.batch_size=4", "samples=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base + adapter:" in proc.stdout
    metrics = json.loads((tmp_path / "runs/demo/sft/metrics.json").read_text())
    assert metrics["n_train"] == 16 and metrics["n_eval"] == 8
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]

    held_out = (ROOT / "reward_data/prefs/eval.jsonl").read_text().splitlines()[:12]
    (tmp_path / "eval.jsonl").write_text("\n".join(held_out) + "\n")
    proc = run_align("reward", "--config", ROOT / "recipes/configs/reward.yaml", "data.limit=16",
                     "data.eval=eval.jsonl", "training.max_steps=2", "training.batch_size=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reward finished: runs/demo/reward" in proc.stdout and "eval_accuracy" in proc.stdout
    manifest = json.loads((tmp_path / "runs/demo/reward/manifest.json").read_text())
    assert manifest["parent"] == str((tmp_path / "runs/demo/sft").resolve())

    proc = run_align("score", "--model", "runs/demo/reward", "--input", "eval.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 12 and all("margin" in r for r in rows)
    assert "12 pairs: accuracy" in proc.stderr
