"""DPO: the policy adapter learns the preference pairs directly, against a frozen reference on the same base.

    align dpo --config recipes/configs/dpo.yaml init_from_sft=runs/demo/sft

One base in memory: the policy is a trainable LoRA adapter started from the SFT adapter's weights; the
reference is the SFT adapter loaded frozen under the name "reference" on that same base (or the base with
adapters off when there is no SFT stage). The reference's log-probs of every pair are computed once before
training (and optionally cached in the run directory, keyed by the data's and the reference's content hashes),
so no reference forward pass happens during training. The losses are align.rl.losses.dpo_loss (pure, tested by
hand); the trainer is transformers' Trainer with that loss — TRL's DPOTrainer re-tokenizes and owns its loss
maths, while here the tokens come from align's one formatting path.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from align.data.pairs import EncodedPair, pair_loader
from align.data.rows import Loaded
from align.modeling.formatting import IGNORE
from align.modeling.heads import answer_labels, labelled_logps, pack_batch, packed_logps, pad_batch
from align.modeling.models import (
    REFERENCE,
    add_adapter_from,
    reference_role,
)
from align.modeling.roles import Batch, Roles, make_batch
from align.rl.losses import dpo_loss
from align.runtime.checkpoint import SafetensorsCheckpoints
from align.runtime.config import DPOConfig
from align.runtime.distributed import gather, is_main, world_size
from align.runtime.distributed import rank as rank_of
from align.runtime.runs import json_hash
from align.stages.common import (
    Prepared,
    build_lora_model,
    finish,
    prepare,
    trainer_args,
    use_cuda_defaults,
)

log = logging.getLogger(__name__)
STAGE = "dpo"


def setup(cfg: DPOConfig) -> Prepared:
    """Everything that can fail on user input, before a model is loaded."""
    return prepare(STAGE, cfg, pair_loader(cfg.data), cfg.init_from_sft)


# ---------------------------------------------------------------------------------------------- model


def build_model(prep: Prepared):
    """One base; the policy adapter ("default", trainable) and, from SFT, the frozen "reference" adapter."""
    model = build_lora_model(prep)
    if prep.sft is not None:
        add_adapter_from(model, REFERENCE, prep.sft)
        if prep.start is not None:
            log.info("policy adapter starts from %s; the SFT adapter %s, frozen, is the reference", prep.start,
                     prep.sft)
        else:
            log.info("policy adapter starts from %s; the same SFT adapter, frozen, is the reference", prep.sft)
    else:
        log.info("no SFT stage: the reference is the base model (adapters off)")
    return model


def reference(model):
    """Run the model as the reference: the frozen SFT adapter, or the base with adapters off. No weights copied."""
    return reference_role(model)


def _batch(pairs: list[EncodedPair], pad_id: int, device, packed: bool = False, shared: bool = False
           ) -> dict[str, torch.Tensor]:
    """Chosen then rejected; labels keep only answer tokens (prompt and padding are IGNORE). Three layouts:
    right-padded whole sequences; end to end in one row (`packed`); or `shared`: each row's prompt left-padded
    before its right-padded answer, so that a pair's two answers read their prompt once (shared_prompt_states)."""
    seqs = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    prompt_lens = [p.prompt_len for p in pairs] * 2
    if packed:
        labels = [[IGNORE] * n + s[n:] for s, n in zip(seqs, prompt_lens, strict=True)]
        return pack_batch(seqs, labels, device)
    if shared and all(prompt_lens):
        # the RL stages' layout (eos -1: whether an answer ended is not DPO's question)
        rows = make_batch([s[:n] for s, n in zip(seqs, prompt_lens)], [s[n:] for s, n in zip(seqs, prompt_lens)],
                          pad_id, -1, device, prompt_of=list(range(len(pairs))) * 2)
        answers = rows.responses.masked_fill(rows.resp_mask == 0, IGNORE)
        return {"input_ids": rows.ids, "attention_mask": rows.mask,
                "labels": torch.cat([torch.full_like(rows.ids[:, :rows.prompt_len], IGNORE), answers], 1),
                "answer_len": torch.full((len(seqs),), answers.shape[1], device=device), "prompt_of": rows.prompt_of}
    ids, mask = pad_batch(seqs, pad_id, device=device)
    return {"input_ids": ids, "attention_mask": mask, "labels": answer_labels(ids, mask, prompt_lens)}


