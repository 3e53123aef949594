"""Merge a stage's LoRA adapter into its base and prove the merge: `align merge --adapter runs/demo/dpo --out DIR`.

The base is read from the run's own config and checked against its manifest, loaded unquantized in the chosen
dtype (an adapter trained over an NF4 base is merged into the dequantized base: the merged model is the base the
adapter would see at full precision, which is not exactly the 4-bit model it was trained against — the drift is
measured and reported), merged (W' = W + (alpha/r)·B·A), and written as a plain Hugging Face directory with the
tokenizer, chat template, generation config and a model card. A reward run keeps its trained score head and
becomes a …ForSequenceClassification directory.

Before the directory appears, the written files are loaded back and compared with the unmerged base + adapter on
probe prompts from the run's data: max |logit difference| and top-1 agreement (policies), score difference
(reward models). Over the thresholds, nothing is kept and the command fails, unless told to accept the drift.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from align.data.pairs import parse_pair
from align.data.rows import _as_messages, read_rows
from align.modeling.formatting import encode_prompt, encode_scored
from align.modeling.heads import sequence_scores
from align.modeling.models import load_base, load_tokenizer
from align.runtime.config import ModelConfig
from align.runtime.errors import MergeVerificationError, ModelError, OutputError
from align.runtime.runs import atomic_dir, atomic_write_json, atomic_write_text, is_nonempty_dir, sha256_path
from align.serving.trained import open_run

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STAMP = "align_merge.json"
STAGES = ("sft", "dpo", "ppo", "grpo", "reward")


@dataclass
class Thresholds:
    """Allowed drift of the merged model from base + adapter run in float32.

    A float32 merge must match to float rounding. A half-precision merge is held to what running the unmerged
    base + adapter in that precision loses anyway: at most twice its logit/score drift and at most 2 points less
    top-1 agreement — merging must not cost more than the precision itself.
    """

    max_logit_diff: float = 1e-3
    min_top1: float = 1.0
    max_score_diff: float = 1e-3

    @classmethod
    def relative_to(cls, unmerged_half: dict[str, float]) -> Thresholds:
        return cls(max(2 * unmerged_half.get("max_logit_diff", 0.0), 1e-3),
                   min(unmerged_half.get("top1_agreement", 1.0) - 0.02, 1.0),
                   max(2 * unmerged_half.get("max_score_diff", 0.0), 1e-3))


def check_output(out: Path, base_path: str, force: bool) -> None:
    """Never into (or around) the base model's directory; never over a non-empty directory without --force."""
    base = Path(base_path).resolve()
    target = out.resolve()
    if base.exists() and (target == base or base in target.parents or target in base.parents):
        raise OutputError(f"--out {out} is the base model's directory or contains it ({base}); choose another "
                          "directory: merging never writes into the base")
    if is_nonempty_dir(out) and not force:
        raise OutputError(f"--out {out} exists and is not empty; choose a new directory or pass --force to replace it")


def probes(cfg, tokenizer, stage: str, n: int) -> list[list[int]]:
    """Token ids of up to n whole examples from the run's data (eval split first): the inputs verification runs."""

    seqs: list[list[int]] = []
    for spec in [s for s in (cfg.data.eval, cfg.data.train) if s]:
        try:
            for _, _, raw in read_rows(spec):
                if len(seqs) >= n:
                    return seqs
                try:
                    if stage == "reward":
                        prompt, chosen, _ = parse_pair(raw)
                        seqs.append(encode_scored(tokenizer, prompt, chosen, cfg.data.max_length))
                    else:
                        seqs.append(encode_prompt(tokenizer, _as_messages(raw.get("prompt") or raw["messages"][:-1],
                                                                          "prompt", "user")))
                except Exception:  # noqa: BLE001 - a probe that does not parse is skipped, not fatal
                    continue
        except (OSError, ValueError) as e:
            log.warning("probe data %s unreadable (%s)", spec, e)
    if not seqs:
        raise ModelError("no probe inputs: the run's data files are gone or unreadable; verification needs them "
                         "(the run's config.yaml names data.train / data.eval)")
    return seqs


