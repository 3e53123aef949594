"""Config parsing and every kind of config error — all before any model is loaded."""

import pytest
from conftest import ROOT

from align.runtime.config import SFTConfig, all_keys, describe, load_config, to_yaml
from align.runtime.errors import ConfigError


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("run: a\ntraining:\n  learning_rate: 0.001\n  batch_size: 4\nlora:\n  r: 8\n")
    cfg = load_config(SFTConfig, cfg_file, ["training.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]",
                                             "model.name_or_path=/models/x", "data.eval="])
    assert cfg.run == "a"
    assert cfg.training.learning_rate == pytest.approx(1e-4)  # YAML reads "1e-4" as a string; it is coerced
    assert cfg.training.batch_size == 4
    assert cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.name_or_path == "/models/x"
    assert cfg.data.eval is None


def test_defaults_match_shipped_recipe_keys():
    cfg = load_config(SFTConfig, ROOT / "recipes/configs/sft.yaml")
    assert cfg.model.name_or_path is None  # the embedded default
    assert cfg.data.train == "reward_data/sft/train.jsonl"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, ["training.epochs=2", "lora.alpha=8"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(SFTConfig, path) == cfg


@pytest.mark.parametrize("override, message", [
    ("training.learning_rat=1", "unknown config key 'training.learning_rat' (did you mean 'training.learning_rate'?)"),
    ("learning_rate=1", "unknown config key 'learning_rate' (did you mean 'training.learning_rate'?)"),
    ("lora.rank=4", "unknown config key 'lora.rank'"),
    ("training.batch_size=abc", "config key 'training.batch_size' = 'abc': expected an integer, got str"),
    ("lora.r=true", "config key 'lora.r' = True: expected an integer, got bool"),
    ("data.limit=2.5", "config key 'data.limit' = 2.5: expected an integer"),
    ("training.learning_rate=fast", "config key 'training.learning_rate' = 'fast': expected a number"),
    ("training.report_to=wandb", "config key 'training.report_to' = 'wandb': expected a list of strings"),
    ("model.quantization=nf5", "must be one of auto, nf4, none (did you mean 'nf4'?)"),
    ("training.batch_size=0", "config key 'training.batch_size' = 0: must be >= 1"),
    ("training.learning_rate=-1", "config key 'training.learning_rate' = -1.0: must be > 0"),
    ("lora.dropout=1.5", "config key 'lora.dropout' = 1.5: must be in [0, 1)"),
    ("data.max_reject_share=2", "config key 'data.max_reject_share' = 2.0: must be in [0, 1]"),
    ("run=a/b", "config key 'run' = 'a/b': must be a non-empty name without '/'"),
    ("training=3", "'training' must be a mapping of keys, got int"),
    ("training.seed", "override 'training.seed' is not of the form key=value"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, [override])
    assert message in str(e.value)


def test_unknown_key_in_yaml_names_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epoch: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'training.epoch' \(did you mean 'training.epochs'\?\)"):
        load_config(SFTConfig, path)


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "the top level must be a mapping"),
    ("training: [1, 2\n", "not valid YAML"),
    ("lora:\n  r: -3\n", "config key 'lora.r' = -3: must be >= 1"),
])
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(SFTConfig, path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")


def test_help_lists_every_leaf_key():
    text = "\n".join(describe(SFTConfig))
    leaves = [k for k in all_keys(SFTConfig) if k not in ("model", "lora", "data", "training")]
    for key in leaves:
        assert f"  {key} = " in text, key
