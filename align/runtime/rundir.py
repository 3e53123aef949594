"""A stage's run directory from start to finish, in one place: refuse or resume, find and check the newest
checkpoint, clear what killed writers left behind, and say when a finished output is already up to date.

Layout of one stage of one run:
    <runs_dir>/<run>/<stage>/          the finished artifact (appears atomically, last: align.runtime.runs)
    <runs_dir>/<run>/<stage>.work/     checkpoints and the inputs they were made from, while training
    <runs_dir>/<run>/rejects/          rejected data rows with reasons

Calls go one way from here: to checkpoint (what a checkpoint holds), runs (atomic files) and distributed (only
the main process touches the directory).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from align.runtime.checkpoint import checkpoint_dirs, checkpoints, is_complete, refuse_pickles
from align.runtime.config import StageConfig
from align.runtime.distributed import on_main
from align.runtime.errors import OutputError
from align.runtime.runs import atomic_write_json, is_nonempty_dir, remove_dir, remove_stale

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


def check_new_output(cfg: StageConfig, paths: StagePaths) -> None:
    if is_nonempty_dir(paths.out) and not cfg.overwrite and not (paths.out / "manifest.json").is_file():
        raise OutputError(f"{paths.out} exists and is not an align stage output; choose another run or runs_dir")


def newest_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoint (align.runtime.checkpoint.is_complete): never one a killed writer left
    half-written."""
    found = checkpoints(work)
    return found[-1] if found else None


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


def nothing_to_train(cfg: StageConfig, paths: StagePaths, inputs: dict[str, str],
                     made_from: str = "base model, data and config") -> bool:
    """up_to_date, and then say so and clear the work dir (a run killed after its output appeared may have left
    its checkpoints there)."""
    if not up_to_date(cfg, paths, inputs):
        return False
    on_main(lambda: remove_dir(paths.work), lambda: None)
    log.info("%s is up to date (same %s); nothing to train. Use overwrite=true to train it again", paths.out,
             made_from)
    return True


def prepare_output(cfg: StageConfig, paths: StagePaths, inputs: dict[str, str]) -> Path | None:
    """Make the work directory; return the checkpoint to resume from, if any (every process of a multi-process
    run gets it; only the main process touches the directory)."""
    return on_main(lambda: _prepare_output(cfg, paths, inputs), lambda: newest_checkpoint(paths.work))


def _prepare_output(cfg: StageConfig, paths: StagePaths, inputs: dict[str, str]) -> Path | None:
    """Make the work directory; return the checkpoint to resume from, if any.

    A checkpoint is only resumed when it was made from the same inputs (data and config hashes). What a killed
    run left half-done is removed first: incomplete checkpoint directories (the trainer then writes the same step
    again into a fresh directory, and its rotation, which orders by modification time, never counts them) and
    temporary files of killed writers.
    """

    inputs_file = paths.work / "inputs.json"
    remove_stale(paths.run_dir, paths.work.name)
    if cfg.resume and paths.work.is_dir() and checkpoint_dirs(paths.work):
        before = json.loads(inputs_file.read_text()) if inputs_file.is_file() else {}
        changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
        if changed:
            raise OutputError(f"{paths.work} holds checkpoints of an interrupted run made from other inputs "
                              f"({', '.join(changed)} changed). Use resume=false to start over, or another run name")
        remove_stale(paths.work)
        for partial in checkpoint_dirs(paths.work):
            refuse_pickles(partial)  # not removed either: it may be someone's; the message says what to do
            if not is_complete(partial):
                log.warning("removing %s: its writing (or deletion) was interrupted", partial)
                remove_dir(partial)
        ckpt = newest_checkpoint(paths.work)
        if ckpt is not None:
            log.info("resuming from %s", ckpt)
            return ckpt
    remove_dir(paths.work)  # renamed aside first: never seen half-deleted
    paths.work.mkdir(parents=True)
    atomic_write_json(inputs_file, inputs)
    return None
