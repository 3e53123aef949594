"""Benchmark: align's SFT / reward / DPO stages against plain TRL + PEFT + bitsandbytes on the same
random-initialised model, data and settings — non-padding tokens/s, peak GPU memory, model FLOPs utilisation.

    python bench/compare.py --shapes tiny --steps 2 --warmup 1          # CPU smoke test (no NF4 on CPU)
    python bench/compare.py --shapes qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b --stages sft,reward,dpo --out DIR

For each shape (in the order given) the script builds a random-initialised model of the real sizes
(`ppo_step.build_model`, once; reused), writes synthetic chat data of fixed length ranges, then for each stage runs:

  baseline  plain TRL as a user writes it: AutoModel…from_pretrained(BitsAndBytesConfig(nf4, double quant, bf16
            compute)) → peft.prepare_model_for_kbit_training → trl.SFTTrainer / RewardTrainer / DPOTrainer with
            peft_config=LoraConfig(r=16, alpha=32, dropout=0.05, all-linear), bf16, gradient checkpointing;
  align     align's own stage, unchanged: `align.<stage>.run(load_config(...))`, whose `build_trainer` is wrapped
            only to attach a timing callback to the trainer it returns.

Both train for warmup + steps optimizer steps with the same batch size, learning rate and schedule. A transformers
TrainerCallback reads the wall clock (after torch.cuda.synchronize) at the end of every optimizer step; the first
`--warmup` steps are left out. Non-padding tokens are counted from the batches the trainer hands to its
training_step (sum of attention_mask). Peak memory is torch.cuda.max_memory_allocated from the model load to the
end of training (reset before each run). align's DPO computes the reference log-probs of all pairs once before
training: that time is reported separately and, amortised over the steps, in the DPO speedup.

Model FLOPs per token (approximate; for MFU): forward = 2 × (matmul parameters, lm_head included for causal
stages) + 2 × layers × hidden × seq_len (causal attention); a LoRA step over a frozen base costs forward + an equal
backward (input gradients; activation recomputation not counted); DPO adds one reference forward. MFU = FLOP/s /
the GPU's dense bf16 peak (989 TFLOP/s for an H100/H200).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import platform
import random
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppo_step as ps
import torch
from live_tensors import GIB, at_peak_lines, compiles, metered_training

ROOT = ps.ROOT
GB = ps.GB
log = logging.getLogger("bench.compare")

# Public config.json values of the real models (no weights, no download); the 7B one is in ppo_step.
ps.SHAPES.update({
    "qwen2.5-0.5b": ("qwen2", {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
        "attention_dropout": 0.0, "use_sliding_window": False}),
    "qwen2.5-1.5b": ("qwen2", {
        "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
        "attention_dropout": 0.0, "use_sliding_window": False}),
})
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense bf16 tensor-core peak, FLOP/s
STAGES = ("sft", "reward", "dpo")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}  # = align's defaults
LR, SCHEDULE, WARMUP_RATIO, SEED = 2e-4, "cosine", 0.05, 42  # = align's defaults, given to the baseline too


# ---------------------------------------------------------------------------------------------- data


def word_pool(tok, n: int = 4000) -> list[str]:
    """Lower-case words that are one token each with a leading space, so N words are about N tokens."""
    words = []
    for token, _id in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        if re.fullmatch(r"Ġ[a-z]{3,9}", token):
            words.append(token[1:])
        if len(words) >= n:
            break
    return words


def text(rng: random.Random, pool: list[str], n: int) -> str:
    return " ".join(rng.choice(pool) for _ in range(max(1, n)))


def write_data(tok, out: Path, seq: int, rows: int, seed: int) -> dict[str, Path]:
    """Synthetic chat rows in the shape both tools read (conversational prompt/completion and preference rows).

    SFT: a prompt of seq/4 words and an answer so that the whole is 75–100% of seq. Pairs: a prompt of seq/4 words
    and two different answers of 50–100% of what is left. 64 tokens are kept for the chat template, so no row is
    ever truncated or rejected at max_length = seq.
    """
    pool = word_pool(tok)
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    prompt_words, room = seq // 4, seq - seq // 4 - 64
    def user(s):
        return [{"role": "user", "content": s}]
    def bot(s):
        return [{"role": "assistant", "content": s}]
    sft, pairs = [], []
    for _ in range(rows):
        total = int(seq * rng.uniform(0.75, 1.0)) - 64
        sft.append({"prompt": user(text(rng, pool, prompt_words)), "completion": bot(text(rng, pool, total - prompt_words))})
        pairs.append({"prompt": user(text(rng, pool, prompt_words)),
                      "chosen": bot(text(rng, pool, int(room * rng.uniform(0.5, 1.0)))),
                      "rejected": bot(text(rng, pool, int(room * rng.uniform(0.5, 1.0))))})
    paths = {"sft": out / "sft.jsonl", "pairs": out / "pairs.jsonl"}
    for key, data in (("sft", sft), ("pairs", pairs)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in data))
    return paths


# ---------------------------------------------------------------------------------------------- measuring


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_meter(profile_step: int | None = None):
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        """Wall clock at the end of each optimizer step, and the non-padding tokens the trainer trained on."""

        def __init__(self, profile_step: int | None = None):
            self.profile_step = profile_step  # 0-based optimizer step to profile (None: none)
            self.profiler = None
            self.profile: dict | None = None
            self.tokens = 0
            self.seqs = 0
            self.width = 0
            self.ends: list[tuple[float, int, int, int]] = []  # (time, tokens, sequences, padded tokens) so far
            self.peak_gb = None
            self.started = time.perf_counter()
            self.losses: list[float] = []  # training loss of every optimizer step (logging_steps=1 on both sides)

        def attach(self, trainer):
            inner = trainer.training_step

            def training_step(model, inputs, *args, **kwargs):
                mask = inputs.get("attention_mask")
                ids = inputs.get("input_ids")
                if mask is not None:
                    self.tokens += int(mask.sum())
                elif ids is not None:  # padding-free batches have no mask
                    self.tokens += int(ids.numel())
                if ids is not None:
                    self.seqs += ids.shape[0] if ids.dim() == 2 else 1
                    self.width += int(ids.numel())
                return inner(model, inputs, *args, **kwargs)

            trainer.training_step = training_step
            trainer.add_callback(self)

        def on_step_begin(self, args, state, control, **kwargs):
            if self.profile_step is not None and len(self.ends) == self.profile_step:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                _sync()
                self.profiler = profile(activities=acts)
                self.profiler.__enter__()
                self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            if self.profiler is not None:  # a warm-up step: the profiler's own cost stays out of the timed steps
                wall = time.perf_counter() - self._t
                self.profiler.__exit__(None, None, None)
                self.profile = summarise_profile(self.profiler, wall)
                self.profiler = None
            self.ends.append((time.perf_counter(), self.tokens, self.seqs, self.width))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                self.peak_gb = torch.cuda.max_memory_allocated() / GB

        def summary(self, warmup: int) -> dict:
            if len(self.ends) <= warmup:
                raise RuntimeError(f"only {len(self.ends)} steps ran; need more than --warmup {warmup}")
            t0, k0, s0, w0 = self.ends[warmup - 1] if warmup > 0 else (self.started, 0, 0, 0)
            t1, k1, s1, w1 = self.ends[-1]
            steps = len(self.ends) - warmup
            times = [b[0] - a[0] for a, b in zip(self.ends[max(warmup - 1, 0):], self.ends[max(warmup, 1):])]
            median = sorted(times)[len(times) // 2] if times else None
            return {"timed_steps": steps, "seconds": t1 - t0, "tokens": k1 - k0, "sequences": s1 - s0,
                    "tok_s_median_step": (k1 - k0) / (median * steps) if median else None,
                    "padded_tokens": w1 - w0, "tok_s": (k1 - k0) / (t1 - t0), "step_seconds": times,
                    "losses": self.losses,
                    "mean_seq_len": (k1 - k0) / max(1, s1 - s0), "padding_share": 1 - (k1 - k0) / max(1, w1 - w0)}

    return Meter(profile_step)


def summarise_profile(prof, wall: float, top: int = 15) -> dict:
    """Share of the profiled step the GPU spent running kernels, the kernels that took the most GPU time, and the
    CPU-side ops that took the most host time."""
    from collections import defaultdict

    from torch.autograd import DeviceType

    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            k = kernels[e.name[:90]]
            k[0] += 1
            k[1] += e.time_range.elapsed_us()
    gpu_us = sum(v[1] for v in kernels.values())
    cpu = sorted((e for e in prof.key_averages() if e.device_type == DeviceType.CPU),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"wall_seconds": wall, "gpu_busy_seconds": gpu_us / 1e6, "gpu_busy_share": gpu_us / 1e6 / wall,
            "kernel_launches": sum(v[0] for v in kernels.values()),
            "gpu_kernels": [{"kernel": k, "count": v[0], "gpu_ms": v[1] / 1e3}
                            for k, v in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]],
            "cpu_ops": [{"op": e.key[:90], "count": e.count, "cpu_self_ms": e.self_cpu_time_total / 1e3}
                        for e in cpu]}


def flops_per_token(config, seq_len: float, stage: str) -> float:
    """Model FLOPs of one trained token (see the module docstring)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * config.intermediate_size
    matmul = layers * per_layer + (d * config.vocab_size if stage != "reward" else d)
    forward = 2 * matmul + 2 * layers * heads * hd * seq_len
    return forward * (3 if stage == "dpo" else 2)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------- the two sides


