"""The policies a person talks to or judges (`align chat`, `align label`), named however the user has them: a stage
output (runs/<run>/dpo), a pipeline directory (its champion), a run directory holding one policy stage, or a
merged model directory. Two adapters trained on the same base share one copy of it in memory (decision 2 of the
design: one base), each answering under its own adapter name; anything else is loaded on its own, and the log
says which."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.modeling.models import PICKLE_SUFFIXES, load_tokenizer
from align.runtime.errors import ModelError
from align.runtime.runs import CHAMPION_FILE, MANIFEST, read_manifest
from align.serving.trained import POLICY_STAGES, champion_or, load_policy, pick_device

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """A loaded policy: `adapter` is the adapter name to activate on `model` when several share it (else None)."""

    name: str
    model: Any
    tokenizer: Any
    adapter: str | None = None

    def activate(self) -> None:
        if self.adapter is not None:
            self.model.set_adapter(self.adapter)


def _policy_outputs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if (p / MANIFEST).is_file() and (p / "adapter_config.json").is_file()
                  and read_manifest(p).get("stage") in POLICY_STAGES)


def locate(spec: str | Path, flag: str = "--model") -> tuple[str, Path]:
    """("adapter", a stage output) or ("merged", a model directory) for whatever `spec` names."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelError(f"{flag} {spec}: no such directory; name a stage output (runs/<run>/dpo), a pipeline "
                         "directory (runs/<name>: its champion) or a merged model directory")
    if (path / CHAMPION_FILE).is_file() or (path / MANIFEST).is_file():
        return "adapter", champion_or(path)
    if (path / "config.json").is_file():
        if not list(path.glob("*.safetensors")):
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            raise ModelError(f"{flag} {spec}: no .safetensors weights"
                             + (f" (only {', '.join(pickles)}: pickle files, which align never loads)" if pickles
                                else "") + "; merge with `align merge`, which writes safetensors")
        return "merged", path
    found = _policy_outputs(path)
    if len(found) == 1:
        log.info("%s: its %s policy, %s", path, read_manifest(found[0])["stage"], found[0])
        return "adapter", found[0]
    choices = f"it holds several: {', '.join(str(p) for p in found)}; name one" if found else \
        "it holds no finished policy stage (sft, dpo, ppo, grpo), no champion.json and no model"
    raise ModelError(f"{flag} {spec}: which policy? {choices}")


def _load_merged(path: Path, device: str, flag: str):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{flag} {path}: could not load the model: {e}") from e
    return model.to(pick_device(device)).eval(), tokenizer


def load_any_policy(spec: str | Path, device: str = "auto", flag: str = "--model"):
    """(model, tokenizer) of one policy, however it is named."""
    kind, path = locate(spec, flag)
    if kind == "merged":
        return _load_merged(path, device, flag)
    model, tokenizer, _ = load_policy(path, device, flag)
    return model, tokenizer


def load_policies(specs: list[tuple[str, str]], device: str = "auto") -> list[Policy]:
    """Each (flag, spec) loaded; adapters on the same base share one copy of it."""
    located = [(flag, spec, *locate(spec, flag)) for flag, spec in specs]
    adapters = [(flag, spec, path) for flag, spec, kind, path in located if kind == "adapter"]
    bases = {json.dumps([m["base_model"], m.get("quantization")], sort_keys=True)
             for m in (read_manifest(path) for _, _, path in adapters)}
    if len(adapters) == len(located) > 1 and len(bases) == 1:
        return _on_one_base(adapters, device)
    if len(located) > 1:
        log.info("the policies are loaded separately (%s)", "a merged model is among them"
                 if len(adapters) < len(located) else "they were trained on different bases")
    return [Policy(spec, *load_any_policy(spec, device, flag)) for flag, spec in specs]


def _on_one_base(adapters: list[tuple[str, str, Path]], device: str) -> list[Policy]:
    flag, spec, first = adapters[0]
    model, tokenizer, _ = load_policy(first, device, flag, adapter_name="policy_0")
    policies = [Policy(spec, model, tokenizer, "policy_0")]
    for i, (flag, spec, path) in enumerate(adapters[1:], 1):
        model.load_adapter(str(path), adapter_name=f"policy_{i}")
        policies.append(Policy(spec, model, load_tokenizer(str(path)), f"policy_{i}"))
    model.to(next(model.parameters()).device).eval()
    log.info("%d policies share one base in memory, each under its own adapter", len(policies))
    return policies