@torch.no_grad()
def outputs(model, seqs: list[list[int]], pad_id: int, reward: bool) -> list[torch.Tensor]:
    """Per probe: logits (T, V) for a policy, the (1,) score for a reward model, in float32."""

    out = []
    device = next(model.parameters()).device
    for s in seqs:
        ids = torch.tensor([s], device=device)
        mask = torch.ones_like(ids)
        if reward:
            out.append(sequence_scores(model, ids, mask).float())
        else:
            out.append(model(input_ids=ids, attention_mask=mask).logits[0].float())
    return out


def compare(merged: list[torch.Tensor], reference: list[torch.Tensor], reward: bool) -> dict[str, float]:
    if reward:
        return {"max_score_diff": max((a - b).abs().max().item() for a, b in zip(merged, reference))}
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(merged, reference)])
    return {"max_logit_diff": max((a - b).abs().max().item() for a, b in zip(merged, reference)),
            "top1_agreement": agree.mean().item()}


def failures(result: dict[str, float], t: Thresholds) -> list[str]:
    bad = []
    if result.get("max_logit_diff", 0.0) > t.max_logit_diff:
        bad.append(f"max |logit difference| {result['max_logit_diff']:.3g} > {t.max_logit_diff:g}")
    if result.get("top1_agreement", 1.0) < t.min_top1:
        bad.append(f"top-1 agreement {result['top1_agreement']:.4f} < {t.min_top1:g}")
    if result.get("max_score_diff", 0.0) > t.max_score_diff:
        bad.append(f"max |score difference| {result['max_score_diff']:.3g} > {t.max_score_diff:g}")
    return bad



def _merged_model(peft_model):
    """W' = W + (alpha/r)·B·A in every adapted layer; a reward run's trained score head replaces the base's."""
    return peft_model.merge_and_unload()


