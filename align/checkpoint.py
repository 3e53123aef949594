"""Checkpoints of align's own training loops (PPO), in safetensors and JSON only — never pickle.

A checkpoint is `<work>/checkpoint-<step>/` with `weights.safetensors` (trainable tensors), `optimizer.safetensors`
(the optimizer's per-parameter state, flattened) and `trainer_state.json` (step, controller state, RNG, logs).
The directory appears in one rename, so a reader never sees half of one.

The transformers Trainer (SFT, reward, DPO) writes its `checkpoint-<step>/` in place, file by file, with
trainer_state.json last — a process killed meanwhile leaves a directory without it, or with a cut one; and old
checkpoints are deleted file by file. `is_complete` tells a checkpoint a resume can read from such remains.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .runs import atomic_dir, atomic_write_json, remove_dir

STATE = "trainer_state.json"
# what a resume reads, besides trainer_state.json: ours, and the transformers Trainer's
OURS = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors")
TRAINER = ("optimizer.pt", "scheduler.pt")
TRAINER_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's state as flat tensors ("<param index>.<key>") plus its param groups (JSON-able)."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    return tensors, sd["param_groups"]


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(work: Path, step: int, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint-<step> atomically and keep only the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    final = work / f"checkpoint-{step}"
    opt_tensors, groups = optimizer_to_tensors(optimizer)
    with atomic_dir(final, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_state(), str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / STATE, {**state, "step": step, "param_groups": groups})
    for old in checkpoints(work)[:-keep]:
        remove_dir(old)  # renamed aside first: never seen half-deleted
    return final


def is_complete(path: Path) -> bool:
    """Whether a resume can read this checkpoint: its trainer_state.json (both writers write it last) is whole
    JSON, and every file a resume reads is there (a checkpoint being deleted loses its files in any order).

    The Trainer loads no optimizer or RNG state, silently, when their files are missing, so a checkpoint without
    them would resume, but not exactly."""
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        names = {p.name for p in path.iterdir()}
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict):
        return False
    if "step" in state:  # ours
        return all(n in names for n in OURS)
    if not all(n in names for n in TRAINER) or not any(n.startswith("rng_state") for n in names):
        return False
    if "adapter_model.safetensors" in names:
        return "adapter_config.json" in names
    return any(n in names for n in TRAINER_WEIGHTS)


def checkpoint_dirs(work: Path) -> list[Path]:
    """Every `checkpoint-<step>` directory, complete or not, oldest first."""
    found = []
    for p in work.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def checkpoints(work: Path) -> list[Path]:
    """Complete checkpoints (ours or the transformers Trainer's), oldest first."""
    return [p for p in checkpoint_dirs(work) if is_complete(p)]


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, state) of a checkpoint; the optimizer and the RNG are restored in place."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE).read_text())
    optimizer_from_tensors(optimizer, load_file(str(path / "optimizer.safetensors")), state.pop("param_groups"))
    set_rng_state(load_file(str(path / "rng.safetensors")))
    return load_file(str(path / "weights.safetensors")), state
