"""Numeric faults and out-of-memory in the transformers/TRL-based stages; reproducibility on CPU."""

import json
from pathlib import Path

import pytest
import torch
from conftest import pair_rows, write_jsonl
from safetensors.torch import load_file

from align.runtime.config import SFTConfig, load_config
from align.runtime.errors import NumericError, OutOfMemory, TrainingStopped
from align.runtime.guards import NonFiniteGuard, check_finite, nonfinite_grads
from align.stages import sft


def sft_cfg(tmp: Path, tiny: Path, *extra: str):
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "sft.jsonl"
    if not data.exists():
        write_jsonl(data, [{"prompt": r["prompt"], "completion": r["chosen"]}
                           for r in pair_rows([(a, b) for a in range(2, 10) for b in (3, 5)])])
    return load_config(SFTConfig, None, [f"model.name_or_path={tiny}", f"runs_dir={tmp / 'runs'}", "run=g",
                                         f"data.train={data}", "data.eval=", "training.max_steps=6",
                                         "training.batch_size=2", "training.save_steps=2", "training.logging_steps=1",
                                         "training.learning_rate=1e-3", "lora.r=4", "lora.alpha=8", "samples=0",
                                         *extra])


class State:
    def __init__(self, step):
        self.global_step = step


class Control:
    should_training_stop = False


def test_guard_drops_non_finite_gradients_and_stops_after_a_run_of_them():
    model = torch.nn.Linear(2, 1)
    guard = NonFiniteGuard("sft", max_bad=2)
    control = Control()
    model.weight.grad = torch.tensor([[1.0, float("nan")]])
    model.bias.grad = torch.tensor([0.5])
    assert nonfinite_grads(list(model.named_parameters())) == ["weight"]
    guard.on_pre_optimizer_step(None, State(4), control, model=model)
    assert model.weight.grad is None and model.bias.grad is None  # the optimizer will leave both alone
    assert guard.skipped == [5] and not control.should_training_stop
    model.weight.grad, model.bias.grad = torch.ones(1, 2), torch.ones(1)  # a good step resets the count
    guard.on_pre_optimizer_step(None, State(5), control, model=model)
    assert guard.in_row == 0 and model.weight.grad is not None
    for step in (6, 7):
        model.weight.grad = torch.full((1, 2), float("inf"))
        guard.on_pre_optimizer_step(None, State(step), control, model=model)
    assert control.should_training_stop and "2 sft steps in a row had non-finite gradients" in guard.stopped


def poison_loss(monkeypatch, steps):
    """Make the training loss NaN on the given optimizer steps (1-based), as a broken batch would."""
    import trl

    real = trl.SFTTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = real(self, model, inputs, *args, **kwargs)
        if self.state.global_step + 1 in steps:
            loss = out[0] if isinstance(out, tuple) else out
            loss = loss * float("nan")
            return (loss, *out[1:]) if isinstance(out, tuple) else loss
        return out

    monkeypatch.setattr(trl.SFTTrainer, "compute_loss", compute_loss)


def test_a_nan_step_is_skipped_and_training_finishes_finite(tmp_path, tiny_model_dir, monkeypatch):
    poison_loss(monkeypatch, {3})
    out = sft.run(sft_cfg(tmp_path, tiny_model_dir))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_steps"] == [3] and metrics["steps"] == 6
    weights = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_run_of_nan_steps_stops_with_a_usable_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    poison_loss(monkeypatch, {3, 4, 5, 6})
    cfg = sft_cfg(tmp_path, tiny_model_dir, "training.max_bad_steps=3")
    with pytest.raises(TrainingStopped, match="3 sft steps in a row had non-finite gradients"):
        sft.run(cfg)
    run_dir = tmp_path / "runs" / "g"
    assert not (run_dir / "sft").exists()  # no output from a stopped run
    ckpts = sorted((run_dir / "sft.work").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-4"]  # step 4 was skipped: weights as at step 2
    for ckpt in ckpts:
        assert all(torch.isfinite(t).all() for f in ckpt.glob("*.safetensors") for t in load_file(f).values())
    monkeypatch.undo()  # the cause is fixed: the same command resumes from the newest checkpoint and finishes
    out = sft.run(cfg)
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == "checkpoint-4"


def test_out_of_memory_is_one_message_naming_stage_batch_and_length(tmp_path, tiny_model_dir, monkeypatch):
    import trl

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trl.SFTTrainer, "training_step", oom)
    with pytest.raises(OutOfMemory) as e:
        sft.run(sft_cfg(tmp_path, tiny_model_dir, "data.max_length=256"))
    assert str(e.value).startswith("sft: out of memory at training.batch_size=2 (grad_accum 1) with sequences up to "
                                   "data.max_length=256 tokens. Halve training.batch_size and double")
    assert not (tmp_path / "runs" / "g" / "sft").exists()


def test_non_finite_weights_are_never_saved():
    with pytest.raises(NumericError, match="lora_A holds NaN or inf values; nothing was saved"):
        check_finite(iter([("ok", torch.ones(2)), ("lora_A", torch.tensor([1.0, float("inf")]))]), "runs/x/sft")
    check_finite(iter([("steps", torch.tensor([1, 2]))]), "runs/x/sft")  # integer tensors are not weights


def test_same_seed_and_config_give_identical_adapters_on_cpu(tmp_path, tiny_model_dir):
    a = sft.run(sft_cfg(tmp_path / "a", tiny_model_dir, "training.max_steps=3"))
    b = sft.run(sft_cfg(tmp_path / "b", tiny_model_dir, "training.max_steps=3"))
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = sft.run(sft_cfg(tmp_path / "c", tiny_model_dir, "training.max_steps=3", "training.seed=7"))
    assert not all(torch.equal(wa[k], load_file(c / "adapter_model.safetensors")[k]) for k in wa)
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["libraries"]["torch"] == torch.__version__
