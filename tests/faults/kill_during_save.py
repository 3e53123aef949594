"""Run one align stage in this process with every file write under a directory booby-trapped: the process
SIGKILLs itself at a chosen write, so a crash lands exactly while a checkpoint or a final artifact is written.

    python tests/faults/kill_during_save.py SPEC.json
    python tests/faults/kill_during_save.py --serve      # SPEC paths on stdin, each run in a forked child

SPEC is a JSON object:
    stage       sft | reward | dpo | ppo
    overrides   the stage's dotted config overrides (as the tests pass them to align.config.load_config)
    root        writes under this directory are "events" (the run's runs_dir)
    events      a file outside `root`: every event is appended to it as a JSON line, as it happens
    kill        optional {"event": [kind, path], "occurrence": n, "mode": before|partial|after, "seed": s}: die at
                the n-th event of that kind and (normalised) path in this process
    log         (--serve only) where the child's stdout and stderr go

An event is one of: a file written by safetensors' save_file, by torch.save, or by open(..., "w"/"a"/"x"/"+")
(which covers json, yaml, os.fdopen and pathlib writes); an os.replace / os.rename; a shutil.rmtree. The
tokenizer's tokenizer.json (written by Rust) is not seen. Paths are relative to `root`, with the random parts of
temporary names (mkstemp/mkdtemp suffixes, pids, times) replaced, so that the same moment of another run (a
resumed one) has the same name.

Kill modes: `before` dies before the call; `after` right after it; `partial` (file writes and rmtree) does the
write, cuts the file to a random length (or deletes a random share of the tree) and then dies — what the disk
holds when a process is killed in the middle of writing it.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from align.runtime.runs import _HOST  # (light: no torch)


def normalise(rel: str) -> str:
    """A path with the random parts of temporary names taken out (align.runs names them
    `.NAME.HOST-PID.XXXXXXXX.tmp` and `.NAME.HOST-PID.TIME.old`): `.x.json.vm-812.ab12cd_z.tmp` -> `.x.json.W.X.tmp`."""
    parts = []
    for part in rel.split("/"):
        if part.startswith("."):
            part = re.sub(rf"\.{re.escape(_HOST)}-\d+\.", ".W.", part)  # the writer: host-pid
            part = re.sub(r"\.[a-z0-9_]{8}\.tmp$", ".X.tmp", part)  # mkstemp / mkdtemp
            part = re.sub(r"\.\d+\.old$", ".T.old", part)  # a time
        parts.append(part)
    return "/".join(parts)


class Faults:
    def __init__(self, root: Path, events: Path, kill: dict | None):
        self.root = str(root.resolve())
        self.events_fd = os.open(events, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.kill = kill
        self.seen: dict[tuple[str, str], int] = {}
        self.rng = random.Random(kill["seed"] if kill else 0)

    def rel(self, path) -> str | None:
        if isinstance(path, int):
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return None
        if not isinstance(path, (str, os.PathLike)):
            return None
        full = os.path.abspath(os.fspath(path))
        if full != self.root and not full.startswith(self.root + os.sep):
            return None
        return normalise(os.path.relpath(full, self.root))

    def event(self, kind: str, rel: str) -> str | None:
        """Record an event; return the kill mode if this is the one to die at."""
        key = (kind, rel)
        self.seen[key] = n = self.seen.get(key, 0) + 1
        os.write(self.events_fd, (json.dumps({"kind": kind, "path": rel, "occurrence": n}) + "\n").encode())
        k = self.kill
        if k and [kind, rel] == list(k["event"]) and n == k["occurrence"]:
            return k["mode"]
        return None

    def die(self, what: str) -> None:
        os.write(self.events_fd, (json.dumps({"killed": what}) + "\n").encode())
        os.write(2, f"\nKILL_DURING_SAVE: SIGKILL {what}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)

    def cut(self, path: str, what: str) -> None:
        """Leave a random-length prefix of the file just written, then die."""
        size = os.path.getsize(path)
        keep = self.rng.randrange(size) if size else 0
        os.truncate(path, keep)
        self.die(f"{what} (cut to {keep} of {size} bytes)")


def install(faults: Faults) -> None:
    """Replace the writing functions everywhere they are bound (module attributes and `from x import f` names)."""
    import safetensors.torch
    import torch

    originals = {"save_file": safetensors.torch.save_file, "torch.save": torch.save, "open": io.open,
                 "replace": os.replace, "rename": os.rename, "rmtree": shutil.rmtree}

    def file_writer(kind: str, real, path_of):
        def wrapper(*args, **kwargs):
            path = path_of(args, kwargs)
            rel = faults.rel(path) if path is not None else None
            mode = faults.event(kind, rel) if rel is not None else None
            if mode == "before":
                faults.die(f"before {kind} {rel}")
            out = real(*args, **kwargs)
            if mode == "partial":
                faults.cut(os.fspath(path), f"partial {kind} {rel}")
            if mode == "after":
                faults.die(f"after {kind} {rel}")
            return out
        return wrapper

    def mover(kind: str, real):
        def wrapper(src, dst, *args, **kwargs):
            rel = faults.rel(dst) or faults.rel(src)
            mode = faults.event("replace", f"{faults.rel(src)} -> {faults.rel(dst)}") if rel is not None else None
            if mode in ("before", "partial"):
                faults.die(f"before {kind} {rel}")
            out = real(src, dst, *args, **kwargs)
            if mode == "after":
                faults.die(f"after {kind} {rel}")
            return out
        return wrapper

    def rmtree(path, *args, **kwargs):
        rel = faults.rel(path)
        mode = faults.event("rmtree", rel) if rel is not None else None
        if mode == "before":
            faults.die(f"before rmtree {rel}")
        if mode == "partial":
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
            gone = faults.rng.randrange(len(files) + 1)
            for f in files[:gone]:
                os.unlink(f)
            faults.die(f"partial rmtree {rel} ({gone} of {len(files)} files deleted)")
        out = originals["rmtree"](path, *args, **kwargs)
        if mode == "after":
            faults.die(f"after rmtree {rel}")
        return out

    class Closing:
        """A file object that reports its close (the moment its content is all written)."""

        def __init__(self, f, path, mode, rel):
            self._f, self._path, self._mode, self._rel = f, path, mode, rel

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __iter__(self):
            return iter(self._f)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()
            return False

        def close(self):
            self._f.close()
            if self._mode == "partial":
                faults.cut(self._path, f"partial open {self._rel}")
            if self._mode == "after":
                faults.die(f"after open {self._rel}")

    real_open = originals["open"]

    def opener(file, mode="r", *args, **kwargs):
        writes = any(c in mode for c in "wax+")
        rel = faults.rel(file) if writes else None
        kill = faults.event("open", rel) if rel is not None else None
        if kill == "before":
            faults.die(f"before open {rel}")
        f = real_open(file, mode, *args, **kwargs)
        if kill in ("partial", "after"):
            path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
            return Closing(f, path, kill, rel)
        return f

    replacements = {
        id(originals["save_file"]): file_writer("save_file", originals["save_file"],
                                                lambda a, k: a[1] if len(a) > 1 else k.get("filename")),
        id(originals["torch.save"]): file_writer("torch.save", originals["torch.save"],
                                                 lambda a, k: a[1] if len(a) > 1 else k.get("f")),
        id(originals["open"]): opener,
        id(originals["replace"]): mover("replace", originals["replace"]),
        id(originals["rename"]): mover("rename", originals["rename"]),
        id(originals["rmtree"]): rmtree,
    }
    by_id = {id(v): v for v in originals.values()}
    for module in list(sys.modules.values()):
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for name, value in items:
            if id(value) in by_id and by_id[id(value)] is value:
                try:
                    setattr(module, name, replacements[id(value)])
                except (AttributeError, TypeError):
                    pass


def preload() -> None:
    """Import everything a stage uses (and everything that binds a writing function by name) up front."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers.trainer  # noqa: F401
    import trl  # noqa: F401
    from trl import RewardTrainer, SFTTrainer  # noqa: F401

    from align.stages import dpo, ppo, reward, sft  # noqa: F401


