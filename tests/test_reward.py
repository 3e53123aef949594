"""The reward stage on a tiny Llama (real tokenizer): what it learns, writes, loads, starts from, and refuses."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import EVAL_NUMBERS, pair_rows, reward_overrides, run_recipe, write_jsonl
from safetensors.torch import load_file

from align.data.pairs import load_pair_data
from align.modeling.formatting import encode_scored
from align.runtime.config import RewardConfig, SFTConfig, load_config
from align.runtime.errors import ConfigError
from align.stages import reward, sft


def test_preference_metrics_by_hand():
    m = reward.preference_metrics(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]), bins=2)
    # gaps 2, -1, 0: one pair right of three; mean gap 1/3
    assert m["accuracy"] == pytest.approx(1 / 3) and m["mean_margin"] == pytest.approx(1 / 3)
    # confidence σ(|gap|) = .8808 (right), .7311 (wrong), .5 (wrong, a tie), each alone in its bin:
    # ECE = (|1-.8808| + |0-.7311| + |0-.5|) / 3 = .4501
    assert m["ece"] == pytest.approx((1 - 1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(-1)) + 0.5) / 3)
    # two bins over [0, 2]: [0, 1) and [1, 2]
    assert m["histogram"] == {"edges": [0.0, 1.0, 2.0], "chosen": [1, 2], "rejected": [1, 2]}


def test_learns_a_separable_preference(tmp_path, tiny_model_dir, reward_data_files):
    cfg = load_config(RewardConfig, None, reward_overrides(tmp_path, tiny_model_dir, *reward_data_files))
    prep = reward.setup(cfg)
    trainer = reward.build_trainer(prep)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    held_out_before = reward.evaluate_pairs(trainer.model, prep.tokenizer, prep.eval, 8, 4)
    trainer.train()
    held_out_after = reward.evaluate_pairs(trainer.model, prep.tokenizer, prep.eval, 8, 4)
    after = dict(trainer.model.named_parameters())
    assert held_out_after["accuracy"] >= 0.9
    assert held_out_after["mean_margin"] > held_out_before["mean_margin"] + 1
    trained = [n for n in before if after[n].requires_grad]
    assert any("lora_B" in n for n in trained) and any("score" in n for n in trained)
    assert all(not torch.equal(before[n], after[n]) for n in trained if "lora_B" in n or "score" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if not after[n].requires_grad)


def test_run_writes_adapter_with_score_head_and_metrics(tiny_reward_run):
    out = tiny_reward_run
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
            "config.yaml", "metrics.json", "manifest.json"} <= names
    weights = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("score.weight") for k in weights) and any("lora_A" in k for k in weights)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9 and metrics["n_eval"] == len(EVAL_NUMBERS)
    assert 0 <= metrics["eval_ece"] <= 1 and metrics["eval_mean_margin"] > 0
    hist = metrics["eval_histogram"]
    assert sum(hist["chosen"]) == sum(hist["rejected"]) == len(EVAL_NUMBERS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "reward" and manifest["parent"] is None


def test_artifact_scores_the_same_with_plain_transformers_and_peft(tiny_reward_run, tiny_model_dir, tiny_tok):
    # a fresh process, no align import: AutoModelForSequenceClassification + PeftModel on the saved adapter,
    # fed the token ids align's formatting path makes for a training row
    probe = json.loads((tiny_reward_run / "metrics.json").read_text())["train_probe"][0]
    row = json.loads(open(probe["source"]).readlines()[probe["row"] - 1])
    ids = encode_scored(tiny_tok, [{"role": "user", "content": row["prompt"]}],
                        [{"role": "assistant", "content": row["chosen"]}])
    code = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(tiny_reward_run)!r})
base = AutoModelForSequenceClassification.from_pretrained({str(tiny_model_dir)!r}, num_labels=1,
                                                          pad_token_id=tok.pad_token_id)
model = PeftModel.from_pretrained(base, {str(tiny_reward_run)!r}).eval()
print(model(input_ids=torch.tensor([{ids}])).logits[0, 0].item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) == pytest.approx(probe["chosen_score"], abs=1e-4)


def test_starts_from_the_sft_adapter(tmp_path, tiny_model_dir, reward_data_files):
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows([(2, 3), (4, 5), (6, 7), (8, 9)])])
    sft_cfg = load_config(SFTConfig, None, [f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}",
                                            "run=t", f"data.train={sft_data}", "data.eval=", "training.max_steps=2",
                                            "training.batch_size=2", "lora.r=4", "lora.alpha=8", "samples=0"])
    sft_out = sft.run(sft_cfg)
    cfg = load_config(RewardConfig, None, reward_overrides(tmp_path, tiny_model_dir, *reward_data_files)
                      + [f"init_from_sft={sft_out}"])
    prep = reward.setup(cfg)
    assert prep.inputs["parent_adapter"]
    model = reward.build_model(prep)
    saved = load_file(sft_out / "adapter_model.safetensors")
    state = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(state) == len(saved) and model.peft_config["default"].r == 4
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(state[name], value), name

    with pytest.raises(ConfigError, match="no finished SFT stage"):
        reward.setup(load_config(RewardConfig, None, reward_overrides(tmp_path, tiny_model_dir, *reward_data_files)
                                 + [f"init_from_sft={tmp_path / 'nothing'}"]))
    with pytest.raises(ConfigError, match="was trained on"):
        reward.setup(load_config(RewardConfig, None, reward_overrides(tmp_path, tiny_model_dir, *reward_data_files)
                                 + [f"init_from_sft={sft_out}", "model.name_or_path="]))


def test_each_bad_pair_class_is_rejected_with_its_reason(tmp_path, tokenizer):
    long_answer = "many words " * 40
    rows = [
        {"prompt": "What is 2 + 3?", "chosen": "5.", "rejected": "5."},                      # identical
        {"prompt": "word " * 60, "chosen": "5.", "rejected": "6."},                          # prompt fills it
        {"prompt": "What is 2 + 3?", "chosen": "5.", "rejected": long_answer},               # answer cannot fit
        {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},  # role order
        {"prompt": "What is 2 + 3?", "chosen": "5.", "rejected": "6.", "margin": "big"},     # bad margin
        {"prompt": "What is 2 + 3?", "chosen": "5.", "rejected": "6.", "margin": 0.5},       # fine
    ]
    loaded = load_pair_data(str(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, max_length=64)
    reasons = {r.row: r.reason for r in loaded.rejects}
    assert "identical" in reasons[1]
    assert "nothing left of the answer after truncation" in reasons[2]
    assert "'rejected': prompt + answer is" in reasons[3] and "over the max length 64" in reasons[3]
    assert "role order" in reasons[4]
    assert "'margin' must be a finite number" in reasons[5]
    assert len(loaded.encoded) == 1 and loaded.encoded[0].margin == 0.5


def test_template_that_cannot_render_the_roles_rejects_the_pair(tmp_path, tokenizer):
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}],
           "chosen": "5.", "rejected": "6."}
    loaded = load_pair_data(str(write_jsonl(tmp_path / "p.jsonl", [row])), strict, max_length=64)
    assert not loaded.encoded and "no system role" in loaded.rejects[0].reason


def test_recipe_script_runs_as_a_user_runs_it(tmp_path, tiny_model_dir, reward_data_files):
    overrides = [o for o in reward_overrides(tmp_path, tiny_model_dir, *reward_data_files)
                 if not o.startswith("training.max_steps")] + ["training.max_steps=2", "init_from_sft="]
    # the script file runs as __main__ in this process (tests/test_cli.py runs one recipe script as a real process)
    out = run_recipe("reward", *overrides, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "reward finished" in out.stdout and "eval_accuracy" in out.stdout
    assert (tmp_path / "runs" / "t" / "reward" / "manifest.json").is_file()


def test_nf4_base_with_checkpointing_trains_and_scores(tmp_path, tiny_model_dir, reward_data_files):
    # the GPU default (4-bit base, bf16 adapter and head from TRL) on bitsandbytes' CPU backend
    cfg = load_config(RewardConfig, None, reward_overrides(tmp_path, tiny_model_dir, *reward_data_files)
                      + ["model.quantization=nf4", "training.gradient_checkpointing=true", "training.max_steps=3"])
    prep = reward.setup(cfg)
    trainer = reward.build_trainer(prep)
    head = [p for n, p in trainer.model.named_parameters() if "score" in n and p.requires_grad]
    before = [p.detach().clone() for p in head]
    trainer.train()
    assert head and all(not torch.equal(b, p) for b, p in zip(before, head))
    held_out = reward.evaluate_pairs(trainer.model, prep.tokenizer, prep.eval, 8, 4)
    assert math.isfinite(held_out["mean_margin"])
