"""The DPO stage on a tiny Llama: what it learns, what it leaves alone, one base, reference computed once."""

import json

import pytest
import torch
from conftest import run_recipe, write_jsonl
from safetensors.torch import load_file

from align.evaluation.evaluate import evaluate_stage_output
from align.runtime.config import DPOConfig, load_config
from align.stages import dpo


def make_cfg(tmp_path, tiny_model_dir, reward_data_files, *overrides):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": a + b}
                                                       for a, b in [(2, 3), (5, 8), (9, 4)]])
    train, evals = reward_data_files
    return load_config(DPOConfig, None, [
        f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}", "run=t", f"data.train={train}",
        f"data.eval={evals}", "training.learning_rate=5e-3", "training.batch_size=4", "training.max_steps=8",
        "training.logging_steps=2", "training.save_steps=4", "beta=0.5", f"eval_prompts={prompts}",
        "max_new_tokens=6", *overrides])


def count_reference_passes(monkeypatch) -> list[int]:
    calls = []
    real = dpo.reference_logps

    def counted(model, pairs, *args):
        calls.append(len(pairs))
        return real(model, pairs, *args)

    monkeypatch.setattr(dpo, "reference_logps", counted)
    return calls


def test_learns_preferences_changes_only_the_policy_and_keeps_one_base(
        tmp_path, tiny_model_dir, reward_data_files, sft_run, monkeypatch):
    calls = count_reference_passes(monkeypatch)
    cfg = make_cfg(tmp_path, tiny_model_dir, reward_data_files, f"init_from_sft={sft_run}")
    prep = dpo.setup(cfg)
    trainer = dpo.build_trainer(prep)
    assert calls == [len(prep.train.encoded), len(prep.eval.encoded)]  # once per split, before training
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the policy starts exactly as the SFT adapter
    saved = load_file(sft_run / "adapter_model.safetensors")
    for key, value in saved.items():
        assert torch.equal(before[key.replace(".weight", ".default.weight")], value)
        assert torch.equal(before[key.replace(".weight", ".reference.weight")], value)
    accuracy_before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    assert calls == [len(prep.train.encoded), len(prep.eval.encoded)]  # no reference pass while training
    after = dict(model.named_parameters())
    policy = [n for n in before if ".default." in n and "lora_" in n]
    reference = [n for n in before if ".reference." in n]
    base = [n for n in before if "lora_" not in n]
    assert policy and reference and base
    assert any(not torch.equal(before[n], after[n]) for n in policy)
    assert all(torch.equal(before[n], after[n]) for n in reference + base)
    assert trainer.evaluate()["eval_accuracy"] > max(accuracy_before, 0.8)
    # one copy of the base: every base weight tensor in memory appears once
    storages = {p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    base_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    assert base_count == sum(p.numel() for p in fresh.parameters())
    assert len(storages) == len(list(fresh.parameters()))


def test_run_saves_the_policy_only_and_reuses_cached_reference(
        tmp_path, tiny_model_dir, reward_data_files, sft_run, monkeypatch):
    cfg = make_cfg(tmp_path, tiny_model_dir, reward_data_files, f"init_from_sft={sft_run}")
    out = dpo.run(cfg)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json", "manifest.json"} <= names
    assert "reference" not in names  # the frozen reference is the SFT stage's; it is not saved again
    assert set(load_file(out / "adapter_model.safetensors")) == set(load_file(sft_run / "adapter_model.safetensors"))
    assert load_file(sft_run / "adapter_model.safetensors")  # the SFT adapter on disk is untouched
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] > 0.8 and metrics["eval_loss"] < metrics["eval_loss_before"]
    assert "win_rate" not in metrics  # the stage trains and saves; evaluation runs on the saved artifact
    report = evaluate_stage_output(out, cfg.eval_prompts, cfg.eval_limit, cfg.max_new_tokens)
    assert json.loads((out / "metrics.json").read_text())["win_rate"]["kl_estimate"] == report["kl_estimate"]
    assert report["baseline"] == str(sft_run.resolve())  # against the reference it trained with
    assert report["n_prompts"] == 3 and report["gold_n"] == 3 and 0 <= report["gold_win_rate"] <= 1
    assert {"kl_estimate", "policy_words_mean", "reference_words_mean"} <= set(report)
    assert json.loads((out / "manifest.json").read_text())["parent"] == str(sft_run.resolve())

    calls = count_reference_passes(monkeypatch)
    dpo.run(make_cfg(tmp_path, tiny_model_dir, reward_data_files, f"init_from_sft={sft_run}", "overwrite=true",
                     "training.max_steps=2"))
    assert calls == []  # same data, same reference: log-probs come from runs/t/cache/


