"""The GRPO stage on a tiny Llama: it learns a reward given as the user's own Python function, holds one base with
the reference untouched (and absent when beta is 0), resumes exactly, and stops with a clear message on each way
a reward function can fail."""

import json

import pytest
import torch
from conftest import run_align, write_jsonl
from safetensors.torch import load_file
from test_ppo import peaky  # noqa: F401 - the module's tiny peaked Llama with SFT and reward runs

from align.modeling.roles import POLICY, REFERENCE, REWARD, Roles
from align.runtime.config import GRPOConfig, PPOConfig, load_config
from align.runtime.errors import ConfigError, DataError, RewardError
from align.stages import grpo, online, ppo


@pytest.fixture(scope="module")
def prompts(peaky):  # noqa: F811
    rows = [{"prompt": f"What is {a} + {b}?", "answer": a + b} for a in range(2, 10) for b in (3, 7)]
    return write_jsonl(peaky["tmp"] / "grpo-prompts.jsonl", rows)


def make_cfg(tmp_path, peaky, prompts, *overrides):  # noqa: F811
    return load_config(GRPOConfig, None, [
        f"model.name_or_path={peaky['model']}", f"runs_dir={tmp_path / 'runs'}", "run=g", f"data.train={prompts}",
        f"init_from_sft={peaky['sft']}", "rollout.batch_size=4", "rollout.max_new_tokens=4",
        "grpo.num_generations=4", "training.batch_size=8", "training.learning_rate=1e-3", "training.max_steps=3",
        "training.save_steps=100", "eval_prompts=", *overrides])


def reward_file(tmp_path, body: str, name: str = "my_rewards.py"):
    path = tmp_path / name
    path.write_text(body)
    return path


def common_text(peaky, prompts, tmp_path) -> str:  # noqa: F811
    """The decoded token the untrained policy samples most often: a target it sometimes hits."""
    cfg = make_cfg(tmp_path, peaky, prompts, "init_from_sft=", "rewards=[format]")
    prep = grpo.setup(cfg)
    roles = grpo.build_roles(prep)
    torch.manual_seed(0)
    batch, _ = grpo.sample_groups(roles, prep, list(range(8)))
    tokens = batch.responses[batch.resp_mask > 0]
    counts = torch.bincount(tokens)
    for t in counts.argsort(descending=True).tolist():
        text = prep.tokenizer.decode([t]).strip()
        if text and text.isprintable() and "'" not in text and "\\" not in text:
            return text
    raise AssertionError("no printable token sampled")


def test_grpo_learns_a_users_reward_function(tmp_path, peaky, prompts):  # noqa: F811
    text = common_text(peaky, prompts, tmp_path)
    fn = reward_file(tmp_path, f"def says_it(prompt, answer, row):\n    return float({text!r} in answer)\n")
    cfg = make_cfg(tmp_path, peaky, prompts, "training.max_steps=12", "init_from_sft=",
                   f"rewards=[{fn}:says_it, {{source: format, weight: 0.5}}]")
    out = grpo.run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["log_history"]
    assert len(history) == 12
    rewards = [h[f"reward_{fn}:says_it"] for h in history]
    assert sum(rewards[-4:]) / 4 >= sum(rewards[:3]) / 3 + 0.25, rewards
    logged = {"reward_mean", "reward_std", "reward_format", "group_std", "uniform_share", "response_tokens",
              "no_eos_share", "kl", "entropy", "clip_low_fraction", "clip_high_fraction", "approx_kl", "loss",
              "grad_norm_policy", "generation_seconds", "train_seconds", "trained_answers"}
    trained = [h for h in history if h["trained_answers"]]
    assert trained and logged <= set(trained[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["name"] for r in manifest["rewards"]] == [f"{fn}:says_it", "format"]
    # a changed reward function is a changed input: the finished stage is trained again, not reused
    assert f"reward:{fn}:says_it" in manifest["inputs"]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and not any(".reference." in k or ".reward." in k for k in weights)


def test_one_base_the_reference_untouched_and_absent_when_beta_is_zero(tmp_path, peaky, prompts, monkeypatch):  # noqa: F811
    prep = grpo.setup(make_cfg(tmp_path, peaky, prompts, "rewards=[reward_model, gold]",
                               f"reward_model={peaky['reward']}", "grpo.skip_uniform_groups=false"))
    roles = grpo.build_roles(prep)
    model = roles.model
    assert set(model.peft_config) == {POLICY, REFERENCE, REWARD}
    assert all(f".{POLICY}." in n for n, p in model.named_parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if f".{POLICY}." not in n}
    policy = {n: p.detach().clone() for n, p in model.named_parameters() if f".{POLICY}." in n}
    from accelerate import Accelerator
    state = grpo.LoopState(None)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(named.values(), lr=1e-2)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(1)
    m = grpo._step(prep, roles, state, 0, opt, {"policy": list(named.values())}, Accelerator(cpu=True))
    assert m is not None and "reward_reward_model" in m and "reward_gold" in m and "kl" in m
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)  # reference, RM
    assert m["trained_answers"] == 16  # 4 prompts × 4 answers, none left out
    assert any(not torch.equal(policy[n], p) for n, p in model.named_parameters() if n in policy)

    # beta = 0: no reference adapter is added and the reference is never run
    prep = grpo.setup(make_cfg(tmp_path / "b0", peaky, prompts, "grpo.beta=0", "rewards=[gold]"))
    roles = grpo.build_roles(prep)
    assert set(roles.model.peft_config) == {POLICY}
    called = []
    real_role = Roles.role
    monkeypatch.setattr(Roles, "role", lambda self, name: called.append(name) or real_role(self, name))
    _, groups = grpo.sample_groups(roles, prep, [0, 1])
    assert groups.ref_logp is None and REFERENCE not in called
    assert groups.rewards.shape == (8,)  # 2 prompts × 4 answers


