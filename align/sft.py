"""Supervised fine-tuning: a LoRA adapter on the (4-bit on GPU) base learns the answers in the SFT data.

    align sft --config recipes/configs/sft.yaml training.learning_rate=1e-4

setup (config → model path → tokenizer → data, all checked before the model loads) → train with TRL's
SFTTrainer on sequences built by align's one formatting path → save `runs/<run>/sft/` atomically.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from .config import SFTConfig
from .data import Loaded, check_reject_share, data_hash, load_sft_data, write_rejects
from .errors import OutputError
from .generate import compare_with_base
from .models import ResolvedModel, attach_lora, load_base, load_tokenizer, resolve_model, resolve_quantization
from .runs import is_nonempty_dir, json_hash, make_manifest
from .stage import StagePaths, config_hash, prepare_output, save_stage, trainer_args, up_to_date, use_cuda_defaults

log = logging.getLogger(__name__)
STAGE = "sft"


@dataclass
class Prepared:
    cfg: SFTConfig
    paths: StagePaths
    model_ref: ResolvedModel
    tokenizer: Any
    train: Loaded
    eval: Loaded | None
    inputs: dict[str, str]


def _load_split(cfg: SFTConfig, paths: StagePaths, tokenizer, spec: str, split: str, limit: int | None) -> Loaded:
    d = cfg.data
    loaded = load_sft_data(spec, tokenizer, d.max_length, d.completion_only, d.split, limit)
    rejects = paths.rejects(STAGE, split)
    if loaded.rejects:
        write_rejects(rejects, loaded.rejects)
        log.warning("%s data: %d of %d rows rejected; reasons in %s", split, len(loaded.rejects), loaded.total,
                    rejects)
    check_reject_share(loaded, d.max_reject_share, rejects, f"{split} data {spec}")
    return loaded


def setup(cfg: SFTConfig) -> Prepared:
    """Everything that can fail on user input, before a model is loaded."""
    paths = StagePaths.of(cfg, STAGE)
    if is_nonempty_dir(paths.out) and not cfg.overwrite and not (paths.out / "manifest.json").is_file():
        raise OutputError(f"{paths.out} exists and is not an align stage output; choose another run or runs_dir")
    model_ref = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_ref.path, cfg.model.trust_remote_code)
    train = _load_split(cfg, paths, tokenizer, cfg.data.train, "train", cfg.data.limit)
    evals = _load_split(cfg, paths, tokenizer, cfg.data.eval, "eval", None) if cfg.data.eval else None
    inputs = {"base_model": json_hash(model_ref.description), "train_data": data_hash(cfg.data.train),
              "config": config_hash(cfg)}
    if cfg.data.eval:
        inputs["eval_data"] = data_hash(cfg.data.eval)
    return Prepared(cfg, paths, model_ref, tokenizer, train, evals, inputs)


def _dataset(loaded: Loaded) -> Dataset:
    return Dataset.from_dict({"input_ids": [e.input_ids for e in loaded.encoded],
                              "labels": [e.labels for e in loaded.encoded]})


def build_trainer(prep: Prepared):
    """Load the base (once), attach a fresh LoRA adapter, and wrap both in TRL's SFTTrainer."""
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    cfg = prep.cfg
    quantized = resolve_quantization(cfg.model) == "nf4"
    base = load_base(prep.model_ref.path, cfg.model)
    model = attach_lora(base, cfg.lora, quantized, use_cuda_defaults(cfg)["gradient_checkpointing"])
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA adapter: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
    # Sequences arrive tokenized, labelled and truncated by align's formatting path, so TRL must not redo any of
    # it: max_length=None (no second truncation), no packing, no shuffling of its own (the sampler shuffles).
    args = TRLSFTConfig(**trainer_args(cfg, prep.paths.work), max_length=None, packing=False,
                        shuffle_dataset=False)
    return SFTTrainer(model=model, args=args, train_dataset=_dataset(prep.train),
                      eval_dataset=_dataset(prep.eval) if prep.eval else None, processing_class=prep.tokenizer)


def train(prep: Prepared) -> Path:
    cfg = prep.cfg
    if up_to_date(cfg, prep.paths, prep.inputs):
        log.info("%s is up to date (same base model, data and config); nothing to train. Use overwrite=true to "
                 "train it again", prep.paths.out)
        return prep.paths.out
    ckpt = prepare_output(cfg, prep.paths, prep.inputs)
    trainer = build_trainer(prep)
    has_eval = trainer.eval_dataset is not None
    metrics: dict[str, Any] = {
        "n_train": len(prep.train.encoded), "n_train_rejected": len(prep.train.rejects),
        "n_eval": len(prep.eval.encoded) if prep.eval else 0,
        "trainable_params": trainer.model.get_nb_trainable_parameters()[0],
        "quantization": resolve_quantization(cfg.model), "resumed_from": ckpt.name if ckpt else None}
    if has_eval and ckpt is None:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    start = time.time()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    metrics.update(train_loss=result.training_loss, steps=result.global_step, train_seconds=time.time() - start)
    if has_eval:
        metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
        metrics["eval_perplexity_after"] = math.exp(min(metrics["eval_loss_after"], 50))
    metrics["log_history"] = trainer.state.log_history
    if prep.eval and cfg.samples:
        prompts = [e.prompt for e in prep.eval.examples if e.prompt][: cfg.samples]
        metrics["samples"] = compare_with_base(trainer.model, prep.tokenizer, prompts)
    manifest = make_manifest(STAGE, cfg.run, prep.inputs, prep.model_ref.description, parent=None,
                             extra={"quantization": metrics["quantization"]})
    return save_stage(cfg, prep.paths, trainer.model, prep.tokenizer, metrics, manifest)


def run(cfg: SFTConfig) -> Path:
    return train(setup(cfg))