def baseline_trainer(stage: str, model_dir: Path, data: dict[str, Path], s: argparse.Namespace, out: Path):
    """Plain TRL + PEFT + bitsandbytes, written as a user would (the QLoRA recipe)."""
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    bf16 = cuda if getattr(s, "bf16", None) is None else s.bf16  # bench/cpu_memory.py asks for it on a CPU
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if s.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        if cuda:
            kwargs["device_map"] = {"": 0}
    if stage == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if s.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing)
    elif cuda:
        model.to("cuda")
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"],
                             task_type="SEQ_CLS" if stage == "reward" else "CAUSAL_LM")
    common = {"output_dir": str(out), "per_device_train_batch_size": s.batch, "max_steps": s.warmup + s.steps,
              "learning_rate": LR, "lr_scheduler_type": SCHEDULE, "warmup_steps": WARMUP_RATIO, "logging_steps": 1,
              "save_strategy": "no", "report_to": "none", "bf16": bf16, "gradient_checkpointing": s.gradient_checkpointing,
              "seed": SEED, "data_seed": SEED, "use_cpu": not cuda, "dataloader_num_workers": 0, "max_length": s.seq}
    file = data["sft" if stage == "sft" else "pairs"]
    dataset = load_dataset("json", data_files=str(file), split="train")
    cls, config_cls = {"sft": (SFTTrainer, SFTConfig), "reward": (RewardTrainer, RewardConfig),
                       "dpo": (DPOTrainer, DPOConfig)}[stage]
    return cls(model=model, args=config_cls(**common), train_dataset=dataset, processing_class=tokenizer,
               peft_config=peft_config)


