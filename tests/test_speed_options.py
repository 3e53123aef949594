"""Every speed option keeps the loss of the plain path: the same run with and without it, on a tiny Llama, ends
with the same per-step losses and (nearly) the same adapter. Speed itself is measured in bench/, not here."""

import json

import pytest
from conftest import chat, count_tiled_backwards, pair_rows, write_jsonl
from safetensors.torch import load_file

from align.runtime.config import DPOConfig, SFTConfig, load_config
from align.stages import common, dpo, sft


def losses(out) -> list[float]:
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def assert_same_run(plain, fast, atol: float = 1e-4) -> None:
    assert losses(fast) == pytest.approx(losses(plain), rel=1e-4)
    assert len(losses(plain)) >= 3
    a, b = load_file(plain / "adapter_model.safetensors"), load_file(fast / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < atol


def varied_lengths() -> list[dict]:
    """Answers from a few tokens to a few dozen, so a padded batch is mostly padding in its short rows."""
    return [chat(f"What is {a} + {b}?", f"{a} + {b} = {a + b}." + " Let me check it once more." * (a % 5))
            for a in range(2, 14) for b in (3, 7)]


def sft_config(tmp_path, tiny_model_dir, data, *extra: str):
    """A 4-step SFT run on the tiny model, dropout off (so two runs can be compared step by step)."""
    return load_config(SFTConfig, None, [
        f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}", f"data.train={data}",
        f"data.eval={data}", "data.eval_limit=8", "training.learning_rate=5e-3", "training.batch_size=4",
        "training.max_steps=4", "training.logging_steps=1", "lora.r=8", "lora.dropout=0", "samples=0", *extra])


def test_sft_padding_free_equals_padded(tmp_path, tiny_model_dir, monkeypatch):
    from trl.trainer import sft_trainer

    rows_per_batch = {False: set(), True: set()}
    real = sft_trainer.DataCollatorForLanguageModeling.torch_call

    def spy(self, examples):
        out = real(self, examples)
        rows_per_batch[self.padding_free].add(out["input_ids"].shape[0])
        return out

    monkeypatch.setattr(sft_trainer.DataCollatorForLanguageModeling, "torch_call", spy)
    data = write_jsonl(tmp_path / "sft.jsonl", varied_lengths())
    outs = {}
    for flag in (False, True):
        outs[flag] = sft.run(sft_config(tmp_path, tiny_model_dir, data, f"run=pf-{flag}",
                                        f"training.padding_free={flag}"))
    assert rows_per_batch == {False: {4}, True: {1}}  # the option did pack: one row per batch of 4
    assert_same_run(outs[False], outs[True])
    m = {flag: json.loads((out / "metrics.json").read_text()) for flag, out in outs.items()}
    assert m[True]["eval_loss_after"] == pytest.approx(m[False]["eval_loss_after"], rel=1e-4)


