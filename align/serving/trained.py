"""Loading a finished stage's output (runs/<run>/<stage>/) back onto its base, for scoring, sampling and
evaluation: the base comes from the run's own config and is checked against the manifest, so an artifact is never
silently applied to a different model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from align.modeling.models import load_base, load_tokenizer, require_safetensors, resolve_model
from align.runtime.config import STAGES, ModelConfig, load_config
from align.runtime.errors import ModelError
from align.runtime.runs import CHAMPION_FILE, MANIFEST, read_manifest

log = logging.getLogger(__name__)

POLICY_STAGES = ("sft", "dpo", "ppo", "grpo")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ModelError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return dev


def open_run(path: Path, stages: tuple[str, ...], flag: str) -> tuple[dict[str, Any], Any, Any]:
    """(manifest, stage config, resolved base) of a finished stage output whose stage is one of `stages`."""

    if not (path / MANIFEST).is_file() or not (path / "adapter_config.json").is_file():
        raise ModelError(f"{flag} {path}: not a finished stage output (runs/<run>/<stage>/ with manifest.json "
                         "and adapter_config.json)")
    require_safetensors(path, flag)
    manifest = read_manifest(path)
    stage = manifest.get("stage")
    if stage not in stages:
        raise ModelError(f"{flag} {path} is a {stage!r} stage output; expected one of {', '.join(stages)}")
    cfg = load_config(STAGES[stage], path / "config.yaml")
    ref = resolve_model(cfg.model)
    if ref.description != manifest["base_model"]:
        raise ModelError(f"the base model of {path} has changed since training: it was {manifest['base_model']}, "
                         f"{cfg.model.name_or_path or 'the embedded model'} is now {ref.description}")
    return manifest, cfg, ref


def model_config_for(cfg: Any, manifest: dict[str, Any], dev: torch.device) -> ModelConfig:
    """Run in the precision it trained in: 4-bit when it trained in 4-bit and a GPU is there, else unquantized."""
    quantization = manifest.get("quantization", "none") if dev.type == "cuda" else "none"
    return ModelConfig(name_or_path=cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, quantization=quantization,
                       dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)


def champion_or(path: str | Path) -> Path:
    """A pipeline directory (runs/<name>, holding champion.json) stands for its champion policy."""
    path = Path(path)
    pointer = path / CHAMPION_FILE
    if pointer.is_file():
        champion = json.loads(pointer.read_text(encoding="utf-8"))
        # the recorded path is relative to where `align run` ran; the champion's place inside the pipeline directory
        # holds wherever this command runs
        inside = path / champion["version"] / champion["stage"]
        found = inside if inside.is_dir() else Path(champion["path"])
        log.info("%s: its champion, %s %s (%s)", path, champion["version"], champion["stage"], found)
        return found
    return path


def load_policy(path: str | Path, device: str = "auto", flag: str = "--policy", adapter_name: str = "default"):
    """(model, tokenizer, stage config) of a policy stage output (SFT, DPO or PPO adapter over its base), or of
    a pipeline's champion when `path` is the pipeline's directory."""
    from peft import PeftModel

    path = champion_or(path)
    dev = pick_device(device)
    manifest, cfg, ref = open_run(path, POLICY_STAGES, flag)
    model_cfg = model_config_for(cfg, manifest, dev)
    tokenizer = load_tokenizer(str(path))
    model = PeftModel.from_pretrained(load_base(ref.path, model_cfg), str(path), adapter_name=adapter_name)
    if model_cfg.quantization == "none":
        model.to(dev)
    return model.eval(), tokenizer, cfg

