"""Checkpoints in safetensors and JSON only — never pickle.

align's own loop (PPO) writes `<work>/checkpoint-<step>/` with `weights.safetensors` (trainable tensors),
`optimizer.safetensors` (the optimizer's per-parameter state, flattened), `rng.safetensors` and
`trainer_state.json` (step, controller state, logs); the directory appears in one rename.

The transformers Trainer (SFT, reward, DPO) writes its `checkpoint-<step>/` in place, file by file, with
trainer_state.json last; with `SafetensorsCheckpoints` its optimizer, scheduler and RNG state are safetensors +
JSON too. A process killed meanwhile leaves a directory without trainer_state.json, or with a cut one, and old
checkpoints are deleted file by file: `is_complete` tells a checkpoint a resume can read from such remains.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from align.runtime.distributed import barrier
from align.runtime.errors import OutputError
from align.runtime.runs import atomic_dir, atomic_write_json, remove_dir

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
# what a resume reads, besides trainer_state.json: ours, and the transformers Trainer's
OURS = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors")
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
    rng = any(f"{n}.safetensors" in names and f"{n}.json" in names for n in ("rng", "rng_0"))
    if not rng or not all(n in names for n in TRAINER_SAFE):
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


# ---------------------------------------------------------------------------------------------- Trainer checkpoints

TRAINER_SAFE = ("optimizer.safetensors", "optimizer.json", "scheduler.json")  # and rng[_RANK].safetensors/.json
TRAINER_PICKLES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")


class SafetensorsCheckpoints:
    """Mixin for transformers Trainers: optimizer, scheduler and RNG state go to safetensors + JSON instead of
    torch.save pickles, and come back from there, so resuming SFT, reward or DPO unpickles nothing.
    (DeepSpeed and FSDP keep their own checkpoint formats.)"""

    def _own_format(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # transformers pickles its TrainingArguments into every checkpoint; nothing reads them back, and a run
        # directory should hold no pickle at all, so they are kept as readable JSON instead
        super()._save(output_dir, state_dict=state_dict)
        path = Path(output_dir or self.args.output_dir)
        if self.args.should_save and (path / "training_args.bin").exists():
            atomic_write_json(path / "training_args.json", json.loads(self.args.to_json_string()))
            (path / "training_args.bin").unlink()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._own_format():
            return super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        from safetensors.torch import save_file

        tensors, groups = optimizer_to_tensors(self.optimizer)
        save_file(tensors, str(Path(output_dir) / "optimizer.safetensors"))
        atomic_write_json(Path(output_dir) / "optimizer.json", groups)
        atomic_write_json(Path(output_dir) / "scheduler.json", self.lr_scheduler.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._own_format():
            return super()._load_optimizer_and_scheduler(checkpoint)
        from safetensors.torch import load_file

        path = Path(checkpoint)
        refuse_pickles(path)
        groups = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        optimizer_from_tensors(self.optimizer, load_file(str(path / "optimizer.safetensors")), groups)
        self.lr_scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text(encoding="utf-8")))

    def _save_rng_state(self, output_dir: str) -> None:
        if not self._own_format():
            return super()._save_rng_state(output_dir)
        import random

        import numpy as np
        from safetensors.torch import save_file

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors = {**rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
        name = self._rng_name()
        Path(output_dir).mkdir(parents=True, exist_ok=True)  # another process may not have made it yet
        save_file(tensors, str(Path(output_dir) / f"{name}.safetensors"))
        atomic_write_json(Path(output_dir) / f"{name}.json", {"python": random.getstate(),
                                                              "numpy": [kind, int(pos), int(has_gauss), float(cached)]})
        # the main process writes trainer_state.json, which marks the checkpoint complete, after this: only once
        # every process's random state is in it
        barrier()

    def _rng_name(self) -> str:
        # each process of a multi-process run has its own random state
        return f"rng_{self.args.process_index}" if self.args.world_size > 1 else "rng"

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._own_format():
            return super()._load_rng_state(checkpoint)
        import random

        import numpy as np
        from safetensors.torch import load_file

        path = Path(checkpoint)
        refuse_pickles(path)
        name = self._rng_name()
        if not (path / f"{name}.safetensors").is_file():
            log.warning("%s has no random state for this process (%s): the resumed run will not be exact", path, name)
            return
        tensors = load_file(str(path / f"{name}.safetensors"))
        extra = json.loads((path / f"{name}.json").read_text(encoding="utf-8"))
        version, state, gauss = extra["python"]
        random.setstate((version, tuple(state), gauss))
        kind, pos, has_gauss, cached = extra["numpy"]
        np.random.set_state((kind, tensors.pop("numpy_keys").numpy().astype(np.uint32), pos, has_gauss, cached))
        set_rng_state(tensors)


def refuse_pickles(path: Path) -> None:
    """A checkpoint whose optimizer/scheduler/RNG state exists only as pickles is refused, never unpickled."""

    pickles = [n for n in TRAINER_PICKLES if (path / n).exists()]
    if pickles and not all((path / n).is_file() for n in (*TRAINER_SAFE, "rng.safetensors")):
        raise OutputError(f"{path} keeps its training state in pickle files ({', '.join(pickles)}), which align "
                          "never loads (unpickling can run code). Start the stage over with resume=false")