def run(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import logging

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("align").setLevel(logging.INFO)  # "resuming from ..." says which checkpoint a run read
    preload()
    from align.runtime.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, load_config
    from align.stages import dpo, ppo, reward, sft

    stages = {"sft": (sft, SFTConfig), "reward": (reward, RewardConfig), "dpo": (dpo, DPOConfig),
              "ppo": (ppo, PPOConfig)}
    module, cls = stages[spec["stage"]]
    cfg = load_config(cls, None, spec["overrides"])
    install(Faults(Path(spec["root"]), Path(spec["events"]), spec.get("kill")))
    out = module.run(cfg)
    print(f"KILL_DURING_SAVE: finished {out}", flush=True)


def serve() -> None:
    """Import once, then run each SPEC path read from stdin in a forked child (a process of its own, killed
    alone), its output going to SPEC's "log" file; answer each with one JSON line: {"returncode": ...} (negative:
    the signal that ended it), as subprocess would say it. Saves the ~6 s of imports per run."""
    preload()
    for line in sys.stdin:
        spec_path = line.strip()
        if not spec_path:
            continue
        log = json.loads(Path(spec_path).read_text())["log"]
        pid = os.fork()
        if pid == 0:  # the child: a run of its own
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                run(spec_path)
                code = 0
            except BaseException:  # noqa: BLE001 - whatever ended the run, say it and exit non-zero
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": rc}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        run(sys.argv[1])
