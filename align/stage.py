"""What every training stage shares: its directories, resume-or-refuse, trainer arguments, and the final save.

Layout of one stage of one run:
    <runs_dir>/<run>/<stage>/          the finished artifact (appears atomically, last)
    <runs_dir>/<run>/<stage>.work/     checkpoints and the inputs they were made from, while training
    <runs_dir>/<run>/rejects/          rejected data rows with reasons
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import StageConfig, to_yaml
from .errors import OutputError
from .runs import atomic_dir, atomic_write_json, atomic_write_text, is_nonempty_dir, json_hash

log = logging.getLogger(__name__)


@dataclass
class StagePaths:
    run_dir: Path
    out: Path
    work: Path

    @classmethod
    def of(cls, cfg: StageConfig, stage: str) -> StagePaths:
        run_dir = Path(cfg.runs_dir) / cfg.run
        return cls(run_dir, run_dir / stage, run_dir / f"{stage}.work")

    def rejects(self, stage: str, split: str) -> Path:
        return self.run_dir / "rejects" / f"{stage}-{split}.jsonl"


def config_hash(cfg: StageConfig) -> str:
    # overwrite/resume say how to treat old output, not what is trained: they may change between attempts
    return json_hash(to_yaml(dataclasses.replace(cfg, overwrite=False, resume=True)))


def newest_checkpoint(work: Path) -> Path | None:
    """The newest checkpoint the trainer finished writing (its trainer_state.json is written last)."""
    found = []
    for p in work.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def up_to_date(cfg: StageConfig, paths: StagePaths, inputs: dict[str, str]) -> bool:
    """True when the finished output was made from exactly these inputs (so there is nothing to do).

    A finished output made from other inputs is never replaced without `overwrite=true`.
    """
    if not is_nonempty_dir(paths.out) or cfg.overwrite:
        return False
    manifest = paths.out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("inputs") == inputs:
        return True
    raise OutputError(f"{paths.out} already holds a finished stage made from other inputs (data, config or base "
                      "model). Use another run name (run=NAME) or overwrite=true to replace it")


def prepare_output(cfg: StageConfig, paths: StagePaths, inputs: dict[str, str]) -> Path | None:
    """Make the work directory; return the checkpoint to resume from, if any.

    A checkpoint is only resumed when it was made from the same inputs (data and config hashes).
    """
    inputs_file = paths.work / "inputs.json"
    ckpt = newest_checkpoint(paths.work) if paths.work.is_dir() else None
    if ckpt is not None and cfg.resume:
        before = json.loads(inputs_file.read_text()) if inputs_file.is_file() else {}
        changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
        if changed:
            raise OutputError(f"{paths.work} holds checkpoints of an interrupted run made from other inputs "
                              f"({', '.join(changed)} changed). Use resume=false to start over, or another run name")
        log.info("resuming from %s", ckpt)
        return ckpt
    if paths.work.exists():
        shutil.rmtree(paths.work)
    paths.work.mkdir(parents=True)
    atomic_write_json(inputs_file, inputs)
    return None


def use_cuda_defaults(cfg: StageConfig) -> dict[str, Any]:
    """Trainer precision/memory settings that follow the device: bf16 + checkpointing on CUDA, fp32 on CPU."""
    cuda = torch.cuda.is_available()
    gc = cfg.training.gradient_checkpointing
    return {
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        # set under its new name too: TRL's default for the old name would trigger a deprecation warning
        "activation_checkpointing": cuda if gc is None else gc,
        "gradient_checkpointing": cuda if gc is None else gc,
        "use_cpu": not cuda,
    }


def trainer_args(cfg: StageConfig, work: Path) -> dict[str, Any]:
    """transformers/TRL TrainingArguments shared by the stages built on them."""
    t = cfg.training
    return {
        "output_dir": str(work),
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "eval_strategy": "steps" if t.eval_steps else "no",
        "eval_steps": t.eval_steps,
        "report_to": t.report_to or "none",
        "dataloader_num_workers": 0,
        **use_cuda_defaults(cfg),
    }


def save_stage(cfg: StageConfig, paths: StagePaths, model, tokenizer, metrics: dict[str, Any],
               manifest: dict[str, Any]) -> Path:
    """Write adapter, tokenizer (with chat template), resolved config, metrics and manifest — atomically."""
    with atomic_dir(paths.out, overwrite=cfg.overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "config.yaml", to_yaml(cfg))
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(tmp / "manifest.json", manifest)
    shutil.rmtree(paths.work, ignore_errors=True)
    return paths.out