def answer_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) summed answer log-probs and answer lengths of a _batch."""
    if "owner" in batch:
        return packed_logps(model, batch["input_ids"], batch["position_ids"], batch["labels"], batch["owner"],
                            int(batch["owner"][0, -1]) + 1)
    if "prompt_of" in batch:
        t = int(batch["answer_len"][0])
        answers, ids, mask = batch["labels"][:, -t:], batch["input_ids"], batch["attention_mask"]
        answer_mask = (answers != IGNORE).float()
        rows = Batch(ids, mask, ids[:, -t:], answer_mask, ids.shape[1] - t, ended=answer_mask.sum(1) > 0,
                     prompt_of=batch["prompt_of"])
        return (Roles(model, None, None).policy_logps(rows) * answer_mask).sum(1), answer_mask.sum(1).long()
    return labelled_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def shares_prompts(cfg: DPOConfig) -> bool:
    """Whether training batches take the shared layout: one process (the decoder is called beneath any DDP
    wrapper there), no padding-free rows, no compiled layers (a cache would be one more input to recompile for)
    and no gradient checkpointing (which shares nothing in training: shared_prompt_states)."""
    t = cfg.training
    return (world_size() == 1 and not t.padding_free and not t.compile
            and not use_cuda_defaults(cfg)["gradient_checkpointing"])


@torch.no_grad()
def reference_logps(model, pairs: list[EncodedPair], pad_id: int, batch_size: int, packed: bool = False,
                    shared: bool = False) -> torch.Tensor:
    """(N, 2) reference log-probs of (chosen, rejected) for every pair: the only reference forward passes."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    from tqdm.auto import tqdm

    # pairs of similar length go together (no gradients here, so the order is free): little padding to compute
    order = sorted(range(len(pairs)), key=lambda i: max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)))
    with reference(model), tqdm(total=len(pairs), desc="reference log-probs", unit="pair", file=sys.stderr) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = [pairs[i] for i in order[start:start + batch_size]]
            logps, _ = answer_logps(model, _batch(chunk, pad_id, device, packed, shared))
            out.append(torch.stack(logps.float().cpu().chunk(2), dim=1))
            bar.update(len(chunk))
    model.train(was_training)
    if not out:
        return torch.zeros(0, 2)
    result = torch.empty(len(pairs), 2)
    result[torch.tensor(order)] = torch.cat(out)
    return result


def shared_reference_logps(model, pairs: list[EncodedPair], pad_id: int, batch_size: int, packed: bool,
                           shared: bool = False) -> torch.Tensor:
    """reference_logps, with the pairs shared out over the processes of a multi-process run (rank r takes pairs
    r, r + world, ...) and the results gathered: every process ends with all rows, in the data's order."""
    world = world_size()
    if world == 1:
        return reference_logps(model, pairs, pad_id, batch_size, packed, shared)
    rank, n = rank_of(), len(pairs)
    share = -(-n // world)
    mine = torch.zeros(share, 2)
    part = reference_logps(model, pairs[rank::world], pad_id, batch_size, packed, shared)
    mine[:len(part)] = part
    every = gather(mine)  # (world × share, 2): rank r's rows at [r × share, r × share + its count)
    out = torch.empty(n, 2)
    for r in range(world):
        count = len(range(r, n, world))
        out[r::world] = every[r * share:r * share + count]
    return out


def cached_reference_logps(prep: Prepared, model, loaded: Loaded, spec: str) -> torch.Tensor:
    """Reference log-probs, from the run's cache when the same data and reference made them before."""
    from safetensors.torch import load_file, save_file

    cfg = prep.cfg
    key = json_hash({"data": prep.inputs["train_data"] if spec == cfg.data.train else prep.inputs.get("eval_data"),
                     "spec": spec, "reference": prep.inputs.get("parent_adapter", "base"),
                     "base": prep.inputs["base_model"], "max_length": cfg.data.max_length,
                     "limit": cfg.data.limit if spec == cfg.data.train else None})[:16]
    path = prep.paths.run_dir / "cache" / f"reference-logps-{key}.safetensors"
    if cfg.cache_reference and path.is_file():
        cached = load_file(path)["logps"]
        if cached.shape[0] == len(loaded.encoded):
            log.info("reference log-probs of %s from %s", spec, path)
            return cached
    # no gradients and no DDP wrapper here: each pair's prompt is read once unless the layers are compiled
    logps = shared_reference_logps(model, loaded.encoded, prep.tokenizer.pad_token_id, cfg.training.batch_size,
                                   cfg.training.padding_free, not cfg.training.compile)
    if cfg.cache_reference and is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"logps": logps.contiguous()}, str(tmp))
        tmp.replace(path)
    return logps


