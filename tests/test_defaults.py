"""Defaults a user gets without a YAML are the recipes' (the recipes only add the demo's run paths), and the
DPO family's options fit the loss they are given to."""

import dataclasses

import pytest
from conftest import ROOT

from align.rl.losses import dpo_loss
from align.runtime.config import STAGES, DPOConfig, load_config
from align.runtime.errors import ConfigError

# what a recipe may set that the built-in defaults leave empty: paths into the demo's own runs
DEMO_PATHS = {"init_from_sft", "reward_model"}


def flat(cfg, prefix=""):
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out.update(flat(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name: value})
    return out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_without_config_is_its_recipe(stage):
    built_in = flat(load_config(STAGES[stage]))
    recipe = flat(load_config(STAGES[stage], ROOT / "recipes" / "configs" / f"{stage}.yaml"))
    differ = {k: (built_in[k], recipe[k]) for k in built_in if built_in[k] != recipe[k]}
    assert set(differ) <= DEMO_PATHS, differ
    assert all(built_in[k] is None for k in differ)


def test_dpo_beta_follows_the_loss():
    assert load_config(DPOConfig).beta == 0.1
    assert load_config(DPOConfig, None, ["loss=ipo"]).beta == 0.1
    assert load_config(DPOConfig, None, ["loss=simpo"]).beta == 2.0  # SimPO's own range is 2–10
    assert load_config(DPOConfig, None, ["loss=simpo", "beta=5"]).beta == 5.0  # a given β is kept


@pytest.mark.parametrize("loss", ["ipo", "hinge", "simpo"])
def test_label_smoothing_is_refused_where_the_loss_has_none(loss):
    with pytest.raises(ConfigError, match=f"label_smoothing=0.1 applies to loss=sigmoid only; loss={loss}"):
        load_config(DPOConfig, None, [f"loss={loss}", "label_smoothing=0.1"])
    import torch

    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_loss(x, x, x, x, 0.1, loss, 0.1, torch.ones(2), torch.ones(2))
    assert load_config(DPOConfig, None, ["loss=sigmoid", "label_smoothing=0.1"]).label_smoothing == 0.1


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_demos_held_out_files_follow_the_demos_data_only(stage, tmp_path):
    cls = STAGES[stage]
    demo = load_config(cls)
    mine = load_config(cls, None, [f"data.train={tmp_path / 'mine.jsonl'}"])
    assert mine.data.eval is None  # not the shipped arithmetic rows
    if hasattr(cls, "eval_prompts"):
        assert demo.eval_prompts == "reward_data/prefs/prompts.jsonl" and mine.eval_prompts is None
        own = load_config(cls, None, [f"data.train={tmp_path / 'mine.jsonl'}", f"data.eval={tmp_path / 'held.jsonl'}"])
        assert own.eval_prompts == str(tmp_path / "held.jsonl")  # the prompts of the user's own held-out rows
    named = load_config(cls, None, [f"data.train={tmp_path / 'mine.jsonl'}", "data.eval=reward_data/x.jsonl"])
    assert named.data.eval == "reward_data/x.jsonl"  # a named file is kept


def test_the_pipelines_held_out_files_follow_its_data(tmp_path):
    from align.loop.pipeline import PipelineData
    from align.runtime.config import build

    demo = build(PipelineData, {})
    assert demo.eval_prompts == "reward_data/prefs/prompts.jsonl" and demo.sft_eval == "reward_data/sft/eval.jsonl"
    # the README's next round reads new pairs with the shipped ones: still the demo's held-out files
    again = build(PipelineData, {"preferences": "runs/demo/new.jsonl,reward_data/prefs/train.jsonl"})
    assert again.preferences_eval == "reward_data/prefs/eval.jsonl" and again.eval_prompts == demo.eval_prompts
    mine = build(PipelineData, {"sft": "mine.jsonl", "preferences": "p.jsonl", "preferences_eval": "p-held.jsonl"})
    assert mine.sft_eval is None and mine.eval_prompts == "p-held.jsonl"
    with pytest.raises(ConfigError, match="data.preferences is your own data and has no held-out part"):
        build(PipelineData, {"preferences": "p.jsonl"})
    named = build(PipelineData, {"preferences": "p.jsonl", "eval_prompts": "q.jsonl"})
    assert named.eval_prompts == "q.jsonl" and named.preferences_eval is None


def test_every_report_says_which_judges_decided():
    from align.evaluation.evaluate import judges_used

    assert judges_used({"gold_n": 3}, None) == "the gold judge (arithmetic answers, on the 3 prompts that carry one)"
    assert judges_used({}, "runs/x/reward") == "the reward model runs/x/reward"
    assert judges_used({"gold_n": 0}, None).startswith("no judge")