def _load_written(path: Path, reward: bool, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    return auto.from_pretrained(str(path), dtype=dtype, use_safetensors=True).eval()


def _unquantized(cfg, dtype: str) -> ModelConfig:
    return ModelConfig(name_or_path=cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, quantization="none",
                       dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)


def _nf4_outputs(ref, cfg, adapter_dir: Path, seqs, pad_id: int, reward: bool):
    """Outputs of the 4-bit base + adapter, as trained, to report how far the merged model drifted from it."""
    from peft import PeftModel

    model_cfg = ModelConfig(name_or_path=cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, quantization="nf4",
                            dtype="float32", trust_remote_code=cfg.model.trust_remote_code)
    base = load_base(ref.path, model_cfg, task="score" if reward else "causal", pad_token_id=pad_id)
    return outputs(PeftModel.from_pretrained(base, str(adapter_dir)).eval(), seqs, pad_id, reward)


def merge(adapter: str, out: str, dtype: str = "fp32", force: bool = False, accept_drift: bool = False,
          n_probes: int = 8) -> dict[str, Any]:
    from peft import PeftModel

    adapter_dir, out_path = Path(adapter), Path(out)
    manifest, cfg, ref = open_run(adapter_dir, STAGES, "--adapter")
    stage = manifest["stage"]
    reward = stage == "reward"
    adapter_hash = sha256_path(adapter_dir / "adapter_model.safetensors")
    stamp = out_path / STAMP
    if stamp.is_file():
        previous = json.loads(stamp.read_text())
        if previous.get("adapter_sha256") == adapter_hash and previous.get("dtype") == dtype:
            return {**previous, "already_merged": True}
    check_output(out_path, ref.path, force)
    tokenizer = load_tokenizer(str(adapter_dir))
    pad_id = tokenizer.pad_token_id
    task = "score" if reward else "causal"
    # merge in float32 (one rounding of W + BA), then cast; compare everything with float32 base + adapter
    base = load_base(ref.path, _unquantized(cfg, "float32"), task=task, pad_token_id=pad_id).cpu()
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    seqs = probes(cfg, tokenizer, stage, n_probes)
    reference = outputs(peft_model, seqs, pad_id, reward)
    thresholds, unmerged_half = Thresholds(), None
    if dtype != "fp32":
        half = load_base(ref.path, _unquantized(cfg, {"bf16": "bfloat16", "fp16": "float16"}[dtype]), task=task,
                         pad_token_id=pad_id).cpu()
        unmerged_half = compare(outputs(PeftModel.from_pretrained(half, str(adapter_dir)).eval(), seqs, pad_id,
                                        reward), reference, reward)
        del half
        thresholds = Thresholds.relative_to(unmerged_half)
    merged = _merged_model(peft_model).to(DTYPES[dtype])
    if reward:
        merged.config.align_max_length = cfg.data.max_length  # `align score` reads the length it was trained with
    else:
        stop_at_turn_end(merged, tokenizer)
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    with atomic_dir(out_path, overwrite=force) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        written = outputs(_load_written(tmp, reward, DTYPES[dtype]), seqs, pad_id, reward)
        result: dict[str, Any] = {**compare(written, reference, reward), "probes": len(seqs)}
        if unmerged_half is not None:
            result["unmerged_in_" + dtype] = unmerged_half
        if manifest.get("quantization") == "nf4":  # reported, not judged: the 4-bit base is not the merge target
            result["drift_from_nf4"] = compare(written, _nf4_outputs(ref, cfg, adapter_dir, seqs, pad_id, reward),
                                               reward)
        bad = failures(result, thresholds)
        summary = {"adapter": str(adapter_dir.resolve()), "adapter_sha256": adapter_hash, "stage": stage,
                   "dtype": dtype, "base_model": manifest["base_model"], "verification": result,
                   "thresholds": asdict(thresholds), "passed": not bad, "accepted_drift": bool(bad) and accept_drift}
        if bad and not accept_drift:
            raise MergeVerificationError(
                f"the merged model does not match base + adapter on {len(seqs)} probes: {'; '.join(bad)}. Nothing "
                f"was written to {out_path}. Pass --accept-drift to keep it anyway, or merge in --dtype fp32")
        atomic_write_json(tmp / STAMP, summary)
        atomic_write_text(tmp / "README.md", model_card(summary, manifest, adapter_dir))
    return summary


def stop_at_turn_end(model, tokenizer) -> None:
    """The merged policy's generation config stops at the token its answers end with (the tokenizer's EOS, the
    turn's end for Gemma or Phi-3), then at the base's own stop ids, so plain `generate` ends answers where align
    does."""
    config = model.generation_config
    base = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    config.eos_token_id = [tokenizer.eos_token_id] + [e for e in base if e is not None and e != tokenizer.eos_token_id]
    config.pad_token_id = tokenizer.pad_token_id


def model_card(summary: dict[str, Any], manifest: dict[str, Any], adapter_dir: Path) -> str:
    metrics_file = adapter_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    win = metrics.get("win_rate") or {}
    shown.update({f"win_rate.{k}": v for k, v in win.items() if isinstance(v, (int, float))})
    kind = "reward model (sequence classification, one score)" if summary["stage"] == "reward" else "causal LM"
    lines = [
        "---", "library_name: transformers", f"base_model: {json.dumps(manifest['base_model'].get('name'))}",
        "tags: [align, lora-merged]", "---", "", f"# Merged {summary['stage']} model ({kind})", "",
        f"Made by `align merge` from the adapter `{summary['adapter']}` (sha256 {summary['adapter_sha256'][:16]}…)"
        f" merged into its base in {summary['dtype']}.", "",
        "## Lineage", "", f"- base model: `{json.dumps(manifest['base_model'])}`",
        f"- stage: {manifest['stage']}, run: {manifest.get('run')}, created {manifest.get('created')}",
        f"- parent: {manifest.get('parent') or 'none'}",
        f"- trained in: {manifest.get('quantization', 'none')}",
        *[f"- input `{k}`: sha256 {v[:16]}…" for k, v in manifest.get("inputs", {}).items()], "",
        "## Metrics of the run", "", *[f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
                                      for k, v in shown.items()], "",
        "## Verification", "", f"Reloaded from this directory and compared with the unmerged base + adapter on "
        f"{summary['verification']['probes']} probe inputs from the run's data:", "",
        *[f"- {k}: {v}" for k, v in summary["verification"].items() if k != "probes"],
        f"- thresholds: {summary['thresholds']}", f"- passed: {summary['passed']}", ""]
    return "\n".join(lines)