# ---------------------------------------------------------------------------------------------- training


def _dataset(loaded: Loaded, ref: torch.Tensor) -> Dataset:
    return Dataset.from_dict({
        "chosen_ids": [p.chosen_ids for p in loaded.encoded], "rejected_ids": [p.rejected_ids for p in loaded.encoded],
        "prompt_len": [p.prompt_len for p in loaded.encoded],
        "ref_chosen": ref[:, 0].tolist(), "ref_rejected": ref[:, 1].tolist()})


def build_trainer(prep: Prepared):
    from transformers import TrainingArguments

    cfg = prep.cfg
    model = build_model(prep)
    ref_train = cached_reference_logps(prep, model, prep.train, cfg.data.train)
    ref_eval = cached_reference_logps(prep, model, prep.eval, cfg.data.eval) if prep.eval else None
    args = trainer_args(cfg, prep.paths.work)
    args.pop("gradient_checkpointing", None)  # TrainingArguments knows it as activation_checkpointing (TRL: both)
    args = TrainingArguments(**args, remove_unused_columns=False, prediction_loss_only=True)
    return _trainer_class()(
        model=model, args=args, train_dataset=_dataset(prep.train, ref_train),
        eval_dataset=_dataset(prep.eval, ref_eval) if prep.eval else None,
        data_collator=lambda rows: _collate(rows, prep.tokenizer.pad_token_id, cfg.training.padding_free,
                                            shares_prompts(cfg)), cfg=cfg)


def _collate(rows: list[dict], pad_id: int, packed: bool, shared: bool = False) -> dict[str, torch.Tensor]:
    pairs = [EncodedPair(r["chosen_ids"], r["rejected_ids"], 0.0, r["prompt_len"]) for r in rows]
    batch = _batch(pairs, pad_id, "cpu", packed, shared)
    batch["ref_chosen"] = torch.tensor([r["ref_chosen"] for r in rows])
    batch["ref_rejected"] = torch.tensor([r["ref_rejected"] for r in rows])
    return batch


def _trainer_class():
    from transformers import Trainer

    class DPOTrainer(SafetensorsCheckpoints, Trainer):
        """transformers' Trainer with align's DPO losses over precomputed reference log-probs."""

        # the loss is a mean over the batch's pairs, so the Trainer must divide it by the accumulation steps (the
        # batch holds `labels`, which alone would make it assume a loss already normalised over the whole step)
        loss_is_scaled_for_ga = False

        def __init__(self, *args, cfg: DPOConfig, **kwargs):
            super().__init__(*args, **kwargs)
            self.cfg = cfg
            self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logps, lengths = answer_logps(model, inputs)
            chosen, rejected = logps.chunk(2)
            len_c, len_r = lengths.float().chunk(2)
            c = self.cfg
            loss, metrics = dpo_loss(chosen, rejected, inputs["ref_chosen"], inputs["ref_rejected"], c.beta, c.loss,
                                     c.label_smoothing, len_c, len_r, c.simpo_gamma, c.sft_weight)
            mode = "train" if model.training else "eval"
            metrics["logps_chosen"] = chosen.detach().mean()
            metrics["logps_rejected"] = rejected.detach().mean()
            # mean log-ratio to the reference on the data (a cheap drift signal; the sampled KL comes after training)
            metrics["logratio"] = ((chosen - inputs["ref_chosen"] + rejected - inputs["ref_rejected"]) / 2
                                   ).detach().mean()
            keys = sorted(metrics)
            # each process sees its own batches: the logged numbers are means over all of them
            values = self.accelerator.gather(torch.stack([metrics[k].detach().float() for k in keys])[None])
            for key, value in zip(keys, values.mean(0).tolist(), strict=True):
                self._metrics[mode][key].append(value)
            return (loss, {"logps": logps.detach()}) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
            self._metrics[mode].clear()
            super().log(logs, start_time)

    return DPOTrainer


def train(prep: Prepared) -> Path:
    cfg = prep.cfg

    def metrics_after(trainer) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if trainer.eval_dataset is not None:
            metrics.update({k: v for k, v in trainer.evaluate().items() if k.startswith("eval_")})
        return metrics

    return finish(STAGE, prep, lambda: build_trainer(prep), metrics_after,
                  extra={"loss": cfg.loss, "beta": cfg.beta}, adapters=["default"])


def run(cfg: DPOConfig) -> Path:
    return train(setup(cfg))
