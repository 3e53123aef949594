"""What every training stage shares: preparing its data and inputs before a model loads, building its model,
trainer arguments, training with the guards, and the final atomic save. The run directory's lifecycle (refuse,
resume, clean up) is align.runtime.rundir's."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.data.rows import Loaded, check_reject_share, data_hash, write_rejects
from align.modeling.compiled import check_compiler
from align.modeling.models import (
    attach_lora,
    device,
    load_adapter_weights,
    load_base,
    load_tokenizer,
    lora_like,
    require_safetensors,
    resolve_model,
    resolve_quantization,
)
from align.runtime.config import StageConfig, to_yaml
from align.runtime.distributed import is_main, main_first, weights_spread, world_size
from align.runtime.errors import ConfigError, TrainingStopped
from align.runtime.guards import NonFiniteGuard, check_finite, oom_as_message
from align.runtime.rundir import (
    StagePaths,
    check_new_output,
    nothing_to_train,
    prepare_output,
)
from align.runtime.runs import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    json_hash,
    make_manifest,
    read_manifest,
    remove_dir,
    sha256_path,
)
from align.serving.score import load_reward_model

log = logging.getLogger(__name__)


def config_hash(cfg: StageConfig) -> str:
    # overwrite/resume say how to treat old output, not what is trained: they may change between attempts
    return json_hash(to_yaml(dataclasses.replace(cfg, overwrite=False, resume=True)))


@dataclass
class Prepared:
    """A stage's checked inputs, made before any model loads."""
    cfg: Any
    paths: StagePaths
    model_ref: Any
    tokenizer: Any
    train: Loaded
    eval: Loaded | None
    inputs: dict[str, str]
    sft: Path | None = None
    terms: list | None = None  # the RL stages' reward terms (align/stages/rewards.py)
    start: Path | None = None  # a policy the trained adapter starts from instead of `sft` (e.g. the champion)

    @property
    def source(self) -> Path | None:
        """The adapter whose shape and weights the trained adapter takes: the start policy, else the SFT one."""
        return self.start or self.sft

    def lineage(self) -> dict[str, Any]:
        """What a manifest records of where the policy started, when that is not its reference."""
        return {"started_from": str(self.start.resolve())} if self.start is not None else {}


def prepare(stage: str, cfg: StageConfig, make_loader: Callable[[Any], Callable[[str, str, int | None], Loaded]],
            init_from_sft: str | None = None, adjust_tokenizer: Callable[[Any], None] | None = None) -> Prepared:
    """Everything that can fail on user input, before a model is loaded: output place, base model, parent SFT
    stage, tokenizer, and both data splits (read, validated, tokenized by `make_loader(tokenizer)`).

    In a multi-process run the main process goes first: it may convert the base model into the cache and write
    reject files, which the others then find done."""
    with main_first():
        return _prepare(stage, cfg, make_loader, init_from_sft, adjust_tokenizer)


def _prepare(stage: str, cfg: StageConfig, make_loader: Callable[[Any], Callable[[str, str, int | None], Loaded]],
             init_from_sft: str | None, adjust_tokenizer: Callable[[Any], None] | None) -> Prepared:

    paths = StagePaths.of(cfg, stage)
    check_new_output(cfg, paths)
    if cfg.training.compile and cfg.training.mlp_tiles > 1:
        raise ConfigError(f"training.compile=true and training.mlp_tiles={cfg.training.mlp_tiles} do not go together "
                          "(a tiled MLP recomputes itself inside the backward pass, which a compiled layer cannot "
                          "hold); choose one: compile for speed, mlp_tiles for memory")
    if cfg.training.compile:
        check_compiler(device())
    model_ref = resolve_model(cfg.model)
    sft = sft_parent(init_from_sft, model_ref)
    tokenizer = load_tokenizer(model_ref.path, cfg.model.trust_remote_code, cfg.model.chat_template)
    if adjust_tokenizer is not None:
        adjust_tokenizer(tokenizer)
    loader = make_loader(tokenizer)
    d = cfg.data
    train = load_split(stage, cfg, paths, d.train, "train", d.limit, loader)
    evals = load_split(stage, cfg, paths, d.eval, "eval", d.eval_limit, loader) if d.eval else None
    inputs = inputs_of(cfg, model_ref)
    if sft is not None:
        inputs["parent_adapter"] = sha256_path(sft / "adapter_model.safetensors")
    start = start_policy(getattr(cfg, "init_from", None), model_ref)
    if start is not None:
        inputs["start_adapter"] = sha256_path(start / "adapter_model.safetensors")
    return Prepared(cfg, paths, model_ref, tokenizer, train, evals, inputs, sft, start=start)