def test_resume_continues_the_same_run(tmp_path, peaky, prompts, monkeypatch):  # noqa: F811
    args = ("training.max_steps=4", "training.save_steps=2", "rewards=[gold, {source: format, weight: 2}]",
            "grpo.skip_uniform_groups=false")
    whole = grpo.run(make_cfg(tmp_path / "a", peaky, prompts, *args))
    real_save = online.save_checkpoint

    def save_then_crash(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(online, "save_checkpoint", save_then_crash)
    cfg = make_cfg(tmp_path / "b", peaky, prompts, *args)
    with pytest.raises(KeyboardInterrupt):
        grpo.run(cfg)
    monkeypatch.setattr(online, "save_checkpoint", real_save)
    resumed = grpo.run(cfg)
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((resumed / "metrics.json").read_text())
    assert b["resumed_from"] == "checkpoint-2"
    for key in ("reward_mean", "reward_gold", "reward_format", "kl", "loss", "response_tokens"):
        assert [h[key] for h in b["log_history"]] == pytest.approx([h[key] for h in a["log_history"]], abs=1e-6), key
    wa, wb = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_rloo_dr_grpo_and_constant_normalisation_train(tmp_path, peaky, prompts):  # noqa: F811
    out = grpo.run(make_cfg(tmp_path, peaky, prompts, "grpo.advantage=rloo", "grpo.scale_rewards=false",
                            "grpo.loss_norm=constant", "grpo.epochs=2", "rewards=[gold, format]", "grpo.beta=0",
                            "grpo.skip_uniform_groups=false"))
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert len(history) == 3 and all(h["trained_answers"] == 16 and "loss" in h for h in history)
    assert all("kl" not in h for h in history)  # beta = 0: no reference, so no KL (not a KL of 0)


@pytest.mark.parametrize("body, says", [
    ("def r(prompt, answer, row):\n    raise ValueError('no digits here')\n", "raised ValueError: no digits here"),
    ("def r(prompt, answer, row):\n    return 'high'\n", "returned 'high' (str)"),
    ("def r(prompt, answer, row):\n    return None\n", "returned None (NoneType)"),
    ("def r(prompt, answer, row):\n    return float('nan')\n", "returned nan"),
    ("def r(prompt, answer, row):\n    return float('inf')\n", "returned inf"),
])
def test_a_failing_reward_function_stops_naming_function_row_and_value(tmp_path, peaky, prompts, body, says):  # noqa: F811
    fn = reward_file(tmp_path, body)
    with pytest.raises(RewardError) as e:
        grpo.run(make_cfg(tmp_path, peaky, prompts, f"rewards=[{fn}:r]"))
    msg = str(e.value)
    assert f"reward '{fn}:r'" in msg and says in msg
    assert f"{prompts}:" in msg and "prompt 'What is" in msg  # the file and row, and what was asked
    assert not (tmp_path / "runs/g/grpo").exists()  # no half-written output


def test_reward_setup_errors_name_the_fix(tmp_path, peaky, prompts):  # noqa: F811
    fn = reward_file(tmp_path, "def r(prompt, answer, row):\n    return 1.0\nnot_callable = 3\n")
    cases = [
        ("rewards=[nowhere.py:r]", ConfigError, "no such file nowhere.py"),
        (f"rewards=[{fn}:missing]", ConfigError, "has no function 'missing'"),
        (f"rewards=[{fn}:not_callable]", ConfigError, "has no function 'not_callable'"),
        ("rewards=[no_such_module_xyz:r]", ConfigError, "cannot import module 'no_such_module_xyz'"),
        ("rewards=[glod]", ConfigError, "not a known reward"),
        ("rewards=[]", ConfigError, "rewards is empty"),
        ("rewards=[gold, gold]", ConfigError, "names 'gold' twice"),
        ("rewards=[reward_model]", ConfigError, "reward_model= is empty"),
        (f"rewards=[reward_model, {peaky['reward']}]", ConfigError, "one run uses one reward model"),
    ]
    for override, error, says in cases:
        with pytest.raises(error, match=says):
            grpo.setup(make_cfg(tmp_path, peaky, prompts, override, f"reward_model={peaky['reward']}"
                                if "is empty" not in says else "reward_model="))
    broken = reward_file(tmp_path, "import no_such_module_xyz\n", "broken.py")
    with pytest.raises(ConfigError, match="importing .*broken.py failed: ModuleNotFoundError"):
        grpo.setup(make_cfg(tmp_path, peaky, prompts, f"rewards=[{broken}:r]"))
    # the gold judge needs an integer 'answer': rows without one are rejected with the reason, then the share stops
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": f"What is {a} + 1?"} for a in range(8)])
    with pytest.raises(DataError, match="rejected"):
        grpo.setup(make_cfg(tmp_path, peaky, prompts, f"data.train={bare}"))
    assert "needs an integer 'answer'" in (tmp_path / "runs/g/rejects/grpo-train.jsonl").read_text()
    with pytest.raises(ConfigError, match="clip_high=0.1 is below grpo.clip_low=0.2"):
        make_cfg(tmp_path, peaky, prompts, "grpo.clip_high=0.1")
    with pytest.raises(ConfigError, match="num_generations.*must be >= 2"):
        make_cfg(tmp_path, peaky, prompts, "grpo.num_generations=1")


def test_the_cli_prints_a_reward_failure_as_one_message(tmp_path, peaky, prompts):  # noqa: F811
    fn = reward_file(tmp_path, "def r(prompt, answer, row):\n    return [1]\n")
    cfg = make_cfg(tmp_path, peaky, prompts)
    ran = run_align("grpo", f"model.name_or_path={peaky['model']}", f"runs_dir={tmp_path / 'runs'}", "run=cli",
                    f"data.train={prompts}", f"init_from_sft={peaky['sft']}", "rollout.batch_size=2",
                    "rollout.max_new_tokens=4", "grpo.num_generations=2", "eval_prompts=", f"rewards=[{fn}:r]")
    assert cfg and ran.returncode == 2, ran.stderr
    assert f"error: reward '{fn}:r' returned [1] (list)" in ran.stderr and "Traceback" not in ran.stderr


def test_ppo_takes_reward_functions_without_a_reward_model(tmp_path, peaky, prompts):  # noqa: F811
    cfg = load_config(PPOConfig, None, [
        f"model.name_or_path={peaky['model']}", f"runs_dir={tmp_path / 'runs'}", "run=p", f"data.train={prompts}",
        f"init_from_sft={peaky['sft']}", "rollout.batch_size=4", "rollout.max_new_tokens=4", "training.max_steps=2",
        "eval_prompts=", "rewards=[gold, {source: format, weight: 0.5}]"])
    prep = ppo.setup(cfg)
    roles = ppo.build_roles(prep)
    assert REWARD not in roles.model.peft_config and roles.separate_rm is None
    assert torch.count_nonzero(roles.value_head.weight) == 0  # no reward model to start the value model from
    out = ppo.run(cfg)
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert len(history) == 2 and {"reward_gold", "reward_format"} <= set(history[0])


def test_one_step_per_generation_batch_needs_no_sampling_time_pass(tmp_path, peaky, prompts, monkeypatch):  # noqa: F811
    """With one optimizer step per generation batch the policy computing the loss is the sampler: the separate
    log-prob pass is skipped, and training is the same as with it."""
    args = ("training.batch_size=16", "training.max_steps=2", "rewards=[gold, format]",
            "grpo.skip_uniform_groups=false")
    seen = []
    real = grpo.sample_groups

    def spy(*a, **k):
        batch, groups = real(*a, **k)
        seen.append(groups.old_logp is None)
        return batch, groups

    monkeypatch.setattr(grpo, "sample_groups", spy)
    fast = grpo.run(make_cfg(tmp_path / "fast", peaky, prompts, *args))
    monkeypatch.setattr(grpo, "on_policy", lambda cfg, answers: False)
    slow = grpo.run(make_cfg(tmp_path / "slow", peaky, prompts, *args))
    assert seen == [True, True, False, False]
    a = json.loads((fast / "metrics.json").read_text())["log_history"]
    b = json.loads((slow / "metrics.json").read_text())["log_history"]
    for key in ("reward_mean", "loss", "kl"):
        assert [h[key] for h in a] == pytest.approx([h[key] for h in b], abs=1e-5), key
    wa, wb = load_file(fast / "adapter_model.safetensors"), load_file(slow / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
