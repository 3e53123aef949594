"""Exact resume: a run that stops right after checkpoint k and is started again with the same config sees exactly
the batches the uninterrupted run saw after step k, with optimizer, scheduler and RNG state restored (dropout is
on, so a wrong RNG state would change the losses), and its loss curve and final adapter are bit-identical on CPU.
PPO: the same prompts and sampled answers, the same adaptive KL coefficient and reward normalisation."""

import hashlib
import json
import shutil

import pytest
import torch
from conftest import chat, pair_rows, write_jsonl
from safetensors.torch import load_file
from transformers import TrainerCallback

from align.runtime.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, load_config
from align.stages import dpo, online, ppo, reward, sft


class Crash(Exception):
    """A simulated crash right after a checkpoint is written."""


class CrashAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Crash(f"crash after checkpoint-{self.step}")


def digest(ids: torch.Tensor) -> str:
    return f"{tuple(ids.shape)}:{hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]}"


BUILD_TRAINER = {m: m.build_trainer for m in (sft, reward, dpo)}


def instrument(module, monkeypatch, seen: list, crash_at: int | None = None) -> None:
    """Record (optimizer step, batch digest) of every training forward pass; optionally crash after a checkpoint."""
    real = BUILD_TRAINER[module]

    def build(prep):
        trainer = real(prep)
        step = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            seen.append((trainer.state.global_step, digest(inputs["input_ids"])))
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = training_step
        if crash_at is not None:
            trainer.add_callback(CrashAfterSave(crash_at))
        return trainer

    monkeypatch.setattr(module, "build_trainer", build)


def curve(out) -> list[dict]:
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return [{k: h[k] for k in ("step", "loss", "grad_norm", "learning_rate") if k in h} for h in history
            if "loss" in h]


def adapters(out) -> dict[str, torch.Tensor]:
    return {f"{p.relative_to(out)}:{k}": v for p in sorted(out.rglob("*.safetensors")) for k, v in load_file(p).items()}


def assert_same_adapter(a, b) -> None:
    wa, wb = adapters(a), adapters(b)
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]