def live_meter(s, found: dict):
    """With --at-peak, Trainer.train under LiveTensors (what is alive at the peak, on any device); else nothing."""
    if not getattr(s, "at_peak", False):
        return contextlib.nullcontext()
    return metered_training(found)


def at_peak_result(found: dict) -> dict:
    if "at_peak" not in found:
        return {}
    return {"live_peak_gb": found["peak"] / GIB, "live_weights_gb": found["weights"] / GIB, "at_peak": found["at_peak"]}


def run_baseline(stage: str, model_dir: Path, data: dict[str, Path], s, work: Path) -> dict:
    meter = make_meter(s.warmup - 1 if s.profile else None)
    start = time.perf_counter()
    trainer = baseline_trainer(stage, model_dir, data, s, work / "baseline" / stage)
    setup = time.perf_counter() - start
    meter.attach(trainer)
    tensors: dict = {}
    with live_meter(s, tensors):
        trainer.train()
    result = {"setup_seconds": setup, "peak_gb": meter.peak_gb, **meter.summary(s.warmup), "profile": meter.profile,
              **at_peak_result(tensors)}
    del trainer
    return result


def run_align(stage: str, model_dir: Path, data: dict[str, Path], s, work: Path) -> dict:
    """align's own stage, unchanged; its build_trainer is wrapped only to attach the meter to the trainer."""
    from align.runtime.config import DPOConfig, RewardConfig, SFTConfig, load_config
    from align.stages import dpo, reward, sft

    module, cls = {"sft": (sft, SFTConfig), "reward": (reward, RewardConfig), "dpo": (dpo, DPOConfig)}[stage]
    file = data["sft" if stage == "sft" else "pairs"]
    overrides = [f"model.name_or_path={model_dir}", f"model.quantization={s.quantization}",
                 f"runs_dir={work / 'align-runs'}", f"run={stage}", "overwrite=true", "resume=false",
                 f"data.train={file}", "data.eval=", f"data.max_length={s.seq}", f"training.batch_size={s.batch}",
                 f"training.max_steps={s.warmup + s.steps}", "training.logging_steps=1",
                 "training.save_steps=1000", f"training.gradient_checkpointing={str(s.gradient_checkpointing).lower()}",
                 f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", f"lora.dropout={LORA['dropout']}",
                 f"training.learning_rate={LR}", f"training.lr_scheduler={SCHEDULE}",
                 f"training.warmup_ratio={WARMUP_RATIO}", f"training.seed={SEED}"]
    overrides += {"sft": ["samples=0"], "reward": [], "dpo": ["eval_prompts=", "cache_reference=false"]}[stage]
    overrides += s.align_overrides  # speed options under test, e.g. training.padding_free=true
    cfg = load_config(cls, None, overrides)
    meter = make_meter(s.warmup - 1 if s.profile else None)
    timing = {"ref_seconds": 0.0}
    start = time.perf_counter()
    inner_build = module.build_trainer
    inner_ref = getattr(module, "cached_reference_logps", None)

    def build_trainer(prep):
        trainer = inner_build(prep)
        timing["setup_seconds"] = time.perf_counter() - start
        meter.attach(trainer)
        return trainer

    def cached_reference_logps(*args, **kwargs):
        _sync()
        t = time.perf_counter()
        out = inner_ref(*args, **kwargs)
        _sync()
        timing["ref_seconds"] += time.perf_counter() - t
        return out

    module.build_trainer = build_trainer
    if inner_ref is not None:
        module.cached_reference_logps = cached_reference_logps
    tensors: dict = {}
    try:
        with live_meter(s, tensors):
            module.run(cfg)
    finally:
        module.build_trainer = inner_build
        if inner_ref is not None:
            module.cached_reference_logps = inner_ref
    result = {**timing, "peak_gb": meter.peak_gb, **meter.summary(s.warmup), "overrides": overrides,
              "profile": meter.profile, **at_peak_result(tensors)}
    if stage == "dpo":
        # the reference pass over all pairs, shared out over all steps (the baseline does it inside each step)
        per_step_ref = timing["ref_seconds"] / (s.warmup + s.steps)
        result["tok_s_incl_ref"] = result["tokens"] / (result["seconds"] + per_step_ref * result["timed_steps"])
    return result