def test_packed_answer_logps_equal_padded_ones(tiny_model_dir, reward_data_files):
    """The same pairs, padded or end to end: the same log-probs and token counts, and the same gradients."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data.pairs import pair_loader

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = load_config(DPOConfig, None, [f"data.train={reward_data_files[0]}"])
    pairs = pair_loader(cfg.data)(tok)(str(reward_data_files[0]), "train", 5).encoded
    results = {}
    for packed in (False, True):
        model.zero_grad()
        batch = dpo._batch(pairs, tok.pad_token_id, "cpu", packed)
        logps, counts = dpo.answer_logps(model, batch)
        logps.sum().backward()
        results[packed] = (logps.detach(), counts, model.model.embed_tokens.weight.grad.clone())
        if packed:
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    (lp, n, g), (lp_packed, n_packed, g_packed) = results[False], results[True]
    assert n_packed.tolist() == n.tolist() and len(n) == 10
    assert torch.allclose(lp_packed, lp, atol=1e-4, rtol=1e-5)
    assert torch.allclose(g_packed, g, atol=1e-5, rtol=1e-4)


def test_dpo_padding_free_equals_padded(tmp_path, tiny_model_dir, reward_data_files, sft_run):
    rows = pair_rows([(a, b) for a in range(2, 12) for b in (3, 7)])
    for i, r in enumerate(rows):  # lengths that vary within a batch
        r["chosen"] += " I checked it twice." * (i % 4)
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    outs = {}
    for flag in (False, True):
        cfg = load_config(DPOConfig, None, [
            f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}", f"run=pf-{flag}",
            f"data.train={train}", f"data.eval={reward_data_files[1]}", "data.eval_limit=8",
            f"init_from_sft={sft_run}", "training.learning_rate=5e-3", "training.batch_size=4",
            "training.max_steps=4", "training.logging_steps=1", "beta=0.5", "sft_weight=0.5", "eval_prompts=",
            "lora.dropout=0", f"training.padding_free={flag}"])
        outs[flag] = dpo.run(cfg)
    assert_same_run(outs[False], outs[True])
    m = {flag: json.loads((out / "metrics.json").read_text()) for flag, out in outs.items()}
    assert m[True]["eval_loss"] == pytest.approx(m[False]["eval_loss"], rel=1e-4)


def test_packed_answer_logps_chunked_equal_unchunked(tiny_model_dir, reward_data_files, monkeypatch):
    """Padding-free batches with many answer tokens take the chunked vocabulary projection: same numbers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data.pairs import pair_loader
    from align.modeling import heads

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = load_config(DPOConfig, None, [f"data.train={reward_data_files[0]}"])
    pairs = pair_loader(cfg.data)(tok)(str(reward_data_files[0]), "train", 3).encoded
    batch = dpo._batch(pairs, tok.pad_token_id, "cpu", packed=True)
    results = []
    for chunk in (1 << 40, 1):  # never chunked; one answer token per chunk
        monkeypatch.setattr(heads, "CHUNK_ELEMENTS", chunk)
        model.zero_grad()
        logps, counts = dpo.answer_logps(model, batch)
        logps.sum().backward()
        results.append((logps.detach(), counts, model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    (lp, n, g), (lp_c, n_c, g_c) = results
    assert n.tolist() == n_c.tolist() and min(n.tolist()) > 0
    assert torch.allclose(lp, lp_c, atol=1e-5) and torch.allclose(g, g_c, atol=1e-5, rtol=1e-4)


def test_4bit_base_without_upcast_keeps_bf16_weights_and_the_loss(tmp_path, tiny_model_dir, monkeypatch):
    """model.upcast=false (the default for bfloat16): the unquantized weights of a 4-bit base stay in bfloat16
    instead of float32 copies; trainable weights are float32 either way; the loss curve stays within bfloat16
    rounding of the upcast one."""
    import torch

    from align.modeling import models

    dtypes = {}
    real = models.attach_lora

    def spy(model, *args, upcast=None, **kwargs):
        peft_model = real(model, *args, upcast=upcast, **kwargs)
        embed = peft_model.get_base_model().get_input_embeddings().weight
        trainable = {p.dtype for p in peft_model.parameters() if p.requires_grad}
        dtypes[upcast] = (embed.dtype, trainable)
        return peft_model

    monkeypatch.setattr(common, "attach_lora", spy)
    data = write_jsonl(tmp_path / "sft.jsonl", varied_lengths())
    outs = {}
    for upcast in (True, False):
        cfg = load_config(SFTConfig, None, [
            f"model.name_or_path={tiny_model_dir}", "model.quantization=nf4", "model.dtype=bfloat16",
            f"model.upcast={upcast}", f"runs_dir={tmp_path / 'runs'}", f"run=up-{upcast}", f"data.train={data}",
            "data.eval=", "training.learning_rate=5e-3", "training.batch_size=4", "training.max_steps=4",
            "training.logging_steps=1", "lora.r=8", "lora.dropout=0", "samples=0"])
        outs[upcast] = sft.run(cfg)
    assert dtypes == {True: (torch.float32, {torch.float32}), False: (torch.bfloat16, {torch.float32})}
    plain, lean = losses(outs[True]), losses(outs[False])
    assert len(plain) == 4 and lean == pytest.approx(plain, rel=2e-2)
    assert lean[-1] < lean[0]  # and it learns


def compiled_calls() -> int:
    import torch._dynamo

    return torch._dynamo.utils.counters["stats"]["calls_captured"]


def test_sft_compiled_layers_keep_the_loss(tmp_path, tiny_model_dir):
    """training.compile: the decoder layers run through torch.compile (checked by dynamo's own counter), and the
    run ends with the eager run's losses and adapter (dropout off: compiled dropout draws other random numbers).
    No held-out set: each graph variant costs ~20 s of compilation on a small CPU, and evaluation's losses are not
    what is compared; compiled passes without gradients are compared in DPO (its reference pass)."""
    data = write_jsonl(tmp_path / "sft.jsonl", varied_lengths())
    outs = {}
    for flag in (False, True):
        before = compiled_calls()
        outs[flag] = sft.run(sft_config(tmp_path, tiny_model_dir, data, f"run=c-{flag}", f"training.compile={flag}",
                                        "data.eval="))
        assert (compiled_calls() > before) == flag
    assert_same_run(outs[False], outs[True])


def reward_and_dpo_both_ways(tmp_path, tiny_model_dir, reward_data_files, sft_run, option: str, values: tuple,
                             ran, held_out: bool = True) -> None:
    """The reward model and DPO, each run with `option` at both `values` (the plain one first), end with the same
    losses and adapter; `ran()` counts what only the option does, and must move exactly in the second run."""
    from align.runtime.config import RewardConfig
    from align.stages import reward

    evals = [f"data.eval={reward_data_files[1]}", "data.eval_limit=8"] if held_out else ["data.eval="]
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train={reward_data_files[0]}", *evals,
              "training.learning_rate=5e-3", "training.batch_size=4", "training.max_steps=3",
              "training.logging_steps=1", "lora.dropout=0"]
    for cls, stage, extra in ((RewardConfig, reward, []),
                              (DPOConfig, dpo, [f"init_from_sft={sft_run}", "beta=0.5", "eval_prompts="])):
        outs = []
        for i, value in enumerate(values):
            before = ran()
            outs.append(stage.run(load_config(cls, None, [*common, *extra, f"runs_dir={tmp_path / cls.stage}",
                                                          f"run={option}-{value}", f"{option}={value}"])))
            assert (ran() > before) == (i == 1)
        assert_same_run(*outs)


def test_reward_and_dpo_compiled_layers_keep_the_loss(tmp_path, tiny_model_dir, reward_data_files, sft_run):
    """The same for the reward model (score head outside the compiled layers) and DPO (the frozen reference
    adapter and the policy run through the same compiled layers; its reference pass is a compiled pass without
    gradients, and its log-probs are in every loss compared). No held-out sets, as for SFT above."""
    reward_and_dpo_both_ways(tmp_path, tiny_model_dir, reward_data_files, sft_run, "training.compile",
                             (False, True), compiled_calls, held_out=False)


def test_compile_refused_where_it_cannot_work(tmp_path, monkeypatch):
    """PPO refuses training.compile before anything loads; on a CPU without a C++ compiler the message says which
    compiler to install instead of failing in the first step."""
    import torch

    from align.modeling import compiled
    from align.runtime.config import PPOConfig
    from align.runtime.errors import ConfigError
    from align.stages import ppo

    cfg = load_config(PPOConfig, None, [f"runs_dir={tmp_path}", "training.compile=true", "reward_model=x"])
    with pytest.raises(ConfigError, match="training.compile=true is for SFT, reward and DPO"):
        ppo.setup(cfg)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"C\+\+ compiler \(g\+\+ or clang\+\+\)"):
        compiled.check_compiler(torch.device("cpu"))
    compiled.check_compiler(torch.device("cuda"))  # inductor brings Triton there