def crash_and_resume(module, make_cfg, k: int, tmp_path, monkeypatch, accum: int = 1):
    """(uninterrupted output, resumed output, batches of each part) of a run crashed after checkpoint k."""
    whole_seen, first_seen, second_seen = [], [], []
    instrument(module, monkeypatch, whole_seen)
    whole = module.run(make_cfg(tmp_path / "a"))
    cfg = make_cfg(tmp_path / "b")
    instrument(module, monkeypatch, first_seen, crash_at=k)
    with pytest.raises(Crash):
        module.run(cfg)
    instrument(module, monkeypatch, second_seen)
    resumed = module.run(cfg)
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from"] == f"checkpoint-{k}"
    # the batches: the first part saw the first k steps' batches, the resumed part exactly the rest, in order
    assert first_seen == whole_seen[:k * accum]
    assert second_seen == whole_seen[k * accum:]
    assert [s for s, _ in second_seen][::accum] == list(range(k, len(whole_seen) // accum))
    assert len({d for _, d in whole_seen}) > 1  # batches differ, so a wrong data position would show
    # the loss curve continues identically, every logged step (lr: the scheduler; losses: optimizer, RNG, data)
    assert curve(resumed) == curve(whole) and len(curve(whole)) == len(whole_seen) // accum
    assert_same_adapter(whole, resumed)
    return whole, resumed, cfg


COMMON = ["run=t", "data.eval=", "training.logging_steps=1", "training.save_steps=1", "training.save_total_limit=2",
          "training.learning_rate=5e-3", "lora.r=4", "lora.alpha=8", "training.batch_size=2"]


@pytest.fixture
def prefs(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", pair_rows([(a, b) for a in range(2, 6) for b in (3, 7)]))


def test_sft_resumes_exactly_across_an_epoch_boundary(tmp_path, tiny_model_dir, monkeypatch):
    # 8 rows, batch 2, grad_accum 2: two optimizer steps per epoch; the crash after step 3 resumes in epoch 2,
    # one step (two batches) into the epoch's reshuffled order
    data = write_jsonl(tmp_path / "sft.jsonl", [chat(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.")
                                                for a in range(2, 6) for b in (3, 7)])

    def make_cfg(d):
        return load_config(SFTConfig, None, COMMON + [
            f"model.name_or_path={tiny_model_dir}", f"runs_dir={d}", f"data.train={data}", "training.grad_accum=2",
            "training.max_steps=5", "lora.dropout=0.1", "samples=0"])

    whole, resumed, cfg = crash_and_resume(sft, make_cfg, 3, tmp_path, monkeypatch, accum=2)

    # the control: resumed with another (valid) RNG state, the same batches give other dropout masks and losses,
    # so the identical curve above does show that the RNG state was restored
    work = resumed.parent / "sft.work"
    shutil.rmtree(resumed)
    instrument(sft, monkeypatch, [], crash_at=3)
    with pytest.raises(Crash):
        sft.run(cfg)
    ckpt = work / "checkpoint-3"
    for name in ("rng.safetensors", "rng.json"):
        shutil.copy(work / "checkpoint-2" / name, ckpt / name)
    instrument(sft, monkeypatch, [])
    other = sft.run(cfg)
    assert [h["loss"] for h in curve(other)][:3] == [h["loss"] for h in curve(whole)][:3]
    assert [h["loss"] for h in curve(other)][3:] != [h["loss"] for h in curve(whole)][3:]


def test_reward_resumes_exactly_across_an_epoch_boundary(tmp_path, tiny_model_dir, prefs, monkeypatch):
    # 8 pairs, batch 2: four steps per epoch; the crash after step 5 resumes one step into epoch 2
    def make_cfg(d):
        return load_config(RewardConfig, None, COMMON + [
            f"model.name_or_path={tiny_model_dir}", f"runs_dir={d}", f"data.train={prefs}", "init_from_sft=",
            "training.max_steps=7"])

    crash_and_resume(reward, make_cfg, 5, tmp_path, monkeypatch)


def test_dpo_resumes_exactly(tmp_path, tiny_model_dir, prefs, monkeypatch):
    def make_cfg(d):
        return load_config(DPOConfig, None, COMMON + [
            f"model.name_or_path={tiny_model_dir}", f"runs_dir={d}", f"data.train={prefs}", "init_from_sft=",
            "eval_prompts=", "beta=0.5", "lora.dropout=0.1", "training.max_steps=6"])

    crash_and_resume(dpo, make_cfg, 3, tmp_path, monkeypatch)


def test_ppo_resumes_with_the_same_prompts_answers_kl_controller_and_reward_statistics(
        tmp_path, tiny_model_dir, prefs, tiny_reward_run, monkeypatch):
    def make_cfg(d):
        return load_config(PPOConfig, None, [
            f"model.name_or_path={tiny_model_dir}", f"runs_dir={d}", "run=p", f"data.train={prefs}",
            f"reward_model={tiny_reward_run}", "init_from_sft=", "eval_prompts=", "rollout.batch_size=4",
            "rollout.max_new_tokens=4", "training.batch_size=2", "training.learning_rate=1e-3",
            "training.max_steps=5", "training.save_steps=1", "ppo.target_kl=0.01", "ppo.kl_horizon=10",
            "ppo.normalize_reward=true"])

    real = ppo.rollout

    def record(seen: list):
        def rollout(roles, prep, rows):
            batch, r = real(roles, prep, rows)
            seen.append((tuple(rows), tuple(r.texts), digest(batch.ids)))
            return batch, r

        monkeypatch.setattr(ppo, "rollout", rollout)

    whole_seen, first_seen, second_seen = [], [], []
    record(whole_seen)
    whole = ppo.run(make_cfg(tmp_path / "a"))
    real_save = online.save_checkpoint

    def save_then_crash(work, step, *args, **kwargs):
        real_save(work, step, *args, **kwargs)
        if step == 2:
            raise Crash("crash after checkpoint-2")

    cfg = make_cfg(tmp_path / "b")
    record(first_seen)
    monkeypatch.setattr(online, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        ppo.run(cfg)
    monkeypatch.setattr(online, "save_checkpoint", real_save)
    record(second_seen)
    resumed = ppo.run(cfg)
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from"] == "checkpoint-2"
    assert first_seen == whole_seen[:2] and second_seen == whole_seen[2:]  # prompts, sampled answers, tokens
    assert len({rows for rows, _, _ in whole_seen}) > 1
    a = json.loads((whole / "metrics.json").read_text())["log_history"]
    b = json.loads((resumed / "metrics.json").read_text())["log_history"]
    keys = ("reward_mean", "reward_std", "kl", "kl_coef", "policy_loss", "value_loss", "entropy", "clip_fraction",
            "explained_variance", "grad_norm_policy", "grad_norm_value")
    assert [[h[k] for k in keys] for h in b] == [[h[k] for k in keys] for h in a]
    coefs = [h["kl_coef"] for h in a]
    assert len(set(coefs)) == len(coefs)  # the adaptive coefficient moved every step: its state had to resume
    assert_same_adapter(whole, resumed)