# ---------------------------------------------------------------------------------------------- report


def make_row(stage: str, shape: str, params: int, config, base: dict | None, ours: dict | None, peak) -> dict:
    row = {"stage": stage, "model": shape, "params": params}
    for side, r in (("baseline", base), ("align", ours)):
        if r is None:
            continue
        if "error" in r:
            row[f"{side}_error"] = r["error"]
            continue
        tok_s = r.get("tok_s_incl_ref", r["tok_s"])
        row[f"{side}_tok_s"] = tok_s
        row[f"{side}_peak_gb"] = r["peak_gb"]
        fpt = flops_per_token(config, r["mean_seq_len"], stage)
        row[f"{side}_mfu"] = tok_s * fpt / peak if peak else None
        row[f"{side}_detail"] = {k: v for k, v in r.items() if k != "overrides"}
    if "baseline_tok_s" in row and "align_tok_s" in row:
        row["speedup"] = row["align_tok_s"] / row["baseline_tok_s"]
        if stage == "dpo":
            row["align_step_tok_s"] = row["align_detail"]["tok_s"]
            row["speedup_steps_only"] = row["align_step_tok_s"] / row["baseline_tok_s"]
        if row["baseline_peak_gb"] and row["align_peak_gb"]:
            row["memory_ratio"] = row["align_peak_gb"] / row["baseline_peak_gb"]
        a, b = row["align_detail"]["losses"], row["baseline_detail"]["losses"]
        if a and len(a) == len(b):  # same data, model and settings: the curves should agree within noise
            row["loss_max_rel_diff"] = max(abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a, b, strict=True))
    return row