def inputs_of(cfg: StageConfig, model_ref) -> dict[str, str]:
    """Content hashes of what a stage is made from: a finished stage with the same ones is not trained again."""
    inputs = {"base_model": json_hash(model_ref.description), "train_data": data_hash(cfg.data.train),
              "config": config_hash(cfg)}
    if cfg.data.eval:
        inputs["eval_data"] = data_hash(cfg.data.eval)
    return inputs


def load_split(stage: str, cfg: StageConfig, paths: StagePaths, spec: str, split: str, limit: int | None,
               loader: Callable[[str, str, int | None], Loaded]) -> Loaded:
    """Load one split; write its rejects next to the run and stop when there are too many."""
    loaded = loader(spec, split, limit)
    rejects = paths.rejects(stage, split)
    if loaded.rejects:
        write_rejects(rejects, loaded.rejects)
        log.warning("%s data: %d of %d rows rejected; reasons in %s", split, len(loaded.rejects), loaded.total,
                    rejects)
    check_reject_share(loaded, cfg.data.max_reject_share, rejects, f"{split} data {spec}")
    return loaded


def sft_parent(init_from_sft: str | None, model_ref) -> Path | None:
    """The SFT output to start from: it must exist, be finished, and be trained on this same base."""
    if not init_from_sft:
        return None
    sft = Path(init_from_sft)
    if not (sft / "manifest.json").is_file():
        raise ConfigError(f"init_from_sft={init_from_sft}: no finished SFT stage there (no manifest.json). "
                          "Run `align sft` first, or set init_from_sft= (empty) for a fresh adapter")
    manifest = read_manifest(sft)
    if manifest.get("base_model") != model_ref.description:
        raise ConfigError(f"init_from_sft={init_from_sft} was trained on {manifest.get('base_model')}, but this "
                          f"stage's base is {model_ref.description}; set model.name_or_path to the SFT base")
    if not (sft / "adapter_config.json").is_file():
        raise ConfigError(f"init_from_sft={init_from_sft}: no adapter_config.json; is it an SFT stage output?")

    require_safetensors(sft, "init_from_sft=")
    return sft


def start_policy(init_from: str | None, model_ref) -> Path | None:
    """The finished policy a stage starts from (init_from=): a policy stage output on this same base."""
    if not init_from:
        return None
    start = Path(init_from)
    if not (start / "manifest.json").is_file() or not (start / "adapter_config.json").is_file():
        raise ConfigError(f"init_from={init_from}: no finished policy there (a dpo, ppo, grpo or sft stage output "
                          "with manifest.json and adapter_config.json)")
    manifest = read_manifest(start)
    if manifest.get("stage") not in ("sft", "dpo", "ppo", "grpo"):
        raise ConfigError(f"init_from={init_from} is a {manifest.get('stage')!r} stage output; a policy starts from "
                          "a sft, dpo, ppo or grpo output")
    if manifest.get("base_model") != model_ref.description:
        raise ConfigError(f"init_from={init_from} was trained on {manifest.get('base_model')}, but this stage's base "
                          f"is {model_ref.description}")
    require_safetensors(start, "init_from=")
    return start


def build_lora_model(prep: Prepared, task: str = "causal", pad_token_id: int | None = None):
    """The base, loaded once under the quantization policy, wrapped with the stage's trainable LoRA adapter; when
    the stage starts from SFT the adapter takes the SFT adapter's shape and weights."""
    cfg = prep.cfg
    source = prep.source
    lora = lora_like(cfg.lora, source) if source is not None else cfg.lora
    base = load_base(prep.model_ref.path, cfg.model, task=task, pad_token_id=pad_token_id)
    model = attach_lora(base, lora, resolve_quantization(cfg.model) == "nf4",
                        use_cuda_defaults(cfg)["gradient_checkpointing"], task=task, upcast=cfg.model.upcast,
                        compile=cfg.training.compile, mlp_tiles=cfg.training.mlp_tiles)
    if source is not None:
        n = load_adapter_weights(model, source)
        log.info("the adapter starts from %s (r=%d, alpha=%d; %d LoRA tensors copied)", source, lora.r, lora.alpha,
                 n)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA adapter: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
    return model


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
        # every trainable LoRA/head weight takes part in each forward pass: DDP need not search for unused ones
        "ddp_find_unused_parameters": False,
        **use_cuda_defaults(cfg),
    }


