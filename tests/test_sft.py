"""The SFT stage end to end on a tiny Llama (real tokenizer): what it trains, writes, refuses and resumes."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import chat, write_jsonl
from transformers import TrainerCallback

from align.runtime.config import SFTConfig, load_config
from align.runtime.errors import DataError, OutputError
from align.stages import common, sft
from align.runtime.rundir import prepare_output

PAIRS = [chat(f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}.")
         for a in range(2, 6) for b in (3, 7)]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", PAIRS * 2)


def make_cfg(tmp_path, tiny_model_dir, data, *overrides):
    return load_config(SFTConfig, None, [
        f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}", "run=t",
        f"data.train={data}", f"data.eval={data}", "training.learning_rate=5e-3", "training.batch_size=4",
        "training.max_steps=12", "training.logging_steps=4", "training.save_steps=4", "lora.r=8", "lora.dropout=0",
        "samples=1", *overrides])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trains_lora_weights_and_leaves_base_untouched(tmp_path, tiny_model_dir, data, checkpointing):
    cfg = make_cfg(tmp_path, tiny_model_dir, data, "training.max_steps=4",
                   f"training.gradient_checkpointing={str(checkpointing).lower()}")
    prep = sft.setup(cfg)
    trainer = sft.build_trainer(prep)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in base)


def test_run_writes_a_complete_artifact_and_lowers_the_loss(tmp_path, tiny_model_dir, data):
    cfg = make_cfg(tmp_path, tiny_model_dir, data)
    out = sft.run(cfg)
    assert out == tmp_path / "runs" / "t" / "sft"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
            "config.yaml", "metrics.json", "manifest.json"} <= names
    assert not (tmp_path / "runs" / "t" / "sft.work").exists()  # checkpoints cleaned once finished
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["steps"] == 12 and metrics["n_train"] == len(PAIRS) * 2
    assert len(metrics["samples"]) == 1 and set(metrics["samples"][0]) == {"prompt", "base", "adapter"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["base_model"]["name"] == str(tiny_model_dir)
    assert set(manifest["inputs"]) == {"base_model", "train_data", "eval_data", "config"}
    assert len(manifest["inputs"]["train_data"]) == 64  # a sha256 of the file
    assert {"torch", "transformers", "trl", "peft"} <= set(manifest["libraries"])
    assert load_config(SFTConfig, out / "config.yaml") == cfg


def test_adapter_loads_with_plain_peft_in_a_fresh_process(tmp_path, tiny_model_dir, data):
    out = sft.run(make_cfg(tmp_path, tiny_model_dir, data))
    code = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})
tok = AutoTokenizer.from_pretrained({str(out)!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "What is 2 + 3?"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
ref = base(ids).logits
model = PeftModel.from_pretrained(base, {str(out)!r})
print("MAXDIFF", (model(ids).logits - ref).abs().max().item())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff = float(proc.stdout.split("MAXDIFF")[1])
    assert diff > 1e-3  # the trained adapter changes the model's output


def test_finished_output_is_not_overwritten_without_the_flag(tmp_path, tiny_model_dir, data, monkeypatch):
    cfg = make_cfg(tmp_path, tiny_model_dir, data, "training.max_steps=2")
    out = sft.run(cfg)
    first = (out / "adapter_model.safetensors").read_bytes()
    with monkeypatch.context() as m:  # same inputs: nothing to do, and no model is loaded to find that out
        m.setattr(common, "load_base", lambda *a, **k: pytest.fail("re-ran an up-to-date stage"))
        assert sft.run(cfg) == out
    with pytest.raises(OutputError, match="already holds a finished stage made from other inputs"):
        sft.run(make_cfg(tmp_path, tiny_model_dir, data, "training.max_steps=3"))
    assert (out / "adapter_model.safetensors").read_bytes() == first
    sft.run(make_cfg(tmp_path, tiny_model_dir, data, "training.max_steps=2", "overwrite=true",
                     "training.seed=7"))
    assert (out / "adapter_model.safetensors").read_bytes() != first


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 6:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_from_its_newest_checkpoint(tmp_path, tiny_model_dir, data):
    cfg = make_cfg(tmp_path, tiny_model_dir, data)
    prep = sft.setup(cfg)
    prepare_output(cfg, prep.paths, prep.inputs)
    trainer = sft.build_trainer(prep)
    trainer.add_callback(_Interrupt())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (tmp_path / "runs" / "t" / "sft").exists()  # nothing half-finished in the output place
    out = sft.run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == "checkpoint-4" and metrics["steps"] == 12
    logged_steps = [h["step"] for h in metrics["log_history"] if "loss" in h]
    assert logged_steps == [4, 8, 12]


def test_resume_refuses_checkpoints_from_other_data(tmp_path, tiny_model_dir, data):
    cfg = make_cfg(tmp_path, tiny_model_dir, data)
    prep = sft.setup(cfg)
    prepare_output(cfg, prep.paths, prep.inputs)
    (prep.paths.work / "checkpoint-4").mkdir()
    (prep.paths.work / "checkpoint-4" / "trainer_state.json").write_text("{}")
    write_jsonl(data, PAIRS)  # the data changes under the interrupted run
    with pytest.raises(OutputError, match="train_data.* changed"):
        sft.run(cfg)


def test_bad_data_fails_before_the_model_loads_and_writes_no_output(tmp_path, tiny_model_dir, monkeypatch):
    bad = write_jsonl(tmp_path / "bad.jsonl", PAIRS + [{"prompt": "q"}, {"text": "  "}])
    monkeypatch.setattr(common, "load_base", lambda *a, **k: pytest.fail("model loaded despite bad data"))
    with pytest.raises(DataError, match=r"2 of 10 rows rejected") as e:
        sft.run(make_cfg(tmp_path, tiny_model_dir, bad))
    assert f"{bad}:9: missing key 'completion'" in str(e.value)
    run_dir = tmp_path / "runs" / "t"
    assert not (run_dir / "sft").exists()
    rejects = [json.loads(line) for line in (run_dir / "rejects" / "sft-train.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [9, 10]


def test_valid_rows_train_when_rejects_are_under_the_threshold(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", PAIRS + [{"text": "  "}])
    out = sft.run(make_cfg(tmp_path, tiny_model_dir, bad, "data.max_reject_share=0.2", "training.max_steps=1"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == len(PAIRS) and metrics["n_train_rejected"] == 1


def test_nf4_path_trains_on_cpu_with_gradient_checkpointing(tmp_path, tiny_model_dir, data):
    out = sft.run(make_cfg(tmp_path, tiny_model_dir, data, "model.quantization=nf4", "training.max_steps=3",
                           "training.gradient_checkpointing=true"))
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert metrics["quantization"] == "nf4" and manifest["quantization"] == "nf4"
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert (out / "adapter_model.safetensors").stat().st_size > 0
