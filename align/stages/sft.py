"""Supervised fine-tuning: a LoRA adapter on the (4-bit on GPU) base learns the answers in the SFT data.

    align sft --config recipes/configs/sft.yaml training.learning_rate=1e-4

setup (config → model path → tokenizer → data, all checked before the model loads) → train with TRL's
SFTTrainer on sequences built by align's one formatting path → save `runs/<run>/sft/` atomically.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from datasets import Dataset

from align.data.rows import Loaded, load_sft_data
from align.modeling.generate import compare_with_base
from align.runtime.checkpoint import SafetensorsCheckpoints
from align.runtime.config import SFTConfig
from align.runtime.distributed import is_main
from align.stages.common import Prepared, build_lora_model, finish, prepare, trainer_args

log = logging.getLogger(__name__)
STAGE = "sft"


def setup(cfg: SFTConfig) -> Prepared:
    """Everything that can fail on user input, before a model is loaded."""
    d = cfg.data
    return prepare(STAGE, cfg, lambda tok: lambda spec, split, limit: load_sft_data(
        spec, tok, d.max_length, d.completion_only, d.split, limit))


def _dataset(loaded: Loaded) -> Dataset:
    return Dataset.from_dict({"input_ids": [e.input_ids for e in loaded.encoded],
                              "labels": [e.labels for e in loaded.encoded]})


def build_trainer(prep: Prepared):
    """Load the base (once), attach a fresh LoRA adapter, and wrap both in TRL's SFTTrainer."""
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    cfg = prep.cfg
    model = build_lora_model(prep)
    # Sequences arrive tokenized, labelled and truncated by align's formatting path, so TRL must not redo any of
    # it: max_length=None (no second truncation), no packing, no shuffling of its own (the sampler shuffles).
    args = TRLSFTConfig(**trainer_args(cfg, prep.paths.work), max_length=None, packing=False,
                        shuffle_dataset=False, padding_free=cfg.training.padding_free)
    trainer_cls = type("AlignSFTTrainer", (SafetensorsCheckpoints, SFTTrainer), {})
    return trainer_cls(model=model, args=args, train_dataset=_dataset(prep.train),
                       eval_dataset=_dataset(prep.eval) if prep.eval else None, processing_class=prep.tokenizer)


def train(prep: Prepared) -> Path:
    cfg = prep.cfg

    def metrics_after(trainer) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if trainer.eval_dataset is not None:
            metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
            metrics["eval_perplexity_after"] = math.exp(min(metrics["eval_loss_after"], 50))
        if prep.eval and cfg.samples and is_main():  # generation: the main process alone, it writes the output
            prompts = [e.prompt for e in prep.eval.examples if e.prompt][: cfg.samples]
            metrics["samples"] = compare_with_base(trainer.model, prep.tokenizer, prompts)
        return metrics

    return finish(STAGE, prep, lambda: build_trainer(prep), metrics_after)


def run(cfg: SFTConfig) -> Path:
    return train(setup(cfg))
