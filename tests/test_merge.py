"""`align merge`: the arithmetic of a merge, verification that catches a bad one, score heads kept, refusals."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_align
from safetensors.torch import load_file

from align.runtime.errors import OutputError
from align.serving import merge as merging


@pytest.fixture(scope="module")
def merged_sft(tmp_path_factory, sft_run):
    out = tmp_path_factory.mktemp("merged") / "sft"
    return out, merging.merge(str(sft_run), str(out))


def test_merged_weights_are_w_plus_scaled_ba(merged_sft, sft_run, tiny_model_dir):
    out, _ = merged_sft
    merged = load_file(out / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    adapter = load_file(sft_run / "adapter_model.safetensors")
    cfg = json.loads((sft_run / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    checked = 0
    for key in adapter:
        if not key.endswith("lora_A.weight"):
            continue
        layer = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a, b = adapter[key], adapter[key.replace("lora_A", "lora_B")]
        expected = base[layer + ".weight"] + scale * (b @ a)
        assert torch.allclose(merged[layer + ".weight"], expected, atol=1e-6), layer
        checked += 1
    assert checked >= 7 * 2  # every adapted Linear of both layers
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the adapter did change something


def test_merged_policy_matches_the_adapter_and_loads_with_plain_transformers(merged_sft):
    out, summary = merged_sft
    v = summary["verification"]
    assert summary["passed"] and v["max_logit_diff"] <= 1e-4 and v["top1_agreement"] == 1.0 and v["probes"] >= 1
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= {
        p.name for p in out.iterdir()}
    assert "max_logit_diff" in (out / "README.md").read_text()
    code = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r}); "
            "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True); "
            "print(type(m).__name__, t.chat_template is not None)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LlamaForCausalLM True" in proc.stdout


def test_reward_merge_keeps_the_head_and_scores_like_the_adapter(tmp_path, tiny_reward_run, reward_data_files):
    from align.serving.score import load_reward_model, score_rows

    out = tmp_path / "rm"
    summary = merging.merge(str(tiny_reward_run), str(out))
    assert summary["passed"] and summary["verification"]["max_score_diff"] <= 1e-4
    rows = [(i, r) for i, r in enumerate(json.loads(line) for line in reward_data_files[1].read_text().splitlines())]
    as_run = score_rows(load_reward_model(tiny_reward_run, "cpu"), rows[:6])
    as_merged = score_rows(load_reward_model(out, "cpu"), rows[:6])
    for a, b in zip(as_run, as_merged):
        assert a["chosen_score"] == pytest.approx(b["chosen_score"], abs=1e-4)
        assert a["rejected_score"] == pytest.approx(b["rejected_score"], abs=1e-4)
    code = ("from transformers import AutoModelForSequenceClassification as A; "
            f"m = A.from_pretrained({str(out)!r}); print(m.config.num_labels, m.config.align_max_length)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "512"], proc.stderr[-2000:]


def test_a_corrupted_merge_is_caught_and_nothing_is_written(tmp_path, sft_run, monkeypatch):
    real = merging._merged_model

    def corrupted(peft_model):
        model = real(peft_model)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.add_(0.05)  # a merge that went slightly wrong
        return model

    monkeypatch.setattr(merging, "_merged_model", corrupted)
    with pytest.raises(merging.MergeVerificationError, match="max |logit difference|"):
        merging.merge(str(sft_run), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    kept = merging.merge(str(sft_run), str(tmp_path / "kept"), accept_drift=True)
    assert not kept["passed"] and kept["accepted_drift"] and (tmp_path / "kept" / "model.safetensors").is_file()


def test_refusals_and_the_same_merge_again_is_a_no_op(tmp_path, sft_run, tiny_model_dir):
    with pytest.raises(OutputError, match="base model's directory"):
        merging.merge(str(sft_run), str(tiny_model_dir))
    with pytest.raises(OutputError, match="base model's directory"):
        merging.merge(str(sft_run), str(tiny_model_dir / "inside"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="--force"):
        merging.merge(str(sft_run), str(busy))
    assert (busy / "keep.txt").read_text() == "mine"
    first = merging.merge(str(sft_run), str(busy), force=True)
    stamp = (busy / "model.safetensors").stat().st_mtime_ns
    again = merging.merge(str(sft_run), str(busy))
    assert again["already_merged"] and again["adapter_sha256"] == first["adapter_sha256"]
    assert (busy / "model.safetensors").stat().st_mtime_ns == stamp


def test_half_precision_merge_is_held_to_the_precision_s_own_drift(tmp_path, sft_run):
    summary = merging.merge(str(sft_run), str(tmp_path / "bf16"), dtype="bf16")
    v = summary["verification"]
    assert summary["passed"] and "unmerged_in_bf16" in v
    assert v["max_logit_diff"] <= 2 * v["unmerged_in_bf16"]["max_logit_diff"] + 1e-3
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())


def test_an_adapter_trained_on_nf4_reports_its_drift_from_the_4bit_model(tmp_path, tiny_model_dir):
    from conftest import pair_rows, write_jsonl

    from align.runtime.config import SFTConfig, load_config
    from align.stages import sft

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                              for r in pair_rows([(2, 3), (4, 5)])])
    run = sft.run(load_config(SFTConfig, None, [
        f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}", f"data.train={data}", "data.eval=",
        "model.quantization=nf4", "training.max_steps=1", "training.batch_size=2", "lora.r=4", "samples=0"]))
    summary = merging.merge(str(run), str(tmp_path / "m"))
    drift = summary["verification"]["drift_from_nf4"]
    assert summary["passed"] and drift["max_logit_diff"] > summary["verification"]["max_logit_diff"]
    assert 0 <= drift["top1_agreement"] <= 1


def test_cli_merges_says_so_and_refuses_a_bad_adapter(tmp_path, sft_run):
    out = tmp_path / "m"
    run = ["merge", "--adapter", str(sft_run), "--out", str(out)]
    proc = run_align(*run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verified on" in proc.stderr and "top1_agreement 1" in proc.stderr
    again = run_align(*run)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    bad = run_align("merge", "--adapter", tmp_path, "--out", tmp_path / "x")
    assert bad.returncode == 2 and "not a finished stage output" in bad.stderr and "Traceback" not in bad.stderr
