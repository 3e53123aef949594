"""The PPO stage on a tiny Llama: it learns a programmatic reward, keeps four roles on one base, its guards fire,
and a resumed run continues the same trajectory."""

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import count_tiled_backwards, pair_rows, run_recipe, write_jsonl
from safetensors.torch import load_file

from align.modeling.roles import POLICY, REFERENCE, REWARD, VALUE, Roles
from align.runtime.config import PPOConfig, RewardConfig, SFTConfig, load_config
from align.stages import online, ppo, reward, sft


@pytest.fixture(scope="module")
def peaky(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Llama initialised with large weights, so that its next-token distributions are peaked (a random
    tiny model is nearly uniform over its vocabulary, where a reward for one token is seldom seen), plus an SFT
    run and a reward run on it (a few steps each: they only need to exist). With the 512-token test tokenizer,
    weights of std 0.3 leave the policy room to learn: the reward test below rises to 1.0 in 4 of 5 seeds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("ppo")
    model_dir = tmp / "peaky"
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=0.3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = pair_rows([(a, b) for a in range(2, 10) for b in (3, 7)])
    pairs = write_jsonl(tmp / "pairs.jsonl", rows)
    common = [f"model.name_or_path={model_dir}", f"runs_dir={tmp / 'runs'}", "run=base", "data.eval=",
              "training.max_steps=2", "training.batch_size=4", "lora.r=4", "lora.alpha=8"]
    sft_data = write_jsonl(tmp / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    sft_dir = sft.run(load_config(SFTConfig, None, common + [f"data.train={sft_data}", "samples=0"]))
    rm_dir = reward.run(load_config(RewardConfig, None, common + [f"data.train={pairs}"]))
    return {"model": model_dir, "sft": sft_dir, "reward": rm_dir, "prompts": pairs, "tmp": tmp}


def make_cfg(tmp_path, peaky, *overrides):
    return load_config(PPOConfig, None, [
        f"model.name_or_path={peaky['model']}", f"runs_dir={tmp_path / 'runs'}", "run=p",
        f"data.train={peaky['prompts']}", f"init_from_sft={peaky['sft']}", f"reward_model={peaky['reward']}",
        "rollout.batch_size=8", "rollout.max_new_tokens=4", "training.batch_size=8", "training.learning_rate=1e-3",
        "training.max_steps=3", "training.save_steps=100", "eval_prompts=", "ppo.kl_coef=0.05", *overrides])


def contains_token(target: int):
    """A programmatic reward: 1.0 for an answer that contains `target`, else 0.0."""
    def rewards(self, batch, prompts, texts):
        return (((batch.responses == target) & (batch.resp_mask > 0)).any(1)).float()
    return rewards


def first_token_reward(self, batch, prompts, texts):
    """A reward that differs between answers: their first token's id modulo 7, over 7."""
    return (batch.responses[:, 0] % 7).float() / 7


def most_common_token(roles: Roles, prep) -> int:
    """The token the untrained policy samples most often: a target it sometimes hits, so a reward is seen."""
    torch.manual_seed(0)
    batch, _ = ppo.rollout(roles, prep, list(range(len(prep.train.encoded))))
    tokens = batch.responses[batch.resp_mask > 0]
    return int(torch.mode(tokens).values)


def test_reward_rises_on_a_programmatic_reward_with_kl_below_the_ceiling(tmp_path, peaky, monkeypatch):
    cfg = make_cfg(tmp_path, peaky, "training.max_steps=15", "init_from_sft=")
    prep = ppo.setup(cfg)
    target = most_common_token(ppo.build_roles(prep), prep)
    monkeypatch.setattr(Roles, "rewards", contains_token(target))
    out = ppo.run(cfg)
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert len(history) == 15
    rewards = [h["reward_mean"] for h in history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert last >= first + 0.25, rewards
    assert max(h["kl"] for h in history) < cfg.ppo.kl_ceiling
    logged = {"reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clip_fraction", "value_loss",
              "explained_variance", "response_tokens", "no_eos_share", "generation_seconds", "train_seconds",
              "policy_loss", "approx_kl", "grad_norm_policy", "grad_norm_value"}
    assert logged <= set(history[-1])
    # artifacts: the policy adapter at the top (plain PEFT), the value adapter and head in value/
    assert (out / "adapter_model.safetensors").is_file() and (out / "value" / "adapter_model.safetensors").is_file()
    assert load_file(out / "value" / "value_head.safetensors")["weight"].shape == (1, 64)
    assert not any(".reference." in k or ".reward." in k for k in load_file(out / "adapter_model.safetensors"))


def test_one_base_holds_all_four_roles_and_the_reward_role_scores_like_the_reward_model(tmp_path, peaky):
    from align.serving.score import load_reward_model

    prep = ppo.setup(make_cfg(tmp_path, peaky))
    roles = ppo.build_roles(prep)
    model = roles.model
    assert {POLICY, REFERENCE, REWARD, VALUE} <= set(model.peft_config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{POLICY}." in n or f".{VALUE}." in n for n in trainable)
    assert any(f".{VALUE}." in n for n in trainable) and roles.value_head.weight.requires_grad
    # one copy of the base: every base tensor once, as many as a fresh model has
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(peaky["model"]))
    assert len({p.data_ptr() for p in base}) == len(list(fresh.parameters()))
    assert sum(p.numel() for p in base) == sum(p.numel() for p in fresh.parameters())
    # run every role on one rollout; the roles give different answers, and no weight moved
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    batch, r = ppo.rollout(roles, prep, [0, 1, 2])
    assert torch.allclose(r.old_logp, r.ref_logp, atol=1e-5)  # the policy starts as the frozen SFT adapter
    with roles.role(VALUE):
        assert not torch.allclose(roles.policy_logps(batch), r.old_logp)  # another adapter, another network
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    # the reward role (adapter + head on the shared base) scores exactly as the reward model loaded on its own
    rm = load_reward_model(peaky["reward"], "cpu")
    seqs = []
    for i in range(3):
        resp = batch.responses[i][batch.resp_mask[i] > 0].tolist()
        seqs.append(prep.train.encoded[i] + resp)
    alone = torch.tensor(rm.score(seqs))
    assert torch.allclose(r.scores, alone, atol=1e-4), (r.scores, alone)


def test_a_nan_reward_skips_the_step_and_a_run_of_them_stops_training(tmp_path, peaky, monkeypatch, caplog):
    calls = {"n": 0}

    def sometimes_nan(self, batch, prompts, texts):
        calls["n"] += 1
        scores = torch.zeros(len(texts))
        if calls["n"] == 2 or calls["n"] >= 4:
            scores[1] = float("nan")
        return scores

    monkeypatch.setattr(Roles, "rewards", sometimes_nan)
    caplog.set_level(logging.ERROR, logger="align.stages.ppo")
    with pytest.raises(ppo.TrainingStopped, match="3 PPO steps in a row failed on non-finite"):
        ppo.run(make_cfg(tmp_path, peaky, "training.max_steps=10"))
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 4 and "step 2" in skipped[0] and "non-finite reward" in skipped[0]
    assert "prompt 'What is" in skipped[0]  # the offending sample is shown
    assert not (tmp_path / "runs/p/ppo").exists()  # no half-written output


def test_kl_above_the_ceiling_stops_the_run(tmp_path, peaky, monkeypatch):
    monkeypatch.setattr(Roles, "rewards", lambda self, batch, prompts, texts: batch.responses[:, 0].float() % 7)
    cfg = make_cfg(tmp_path, peaky, "training.learning_rate=3e-2", "training.max_steps=30", "ppo.kl_coef=0",
                   "ppo.kl_ceiling=0.5", "ppo.kl_ceiling_steps=2", "training.save_steps=1")
    with pytest.raises(ppo.TrainingStopped, match="kl_ceiling=0.5 for 2 steps"):
        ppo.run(cfg)
    assert list((tmp_path / "runs/p/ppo.work").glob("checkpoint-*"))  # the last checkpoint is kept


def test_resume_continues_the_same_trajectory(tmp_path, peaky, monkeypatch):
    monkeypatch.setattr(Roles, "rewards", contains_token(500))
    whole = ppo.run(make_cfg(tmp_path / "a", peaky, "training.max_steps=4", "training.save_steps=2",
                             "ppo.target_kl=0.1", "ppo.kl_horizon=10"))  # adaptive KL: its state must resume too
    real_save = online.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(online, "save_checkpoint", save_then_crash)
    cfg = make_cfg(tmp_path / "b", peaky, "training.max_steps=4", "training.save_steps=2", "ppo.target_kl=0.1",
                   "ppo.kl_horizon=10")
    with pytest.raises(KeyboardInterrupt):
        ppo.run(cfg)
    monkeypatch.setattr(online, "save_checkpoint", real_save)
    resumed = ppo.run(cfg)
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((resumed / "metrics.json").read_text())
    assert b["resumed_from"] == "checkpoint-2"
    for key in ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss"):
        assert [h[key] for h in b["log_history"]] == pytest.approx([h[key] for h in a["log_history"]], abs=1e-6), key
    wa, wb = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_the_loop_state_round_trips_through_a_checkpoint_in_the_format_earlier_runs_wrote(tmp_path):
    from transformers import get_scheduler

    from align.rl.advantages import KLController, RunningMoments
    from align.runtime.checkpoint import STATE, load_checkpoint, save_checkpoint

    def optimizer_and_scheduler():
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
        return optimizer, get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)

    optimizer, scheduler = optimizer_and_scheduler()
    state = ppo.LoopState(scheduler, KLController(0.1, 0.5, 10), RunningMoments(), step=3,
                          log_history=[{"step": 3, "kl": 0.25}], kl_over=1)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state.controller.update(2.0, 4)
    state.moments.update(torch.tensor([1.0, 2.0, 5.0]))
    path = save_checkpoint(tmp_path, state.step, {"w": torch.ones(2)}, optimizer, state.to_checkpoint(), keep=1)
    # the keys checkpoints written before LoopState hold: a resume reads those as well
    assert set(json.loads((path / STATE).read_text())) == {"log_history", "kl_over", "bad_steps", "scheduler",
                                                           "controller", "moments", "step", "param_groups"}
    optimizer, fresh = optimizer_and_scheduler()
    back = ppo.LoopState.from_checkpoint(load_checkpoint(path, optimizer)[1], fresh)
    assert back.scheduler is fresh and fresh.state_dict() == scheduler.state_dict()
    assert fresh.get_last_lr() == scheduler.get_last_lr() != [0.001]
    assert (back.controller, back.moments) == (state.controller, state.moments) != (KLController(0.1, 0.5, 10),
                                                                                    RunningMoments())
    assert (back.step, back.log_history, back.kl_over, back.bad_steps) == (3, [{"step": 3, "kl": 0.25}], 1, 0)


def test_setup_errors_name_the_fix(tmp_path, peaky):
    from align.runtime.errors import ConfigError, ModelError

    with pytest.raises(ConfigError, match="rewards names reward_model, but reward_model= is empty"):
        ppo.setup(make_cfg(tmp_path, peaky, "reward_model="))
    with pytest.raises(ModelError, match="is a 'sft' stage output"):
        ppo.setup(make_cfg(tmp_path, peaky, f"reward_model={peaky['sft']}"))


def test_recipe_script_runs_as_a_user_runs_it(tmp_path, peaky):
    # the script file runs as __main__ in this process (tests/test_cli.py runs one recipe script as a real process)
    proc = run_recipe("ppo", f"model.name_or_path={peaky['model']}", f"data.train={peaky['prompts']}",
                      f"init_from_sft={peaky['sft']}", f"reward_model={peaky['reward']}", "training.max_steps=2",
                      "rollout.batch_size=4", "rollout.max_new_tokens=4", "training.batch_size=4", "eval_limit=2",
                      "max_new_tokens=4", f"eval_prompts={peaky['prompts']}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ppo finished: runs/demo/ppo" in proc.stdout and "reward_last" in proc.stdout
    out = tmp_path / "runs/demo/ppo"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(peaky["model"]), str(out))
    assert policy.active_adapter == "default"
    assert json.loads((out / "manifest.json").read_text())["reward_model"] == str(Path(peaky["reward"]).resolve())


def one_step(tmp_path, peaky, monkeypatch, *overrides):
    """One PPO step with gradient checkpointing on: the LoRA B weights before it, all weights after, the output.
    Raw rewards (not normalised) so that the value model starts as the reward model and its adapter gets
    gradients in this first step (a zero head, the normalised start, passes none back to it), and rewards that
    differ between answers, so the policy's advantages are not all zero."""
    monkeypatch.setattr(Roles, "rewards", first_token_reward)
    cfg = make_cfg(tmp_path, peaky, "training.gradient_checkpointing=true", "training.max_steps=1",
                   "ppo.normalize_reward=false", *overrides)
    roles = ppo.build_roles(ppo.setup(cfg))
    before = {n: p.detach().clone() for n, p in roles.model.named_parameters() if "lora_B" in n}
    monkeypatch.setattr(ppo, "build_roles", lambda prep: roles)
    out = ppo.run(cfg)
    return before, dict(roles.model.named_parameters()), out


def test_nf4_base_with_checkpointing_runs_all_roles(tmp_path, peaky, monkeypatch):
    before, now, out = one_step(tmp_path, peaky, monkeypatch, "model.quantization=nf4")
    assert any(not torch.equal(v, now[n]) for n, v in before.items() if f".{POLICY}." in n)
    assert all(torch.equal(v, now[n]) for n, v in before.items() if f".{REFERENCE}." in n or f".{REWARD}." in n)
    assert json.loads((out / "manifest.json").read_text())["quantization"] == "nf4"


def test_a_reward_model_on_another_base_is_loaded_separately_and_said_so(tmp_path, peaky, tiny_reward_run, caplog):
    caplog.set_level(logging.WARNING, logger="align.stages.ppo")
    cfg = make_cfg(tmp_path, peaky, f"reward_model={tiny_reward_run}", "training.max_steps=2")
    prep = ppo.setup(cfg)
    roles = ppo.build_roles(prep)
    assert roles.separate_rm is not None and REWARD not in roles.model.peft_config
    assert any("loaded separately" in r.getMessage() for r in caplog.records)
    torch.manual_seed(0)
    batch, r = ppo.rollout(roles, prep, [0, 1])
    assert r.scores.shape == (2,) and torch.isfinite(r.scores).all()
    # the separate reward model scores the decoded answers exactly as `align score` would
    from align.serving.score import ScoreRow
    seqs = []
    for prompt, text in zip(r.prompts, r.texts):
        seqs += roles.separate_rm.encode(ScoreRow(prompt, [[{"role": "assistant", "content": text or " "}]]))
    assert torch.allclose(r.scores, torch.tensor(roles.separate_rm.score(seqs)))


def test_the_value_model_learns_at_its_own_rate_and_leaves_the_policy_alone(tmp_path, peaky, monkeypatch):
    monkeypatch.setattr(Roles, "rewards", contains_token(500))
    # raw rewards: the value model then starts as the reward model, adapter and head (see one_step)
    slow = ppo.run(make_cfg(tmp_path / "a", peaky, "training.max_steps=1", "ppo.normalize_reward=false"))
    fast = ppo.run(make_cfg(tmp_path / "b", peaky, "training.max_steps=1", "ppo.normalize_reward=false",
                            "ppo.value_learning_rate=1e-2"))
    # one step: the advantages come from values estimated before any update, so the policy's update is the same
    pa, pb = load_file(slow / "adapter_model.safetensors"), load_file(fast / "adapter_model.safetensors")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    # the value model starts as the reward model; AdamW moves each weight by about lr per step, so 10× the rate
    # moves it about 10× as far (its loss weight value_coef would not)
    start = load_file(peaky["reward"] / "adapter_model.safetensors")

    def moved(run: Path) -> float:
        value = load_file(run / "value" / "adapter_model.safetensors")
        common = [k for k in value if k in start and value[k].shape == start[k].shape]
        assert common
        return float(sum((value[k] - start[k]).abs().sum() for k in common))

    assert moved(fast) > 5 * moved(slow) > 0


def test_tiled_mlps_train_the_policy_and_value_and_leave_frozen_roles(tmp_path, peaky, monkeypatch):
    """training.mlp_tiles in PPO: rollouts (no gradients) take the plain MLP, updates the tiled one; the policy's
    and the value model's adapters both learn through it, the frozen roles' stay as they were."""
    tiled_backwards = count_tiled_backwards(monkeypatch)
    before, now, _ = one_step(tmp_path, peaky, monkeypatch, "training.mlp_tiles=2")
    assert tiled_backwards[0] > 0
    for role in (POLICY, VALUE):
        assert any(not torch.equal(v, now[n]) for n, v in before.items() if f".{role}." in n and ".mlp." in n)
    assert all(torch.equal(v, now[n]) for n, v in before.items() if f".{REFERENCE}." in n or f".{REWARD}." in n)


def test_value_gradients_under_checkpointing_equal_the_plain_ones(tmp_path, peaky):
    """The update's value forward runs as the value adapter and its backward after the role ended; with gradient
    checkpointing (the GPU default) the recomputed layers must still be the value adapter's."""
    grads = {}
    for checkpointing in ("false", "true"):
        cfg = make_cfg(tmp_path / checkpointing, peaky, f"training.gradient_checkpointing={checkpointing}",
                       "lora.dropout=0")
        prep = ppo.setup(cfg)
        roles = ppo.build_roles(prep)
        torch.manual_seed(0)
        batch, _ = ppo.rollout(roles, prep, list(range(4)))
        roles.model.train()
        with roles.role(VALUE):
            values = roles.values(batch)
        (values ** 2).mean().backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in roles.model.named_parameters()
                                if f".{VALUE}." in n and p.grad is not None}
    plain, recomputed = grads["false"], grads["true"]
    assert plain.keys() == recomputed.keys() and len(plain) > 0
    for n, g in plain.items():
        assert (recomputed[n] - g).abs().max() <= 1e-4 * g.abs().max().clamp(min=1e-8), n