def versions() -> dict:
    out = ps.versions()
    from importlib import metadata
    for name in ("datasets",):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def fmt(v, spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# align vs plain TRL + PEFT + bitsandbytes ({report['date']})", "",
             f"- device: {report['device']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
             (f"- settings: {s['quantization']} base, LoRA r={LORA['r']} alpha={LORA['alpha']} dropout={LORA['dropout']} "
              f"all-linear, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
              f"{'bf16' if s['bf16'] else 'fp32'}, max length {s['seq']}, batch {s['batch']} (rows; a preference "
              f"batch is {2 * s['batch']} sequences), {s['warmup']} warm-up + {s['steps']} timed optimizer steps"),
             ("- data: synthetic chat rows; SFT prompt+answer 75–100% of max length, pairs: prompt max/4, answers "
              "50–100% of the rest (so sequences are padded to the longest in the batch); tok/s counts non-padding "
              "tokens only"), "- GB = GiB (torch.cuda.max_memory_allocated / 2^30), model load to end of training",
             *([("- metered with --at-peak: every op went through a Python meter, so tok/s here are not comparable "
                 "with unmetered runs; the memory composition is at the end")] if s.get("at_peak") else []), "",
             ("| stage | model | baseline tok/s | align tok/s | speedup | baseline peak GB | align peak GB | "
              "memory ratio | baseline MFU | align MFU |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        err = r.get("baseline_error") or r.get("align_error")
        lines.append(
            f"| {r['stage']} | {r['model']} | {fmt(r.get('baseline_tok_s'), ',.0f')} | "
            f"{fmt(r.get('align_tok_s'), ',.0f')} | {fmt(r.get('speedup'), '.2f')}× | "
            f"{fmt(r.get('baseline_peak_gb'), '.2f')} | {fmt(r.get('align_peak_gb'), '.2f')} | "
            f"{fmt(r.get('memory_ratio'), '.2f')}× | {fmt(r.get('baseline_mfu') and 100 * r['baseline_mfu'], '.1f')}% | "
            f"{fmt(r.get('align_mfu') and 100 * r['align_mfu'], '.1f')}% |" + (f" error: {err[:80]}" if err else ""))
    dpo = [r for r in report["rows"] if r["stage"] == "dpo" and "align_step_tok_s" in r]
    if dpo:
        lines += ["", ("align's DPO computes the reference log-probs of all pairs once before training; its tok/s above "
                       "includes that pass shared out over the steps. Training steps alone:"), ""]
        lines += [f"- {r['model']}: {r['align_step_tok_s']:,.0f} tok/s ({r['speedup_steps_only']:.2f}× the baseline); "
                  f"reference pass {r['align_detail']['ref_seconds']:.1f} s" for r in dpo]
    curves = [r for r in report["rows"] if "loss_max_rel_diff" in r]
    if curves:
        lines += ["", "Training loss per optimizer step, baseline → align (the options under test must keep it):", ""]
        lines += [f"- {r['stage']} {r['model']}: " + ", ".join(
            f"{b:.4g}→{a:.4g}" for b, a in zip(r["baseline_detail"]["losses"], r["align_detail"]["losses"],
                                               strict=True)) + f" (largest relative difference "
                  f"{100 * r['loss_max_rel_diff']:.1f}%)" for r in curves]
    lines += ["", ("| stage | model | side | mean s/step | median s/step | tok/s at median step | tokens/step | "
                   "mean non-pad seq len | padding share | setup s |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        for side in ("baseline", "align"):
            d = r.get(f"{side}_detail")
            if d:
                med = sorted(d["step_seconds"])[len(d["step_seconds"]) // 2]
                lines.append(f"| {r['stage']} | {r['model']} | {side} | {d['seconds'] / d['timed_steps']:.3f} | "
                             f"{med:.3f} | {fmt(d.get('tok_s_median_step'), ',.0f')} | "
                             f"{d['tokens'] / d['timed_steps']:,.0f} | {d['mean_seq_len']:.0f} | "
                             f"{100 * d['padding_share']:.1f}% | {d['setup_seconds']:.1f} |")
    for r in report["rows"]:
        for side in ("baseline", "align"):
            d = r.get(f"{side}_detail") or {}
            if d.get("at_peak"):
                lines += at_peak_lines(f"{r['stage']} {r['model']} {side}: live tensors {d['live_peak_gb']:.2f} GiB, "
                                       f"of which weights {d['live_weights_gb']:.2f}", d["at_peak"])
    for r in report["rows"]:
        for side in ("baseline", "align"):
            prof = (r.get(f"{side}_detail") or {}).get("profile")
            if not prof:
                continue
            lines += ["", f"### Profile of one step: {r['stage']} {r['model']} {side}", "",
                      (f"step {prof['wall_seconds']:.3f} s under the profiler; GPU kernels busy "
                       f"{prof['gpu_busy_seconds']:.3f} s ({100 * prof['gpu_busy_share']:.0f}%), "
                       f"{prof['kernel_launches']:,} kernel launches"), ""]
            if prof["gpu_kernels"]:
                lines += ["| kernel (by GPU time) | calls | GPU ms |", "| --- | --- | --- |"]
                lines += [f"| `{o['kernel']}` | {o['count']} | {o['gpu_ms']:.1f} |" for o in prof["gpu_kernels"][:10]]
            lines += ["", "| host op (by self CPU time) | calls | CPU ms |", "| --- | --- | --- |"]
            lines += [f"| `{o['op']}` | {o['count']} | {o['cpu_self_ms']:.1f} |" for o in prof["cpu_ops"][:8]]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny", help="comma-separated: " + ", ".join(sorted(ps.SHAPES)))
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps run first and left out of the timing")
    p.add_argument("--batch", type=int, default=2, help="rows per step, both sides (a pair is 2 sequences)")
    p.add_argument("--seq", type=int, default=None, help="max length (default 2048 on CUDA, 128 on CPU)")
    p.add_argument("--quantization", choices=("auto", "nf4", "none"), default="auto", help="auto: nf4 on CUDA")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None)
    p.add_argument("--sides", default="baseline,align")
    p.add_argument("--profile", action="store_true",
                   help="profile the last warm-up step (torch.profiler; needs --warmup >= 2)")
    p.add_argument("--at-peak", action="store_true",
                   help="meter each run's live tensors at the dispatcher (bench/live_tensors.py) and report what was "
                   "alive at the peak, by operator and shape; the meter slows every step, so its timings are not "
                   "comparable with unmetered runs (eager code only: not with training.compile)")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--deadline", type=float, default=None, help="seconds: start no new run after this")
    p.add_argument("--work", default=str(ROOT / "bench" / "work"))
    p.add_argument("--tokenizer")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--align-overrides", default="", help="space-separated KEY=VALUE overrides for align's side "
                   "only (e.g. 'training.padding_free=true'), to measure one option against the same baseline")
    s = p.parse_args(argv)
    s.align_overrides = s.align_overrides.split()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t_start = time.monotonic()
    cuda = torch.cuda.is_available()
    s.quantization = ("nf4" if cuda else "none") if s.quantization == "auto" else s.quantization
    s.seq = s.seq or (2048 if cuda else 128)
    if s.at_peak and compiles(s.align_overrides):
        p.error("--at-peak meters eager code only (dynamo runs eagerly under its dispatch mode): leave "
                "training.compile out of a metered run")
    if s.profile and s.warmup < 2:
        p.error("--profile profiles the last warm-up step: use --warmup 2 or more")
    if s.gradient_checkpointing is None:
        s.gradient_checkpointing = cuda
    shapes = [x for x in s.shapes.split(",") if x]
    stages = [x for x in s.stages.split(",") if x]
    sides = [x for x in s.sides.split(",") if x]
    for x in shapes:
        if x not in ps.SHAPES:
            p.error(f"unknown shape {x}; one of {', '.join(sorted(ps.SHAPES))}")
    work = Path(s.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = ps.tokenizer_dir(work, s.tokenizer)
    from transformers import AutoConfig, AutoTokenizer

    data = write_data(AutoTokenizer.from_pretrained(tok_dir), work / "compare_data" / str(s.seq), s.seq,
                      s.batch * (s.warmup + s.steps), s.seed)
    date = dt.datetime.now(dt.UTC)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'x86-64'}, {os.cpu_count()} cores)"
    report = {"date": date.isoformat(timespec="seconds"), "device": device, "versions": versions(),
              "settings": {"seq": s.seq, "batch": s.batch, "steps": s.steps, "warmup": s.warmup,
                           "quantization": s.quantization, "gradient_checkpointing": s.gradient_checkpointing,
                           "bf16": cuda, "lora": LORA, "learning_rate": LR, "lr_scheduler": SCHEDULE,
                           "peak_bf16_flops": peak_flops(), "align_overrides": s.align_overrides,
                           "at_peak": s.at_peak},
              "rows": []}
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"compare_{date.strftime('%Y-%m-%d')}{s.tag}"

    def write():
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))

    for shape in shapes:
        if s.deadline and time.monotonic() - t_start > s.deadline:
            log.warning("deadline reached: %s skipped", shape)
            report.setdefault("skipped", []).append(shape)
            continue
        model_dir, _ = ps.build_model(shape, work, tok_dir, s.seed)
        config = AutoConfig.from_pretrained(model_dir)
        params = ps.count_params(config)
        _free()
        for stage in stages:
            results = {}
            for side in sides:
                if s.deadline and time.monotonic() - t_start > s.deadline:
                    log.warning("deadline reached: %s %s %s skipped", shape, stage, side)
                    continue
                _free()
                held = torch.cuda.memory_allocated() / GB if cuda else 0.0
                log.info("=== %s %s %s (%.2f GB held before) ===", shape, stage, side, held)
                try:
                    fn = run_baseline if side == "baseline" else run_align
                    results[side] = fn(stage, model_dir, data, s, work / "compare" / shape)
                    results[side]["held_before_gb"] = held
                    log.info("%s %s %s: %.0f tok/s, peak %s GB", shape, stage, side, results[side]["tok_s"],
                             fmt(results[side]["peak_gb"], ".2f"))
                except Exception as e:  # noqa: BLE001 - record and go on with the next run
                    traceback.print_exc()
                    results[side] = {"error": f"{type(e).__name__}: {e}"}
                _free()
            report["rows"].append(make_row(stage, shape, params, config, results.get("baseline"),
                                           results.get("align"), peak_flops()))
            write()
    md = markdown(report)
    write()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
