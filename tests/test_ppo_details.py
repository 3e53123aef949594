"""PPO's details that are easy to get wrong: where the value model starts, which parameters train (chosen by
adapter name, not by substring), the roles' trainable flags after the adapters-off reference, and a trained
policy kept when its evaluation fails."""

import pytest
import torch
from conftest import ROOT, run_align

from align.modeling.models import adapter_of, adapter_role, add_adapter_from
from align.modeling.roles import POLICY, REFERENCE, VALUE, head_from, make_batch
from align.runtime.config import PPOConfig, load_config
from align.stages import ppo


def cfg_for(tmp_path, tiny_model_dir, sft_run, tiny_reward_run, reward_data_files, *overrides):
    return load_config(PPOConfig, None, [
        f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}", "run=p",
        f"data.train={reward_data_files[0]}", f"init_from_sft={sft_run}", f"reward_model={tiny_reward_run}",
        "rollout.batch_size=4", "rollout.max_new_tokens=4", "training.batch_size=4", "training.max_steps=1",
        "eval_prompts=", "lora.r=4", *overrides])


@pytest.mark.parametrize("normalize", [True, False])
def test_the_value_model_starts_on_the_scale_of_its_targets(tmp_path, tiny_model_dir, sft_run, tiny_reward_run,
                                                            reward_data_files, normalize):
    """With normalised rewards the value head starts at zero (the normalised returns' mean), not at the reward
    model's raw scores; without normalisation it starts as the reward model's head. The value adapter starts
    from the reward model's LoRA weights either way."""
    cfg = cfg_for(tmp_path, tiny_model_dir, sft_run, tiny_reward_run, reward_data_files,
                  f"ppo.normalize_reward={str(normalize).lower()}")
    roles = ppo.build_roles(ppo.setup(cfg))
    rm_head = head_from(tiny_reward_run, roles.value_head.in_features, torch.float32, "cpu")
    assert rm_head.weight.abs().sum() > 0
    if normalize:
        assert torch.equal(roles.value_head.weight, torch.zeros_like(rm_head.weight))
        batch = make_batch([[5, 6, 7]], [[8, 9]], 0, 2, "cpu")
        with torch.no_grad(), roles.role(VALUE):
            assert torch.equal(roles.values(batch), torch.zeros(1, 2))
    else:
        assert torch.equal(roles.value_head.weight, rm_head.weight)
    assert roles.value_head.weight.requires_grad


def test_adapter_of_reads_the_lora_part_of_a_name():
    assert adapter_of("base_model.model.layers.0.self_attn.q_proj.lora_A.value.weight") == "value"
    assert adapter_of("base_model.model.layers.0.attention.value.lora_B.default.weight") == "default"
    assert adapter_of("base_model.model.layers.0.attention.value.weight") is None
    assert adapter_of("x.embed_tokens.lora_embedding_A.reference") == "reference"


class WithValueModule(torch.nn.Module):
    """A base whose attention has a module named `value`, like several architectures do."""

    def __init__(self):
        super().__init__()
        self.value = torch.nn.Linear(4, 4)
        self.query = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.value(x) + self.query(x)


def test_a_base_module_named_like_an_adapter_does_not_make_its_frozen_adapters_trainable(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(WithValueModule(), LoraConfig(r=2, target_modules=["value", "query"]))
    model.save_pretrained(tmp_path / "saved")
    add_adapter_from(model, REFERENCE, tmp_path / "saved")  # frozen
    model.add_adapter(VALUE, LoraConfig(r=2, target_modules=["value", "query"]))
    with adapter_role(model, REFERENCE, (POLICY, VALUE)):
        pass
    flags = {n: p.requires_grad for n, p in model.named_parameters() if ".lora_" in n}
    assert flags["base_model.model.value.lora_A.reference.weight"] is False  # ".value." is in its name
    assert flags["base_model.model.value.lora_A.default.weight"] is True
    assert flags["base_model.model.query.lora_A.value.weight"] is True
    assert all(not p.requires_grad for n, p in model.named_parameters() if adapter_of(n) is None)


def test_the_adapters_off_reference_leaves_the_value_adapter_trainable(tmp_path, tiny_model_dir, tiny_reward_run,
                                                                         reward_data_files):
    """Without an SFT stage the reference is the base with adapters off; PEFT's switch back marks only the active
    adapter trainable, and the value adapter must train all the same."""
    cfg = load_config(PPOConfig, None, [
        f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}", "run=p", "lora.r=4",
        f"data.train={reward_data_files[0]}", f"reward_model={tiny_reward_run}", "eval_prompts="])
    roles = ppo.build_roles(ppo.setup(cfg))
    named = ppo._trainable(roles)
    assert any(adapter_of(n) == VALUE for n in named)
    with roles.role(REFERENCE):
        pass
    assert all(p.requires_grad for p in named.values())


def test_a_failed_evaluation_keeps_the_trained_policy_and_says_how_to_evaluate_it(tmp_path, tiny_model_dir, sft_run,
                                                                                  tiny_reward_run, reward_data_files,
                                                                                  monkeypatch):
    from align.evaluation import evaluate
    from align.runtime.errors import ModelError

    def broken(*args, **kwargs):
        raise ModelError("out of memory while answering")

    monkeypatch.setattr(evaluate, "evaluate_stage_output", broken)
    ran = run_align("ppo", f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}", "run=p",
                    f"data.train={reward_data_files[0]}", f"init_from_sft={sft_run}", f"reward_model={tiny_reward_run}",
                    "rollout.batch_size=4", "rollout.max_new_tokens=4", "training.batch_size=4",
                    "training.max_steps=1", "lora.r=4", f"eval_prompts={reward_data_files[1]}")
    out = tmp_path / "runs" / "p" / "ppo"
    assert ran.returncode == 1, ran.stderr[-2000:]
    assert f"the ppo policy is trained and saved in {out}" in ran.stderr
    assert "align eval --policy" in ran.stderr and "out of memory while answering" in ran.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_only_a_reward_model_the_rewards_used_judges_the_saved_policy(tmp_path):
    # PPO with rewards: [gold] kept the recipe's reward_model=runs/demo/reward, which need not exist: the
    # evaluation after training judged with it and failed (2026-12-07); it judges with the rewards' model only
    from align.cli.main import judging_reward_model
    from align.runtime.config import GRPOConfig

    recipe = ROOT / "recipes/configs/ppo.yaml"
    assert judging_reward_model(load_config(PPOConfig, recipe, ["rewards=[gold]"])) is None
    assert judging_reward_model(load_config(PPOConfig, recipe, [])) == "runs/demo/reward"
    both = load_config(PPOConfig, recipe, ["rewards=[gold, {source: reward_model, weight: 0.5}]", "reward_model=r"])
    assert judging_reward_model(both) == "r"
    grpo_cfg = load_config(GRPOConfig, ROOT / "recipes/configs/grpo.yaml", ["rewards=[gold]", "reward_model=r"])
    assert judging_reward_model(grpo_cfg) is None