def test_tiled_mlp_replays_its_dropout_and_gives_each_weight_one_gradient():
    """The tiled MLP against the same tiles run by plain autograd under the same seed: same output and gradients,
    which needs the backward pass to redraw the forward's dropout masks; each trainable weight's gradient is
    accumulated once per backward (as DistributedDataParallel expects), not once per tile."""
    import torch

    from align.modeling.tiled import _TiledMLP

    torch.manual_seed(0)
    up, down, drop = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8), torch.nn.Dropout(0.5)
    params = [*up.parameters(), *down.parameters()]
    x = torch.randn(2, 7, 8, requires_grad=True)
    weights = torch.randn(2, 7, 8)  # a loss that weighs every output differently

    def mlp(h):
        return down(drop(torch.nn.functional.silu(up(h))))

    accumulated = [0]
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _p: accumulated.__setitem__(0, accumulated[0] + 1))
    results = []
    for tiled in (True, False):
        x.grad = None
        for p in params:
            p.grad = None
        torch.manual_seed(5)
        y = _TiledMLP.apply(mlp, 3, [], x, *params) if tiled else torch.cat([mlp(c) for c in x.chunk(3, dim=-2)], -2)
        (y * weights).sum().backward()
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in params]))
        if tiled:
            assert accumulated[0] == len(params)
    (y_t, gx_t, gp_t), (y_r, gx_r, gp_r) = results
    assert torch.equal(y_t, y_r)
    assert torch.allclose(gx_t, gx_r, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(gp_t, gp_r, strict=True))