def test_without_sft_the_base_is_the_reference(tmp_path, tiny_model_dir, reward_data_files):
    cfg = make_cfg(tmp_path, tiny_model_dir, reward_data_files, "eval_prompts=", "loss=ipo")
    prep = dpo.setup(cfg)
    model = dpo.build_model(prep)
    assert "reference" not in model.peft_config
    ids = torch.tensor([prep.train.encoded[0].chosen_ids])
    with torch.no_grad():
        with dpo.reference(model):
            ref = model(input_ids=ids).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(input_ids=ids).logits
    assert torch.equal(ref, plain)


def test_recipe_script_runs_as_a_user_runs_it(tmp_path, tiny_model_dir, reward_data_files):
    train, evals = reward_data_files
    # the script file runs as __main__ in this process (tests/test_cli.py runs one recipe script as a real process)
    proc = run_recipe("dpo", f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"data.eval={evals}",
                      "training.batch_size=4", "init_from_sft=", "training.max_steps=2", "loss=hinge",
                      "eval_prompts=", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dpo finished: runs/demo/dpo" in proc.stdout and "eval_accuracy" in proc.stdout
    assert "loss: hinge" in (tmp_path / "runs/demo/dpo/config.yaml").read_text()


def test_nf4_base_with_checkpointing_trains_the_policy(tmp_path, tiny_model_dir, reward_data_files, sft_run):
    cfg = make_cfg(tmp_path, tiny_model_dir, reward_data_files, f"init_from_sft={sft_run}", "model.quantization=nf4",
                   "training.gradient_checkpointing=true", "training.max_steps=2", "eval_prompts=")
    prep = dpo.setup(cfg)
    trainer = dpo.build_trainer(prep)
    policy = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".default." in n}
    reference = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".reference." in n}
    trainer.train()
    now = dict(trainer.model.named_parameters())
    assert any(not torch.equal(v, now[n]) for n, v in policy.items() if "lora_B" in n)
    assert all(torch.equal(v, now[n]) for n, v in reference.items())


def test_sampled_kl_is_zero_against_itself_and_leaves_the_rng_alone(sft_run):
    import contextlib

    from align.evaluation.measures import sampled_kl
    from align.serving.trained import load_policy

    model, tok, _ = load_policy(sft_run, "cpu")
    prompts = [[{"role": "user", "content": f"What is {a} + 2?"}] for a in range(3)]
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    same = sampled_kl(model, tok, prompts, 4, lambda m: contextlib.nullcontext(m))
    assert same == 0.0  # the reference is the policy itself
    assert torch.equal(torch.rand(3), expected_next)  # sampling did not consume the caller's random stream
    with torch.no_grad():  # a different reference (the adapter off) gives a different, positive-on-average number
        other = sampled_kl(model, tok, prompts, 4, lambda m: m.disable_adapter())
    assert other != 0.0


def test_accumulating_two_half_batches_is_one_whole_batch(tmp_path, tiny_model_dir, reward_data_files, sft_run):
    """DPO batches carry `labels`, which made the Trainer skip dividing the loss by the accumulation steps:
    2 × 2 pairs accumulated logged (and stepped on) twice the loss of one batch of the same 4 pairs."""
    runs = {}
    for name, batch, accum in (("whole", 4, 1), ("halves", 2, 2)):
        cfg = make_cfg(tmp_path, tiny_model_dir, reward_data_files, f"init_from_sft={sft_run}", f"run={name}",
                       f"training.batch_size={batch}", f"training.grad_accum={accum}", "training.max_steps=3",
                       "data.eval=", "eval_prompts=", "lora.dropout=0", "training.warmup_ratio=0")
        out = dpo.run(cfg)
        runs[name] = (json.loads((out / "metrics.json").read_text()), load_file(out / "adapter_model.safetensors"))
    (m_whole, w_whole), (m_halves, w_halves) = runs["whole"], runs["halves"]
    assert m_halves["train_loss"] == pytest.approx(m_whole["train_loss"], rel=1e-4)
    assert max((w_whole[k] - w_halves[k]).abs().max().item() for k in w_whole) < 2e-4


def test_reference_pass_batches_by_length_and_returns_data_order(tiny_model_dir, tiny_tok):
    """The reference pass groups pairs of similar length; the rows still come back in the data's order, equal to
    each pair scored on its own (no padding at all)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.data.pairs import EncodedPair

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"]))  # the reference: the base, adapters off
    lengths = [9, 30, 12, 25, 8, 40, 15]
    pairs = [EncodedPair(list(range(100, 100 + n)), list(range(200, 200 + n + i)), 0.0, 4)
             for i, n in enumerate(lengths)]
    batched = dpo.reference_logps(model, pairs, tiny_tok.pad_token_id, batch_size=3)
    alone = torch.cat([dpo.reference_logps(model, [p], tiny_tok.pad_token_id, batch_size=1) for p in pairs])
    assert batched.shape == (7, 2)
    assert torch.allclose(batched, alone, atol=1e-4)