def fit(cfg: StageConfig, paths: StagePaths, inputs: dict[str, str], make_trainer: Callable[[], Any],
        train: Loaded, evals: Loaded | None, after: Callable[[Any], dict[str, Any]], quantization: str,
        loss_before: bool = True) -> tuple[Any, dict[str, Any]] | None:
    """Train (or resume) a transformers/TRL trainer; None when the finished output is already up to date."""
    if nothing_to_train(cfg, paths, inputs):
        return None
    ckpt = prepare_output(cfg, paths, inputs)
    from transformers import set_seed

    set_seed(cfg.training.seed)  # before the adapter is made: its random initial weights follow the seed too
    trainer = make_trainer()
    guard = NonFiniteGuard(paths.out.name, cfg.training.max_bad_steps)
    trainer.add_callback(guard)
    metrics: dict[str, Any] = {
        "n_train": len(train.encoded), "n_train_rejected": len(train.rejects),
        "n_eval": len(evals.encoded) if evals else 0,
        "trainable_params": trainer.model.get_nb_trainable_parameters()[0],
        "quantization": quantization, "resumed_from": ckpt.name if ckpt else None}
    if loss_before and trainer.eval_dataset is not None and ckpt is None:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        _unprepare(trainer)
    start = time.time()
    with oom_as_message(paths.out.name, cfg, paths.work):
        result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if guard.stopped:
        raise TrainingStopped(guard.stopped)
    metrics.update(train_loss=result.training_loss, steps=result.global_step, train_seconds=time.time() - start,
                   skipped_steps=guard.skipped, processes=world_size(),
                   rank_weight_spread=weights_spread(trainable_weights(trainer.model)))
    metrics.update(after(trainer))
    metrics["log_history"] = trainer.state.log_history
    return trainer, metrics


def _unprepare(trainer) -> None:
    """Undo what an evaluation before training leaves behind in a multi-process run.

    Evaluating first marks the bare model as prepared by accelerate, and train() then skips wrapping it in
    DistributedDataParallel: every process would train alone on its own batches, gradients never averaged
    (tests/test_multiprocess.py catches this through the ranks' weights)."""
    model = trainer.model
    if world_size() > 1 and getattr(model, "_is_accelerate_prepared", False):
        del model._is_accelerate_prepared
        trainer.accelerator._models[:] = [m for m in trainer.accelerator._models if m is not model]


def finish(stage: str, prep: Prepared, make_trainer: Callable[[], Any], after: Callable[[Any], dict[str, Any]],
           loss_before: bool = True, extra: dict[str, Any] | None = None, adapters: list[str] | None = None) -> Path:
    """Train (or resume, or skip when up to date), then save the adapter with metrics and manifest."""

    cfg = prep.cfg
    quantization = resolve_quantization(cfg.model)
    done = fit(cfg, prep.paths, prep.inputs, make_trainer, prep.train, prep.eval, after, quantization, loss_before)
    if done is None:
        return prep.paths.out
    trainer, metrics = done
    parent = str(prep.sft.resolve()) if prep.sft is not None else None
    manifest = make_manifest(stage, cfg.run, prep.inputs, prep.model_ref.description, parent=parent,
                             extra={"quantization": quantization, "seed": cfg.training.seed, **prep.lineage(),
                                    **(extra or {})})
    return save_stage(cfg, prep.paths, trainer.model, prep.tokenizer, metrics, manifest, adapters)


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_stage(cfg: StageConfig, paths: StagePaths, model, tokenizer, metrics: dict[str, Any],
               manifest: dict[str, Any], adapters: list[str] | None = None,
               extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write adapter, tokenizer (with chat template), resolved config, metrics and manifest — atomically.

    `adapters` picks which adapters to save (e.g. the policy, not the frozen reference it was trained against).
    In a multi-process run the main process writes; the others return at once (and exit: waiting at a barrier
    while the main process evaluates and writes could outlast the process group's timeout).
    """
    if not is_main():
        return paths.out
    check_finite(((n, p) for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n),
                 str(paths.out))
    with atomic_dir(paths.out, overwrite=cfg.overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, selected_adapters=adapters)
        if extra_files is not None:
            extra_files(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "config.yaml", to_yaml(cfg))
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(tmp / "manifest.json", manifest)
    remove_dir(paths.work)
    return paths.out


def on_same_base(reward_dir: Path, prep: Prepared) -> bool:
    """Whether a reward run was trained on this stage's base, so that it can be an adapter role on it."""
    return ((reward_dir / "adapter_config.json").is_file()
            and read_manifest(reward_dir).get("base_model") == prep.model_ref.description)


def load_separately(reward_dir: Path):
    """A reward model on another base (or merged): a second model in memory, which the log says."""
    log.warning("the reward model %s is not a reward run on this stage's base; it is loaded separately, as a second "
                "model in memory", reward_dir)
    return load_reward_model(reward_dir)