def test_sft_tiled_mlp_keeps_the_loss_with_checkpointing(tmp_path, tiny_model_dir, monkeypatch):
    """training.mlp_tiles with gradient checkpointing on (the GPU default, where the tiled MLP sits inside each
    recomputed layer): the same losses and adapter as the plain run."""
    calls = count_tiled_backwards(monkeypatch)
    data = write_jsonl(tmp_path / "sft.jsonl", varied_lengths())
    outs = {}
    for tiles in (1, 3):
        before = calls[0]
        outs[tiles] = sft.run(sft_config(tmp_path, tiny_model_dir, data, f"run=t-{tiles}",
                                         f"training.mlp_tiles={tiles}", "training.gradient_checkpointing=true"))
        assert (calls[0] > before) == (tiles > 1)
    assert_same_run(outs[1], outs[3])


def test_reward_and_dpo_tiled_mlp_keep_the_loss(tmp_path, tiny_model_dir, reward_data_files, sft_run, monkeypatch):
    calls = count_tiled_backwards(monkeypatch)
    reward_and_dpo_both_ways(tmp_path, tiny_model_dir, reward_data_files, sft_run, "training.mlp_tiles", (1, 4),
                             lambda: calls[0])


def test_tiled_mlp_and_compile_are_refused_together(tmp_path, tiny_model_dir):
    from align.runtime.errors import ConfigError

    cfg = sft_config(tmp_path, tiny_model_dir, tmp_path / "x.jsonl", "training.compile=true",
                     "training.mlp_tiles=4")
    with pytest.raises(ConfigError, match="training.compile=true and training.mlp_tiles=4 do not go together"):
        sft.setup(cfg)


def test_tiled_mlp_refuses_an_mlp_that_returns_more_than_a_tensor(tiny_model_dir):
    """Mixture-of-experts blocks return router logits too: a clear error instead of a failed concatenation."""
    import torch
    from transformers import AutoModelForCausalLM

    from align.modeling.tiled import tile_mlps
    from align.runtime.errors import ModelError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for layer in model.model.layers:
        dense = layer.mlp.forward
        layer.mlp.forward = lambda x, dense=dense: (dense(x), None)  # shaped like a router's (output, logits)
    assert tile_mlps(model, 2) == len(model.model.layers)
    with pytest.raises(ModelError, match="returns tuple, not one tensor"):
        model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
