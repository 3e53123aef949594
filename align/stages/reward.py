"""Reward model: a one-output score head on the base, trained with a LoRA adapter on preference pairs.

    align reward --config recipes/configs/reward.yaml init_from_sft=runs/demo/sft

setup (config → model path → tokenizer → pairs, all checked before the model loads) → train with TRL's
RewardTrainer on pairs built by align's one formatting path, Bradley–Terry loss, the score read at each answer's
final EOS (align.modeling.heads) → held-out accuracy, mean margin, calibration, score histogram → save
`runs/<run>/reward/` atomically: the adapter with its score head, tokenizer, config, metrics, manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from align.data.pairs import pair_loader
from align.data.rows import Loaded
from align.modeling.heads import scoring_pad_id, sequence_scores
from align.rl.losses import expected_calibration_error, pairwise_reward_loss
from align.runtime.checkpoint import SafetensorsCheckpoints
from align.runtime.config import RewardConfig
from align.runtime.distributed import is_main
from align.serving.score import score_sequences
from align.stages.common import (
    Prepared,
    build_lora_model,
    finish,
    prepare,
    trainer_args,
)

log = logging.getLogger(__name__)
STAGE = "reward"


def setup(cfg: RewardConfig) -> Prepared:
    """Everything that can fail on user input, before a model is loaded."""
    def scoring_pad(tokenizer) -> None:
        # pad with a token that is not the EOS where possible, so plain transformers pools at the EOS too
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(scoring_pad_id(tokenizer))

    return prepare(STAGE, cfg, pair_loader(cfg.data), cfg.init_from_sft, scoring_pad)


def _dataset(loaded: Loaded) -> Dataset:
    return Dataset.from_dict({"chosen_ids": [p.chosen_ids for p in loaded.encoded],
                              "rejected_ids": [p.rejected_ids for p in loaded.encoded],
                              "margin": [p.margin for p in loaded.encoded]})


def build_model(prep: Prepared):
    """The base (once) as a one-output sequence classifier + a LoRA adapter, from SFT's weights when asked."""
    torch.manual_seed(prep.cfg.training.seed)  # the fresh score head's initial weights
    return build_lora_model(prep, task="score", pad_token_id=prep.tokenizer.pad_token_id)


def build_trainer(prep: Prepared):
    from trl import RewardConfig as TRLRewardConfig

    # Pairs arrive tokenized by align's formatting path: no second truncation (max_length=None). Dropout is off
    # so that both answers of a pair are scored by the same network (the loss compares them).
    args = TRLRewardConfig(**trainer_args(prep.cfg, prep.paths.work), max_length=None, disable_dropout=True)
    return _trainer_class()(
        model=build_model(prep), args=args, train_dataset=_dataset(prep.train),
        eval_dataset=_dataset(prep.eval) if prep.eval else None, processing_class=prep.tokenizer,
        constant_margin=prep.cfg.margin)


def _trainer_class():
    from trl import RewardTrainer

    class AlignRewardTrainer(SafetensorsCheckpoints, RewardTrainer):
        """TRL's RewardTrainer with the score read at each answer's EOS and align's loss (same maths + margin)."""

        loss_is_scaled_for_ga = False  # a mean over the batch's pairs: the Trainer divides by accumulation steps

        def __init__(self, *args, constant_margin: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.constant_margin = constant_margin

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            scores = sequence_scores(model, inputs["input_ids"], inputs["attention_mask"])
            chosen, rejected = scores.chunk(2)
            margin = inputs.get("margin", torch.zeros_like(chosen)) + self.constant_margin
            loss, metrics = pairwise_reward_loss(chosen, rejected, margin)
            for key, value in metrics.items():
                self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).mean().item())
            self._metrics[mode]["mean_reward"].append(scores.mean().item())
            return (loss, {"scores": torch.stack([chosen, rejected], 1)}) if return_outputs else loss

    return AlignRewardTrainer


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 20) -> dict[str, Any]:
    """Held-out quality of a reward model from its scores of (chosen, rejected) pairs.

    accuracy: share of pairs with chosen scored strictly higher; mean_margin: mean r_chosen - r_rejected;
    ece: calibration of σ(margin) as the probability that chosen is better (over the model's picks);
    histogram: score counts of chosen and rejected answers over shared bin edges.
    """
    gap = chosen - rejected
    pick_prob = torch.sigmoid(gap.abs())
    ece = expected_calibration_error(pick_prob, gap > 0)
    both = torch.cat([chosen, rejected])
    lo, hi = both.min().item(), both.max().item()
    if hi <= lo:
        hi = lo + 1e-6
    edges = torch.linspace(lo, hi, bins + 1)
    return {
        "accuracy": (gap > 0).float().mean().item(),
        "mean_margin": gap.mean().item(),
        "ece": ece,
        "score_mean": both.mean().item(),
        "score_std": both.std().item() if both.numel() > 1 else 0.0,
        "histogram": {"edges": edges.tolist(),
                      "chosen": torch.histc(chosen, bins, lo, hi).long().tolist(),
                      "rejected": torch.histc(rejected, bins, lo, hi).long().tolist()},
    }


def evaluate_pairs(model, tokenizer, loaded: Loaded, batch_size: int, bins: int) -> dict[str, Any]:
    seqs = [p.chosen_ids for p in loaded.encoded] + [p.rejected_ids for p in loaded.encoded]
    scores = torch.tensor(score_sequences(model, seqs, tokenizer.pad_token_id, batch_size, desc="held-out pairs"))
    n = len(loaded.encoded)
    return preference_metrics(scores[:n], scores[n:], bins)


def training_probe(trainer, loaded: Loaded, k: int = 4) -> list[dict[str, Any]]:
    """Scores of the first k training pairs exactly as training computed them (its collator, padding and model),
    kept in metrics.json so scoring the same rows later (`align score`) can be checked against them."""
    pairs, examples = loaded.encoded[:k], loaded.examples[:k]
    batch = trainer.data_collator([{"chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids, "margin": p.margin}
                                   for p in pairs])
    model = trainer.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        chosen, rejected = sequence_scores(model, batch["input_ids"].to(device),
                                           batch["attention_mask"].to(device)).chunk(2)
    model.train(was_training)
    return [{"source": e.source, "row": e.row, "chosen_score": c, "rejected_score": r}
            for e, c, r in zip(examples, chosen.tolist(), rejected.tolist())]


def train(prep: Prepared) -> Path:
    cfg = prep.cfg

    def metrics_after(trainer) -> dict[str, Any]:
        if not is_main():  # plain forward passes, no collectives: the main process, which writes the output
            return {}
        metrics: dict[str, Any] = {"train_probe": training_probe(trainer, prep.train)}
        if prep.eval is not None:
            held_out = evaluate_pairs(trainer.model, prep.tokenizer, prep.eval, cfg.training.batch_size,
                                      cfg.histogram_bins)
            metrics.update({f"eval_{k}": v for k, v in held_out.items()})
        return metrics

    return finish(STAGE, prep, lambda: build_trainer(prep), metrics_after, loss_before=False,
                  extra={"pad_token": prep.tokenizer.pad_token})


def run(cfg: RewardConfig) -> Path:
    return train(setup(cfg))
