"""Run directories, manifests and atomic writes.

A stage's finished output is `<runs_dir>/<run>/<stage>/`. It appears in one `rename`, so a reader never sees
half an artifact: the stage trains in `<stage>.work/` (checkpoints, logs), assembles its output in a temporary
sibling directory, and renames that into place as the last step.

Temporary names carry their writer (`.NAME.HOST-PID.XXXXXXXX.tmp`, `.NAME.HOST-PID.TIME.old`), so that what a
killed writer left behind is recognised (its process is gone) and removed by the next writer of the same name
instead of piling up.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from align.runtime.errors import OutputError

MANIFEST = "manifest.json"
CHAMPION_FILE = "champion.json"  # in a pipeline's directory: which version's policy is its champion
LIBRARIES = ("align-rlhf", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Content hash of a file, or of every file under a directory (names included, order fixed)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_HOST = re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname()) or "host"


def _writer() -> str:
    """`HOST-PID` of this process, put in the names of its temporary files and directories."""
    return f"{_HOST}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(directory: str | Path, name: str = "*") -> list[Path]:
    """Remove the temporary entries (`.NAME.HOST-PID.*.tmp` / `.old`) in `directory` whose writer on this host is
    gone — a process killed while it wrote `NAME` (any name by default). A live writer's are left alone."""
    directory = Path(directory)
    prefix = f".{glob.escape(name) if name != '*' else '*'}.{glob.escape(_HOST)}-"
    pattern = re.compile(rf"\.(?:.+)\.{re.escape(_HOST)}-(\d+)\.[^/]+\.(?:tmp|old)")
    removed = []
    for entry in directory.glob(prefix + "*"):
        m = pattern.fullmatch(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def remove_dir(path: str | Path) -> None:
    """Delete a directory so that no one ever sees it half-deleted: renamed aside in one step, then removed (a kill
    during the removal leaves a stale `.NAME.HOST-PID.TIME.old` that remove_stale clears, not a partial NAME)."""
    path = Path(path)
    remove_stale(path.parent, path.name)
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.{_writer()}.{time.time_ns()}.old")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `final` only if the block finishes.

    With `overwrite`, an existing `final` is moved aside first and deleted only after the new one is in place.
    What killed writers of `final` left (their temporary copies) is removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_nonempty_dir(final) and not overwrite:
        raise OutputError(f"{final} already exists and is not empty; pass overwrite=true to replace it")
    remove_stale(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{_writer()}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes an owner-only directory
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.{_writer()}.{time.time_ns()}.old")
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_nonempty_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.iterdir())


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_sha(cwd: str | Path | None = None) -> str | None:
    """The commit of the code that ran (the package's checkout), with '-dirty' for uncommitted changes."""
    cwd = Path(cwd or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def make_manifest(stage: str, run: str, inputs: dict[str, str], base_model: dict[str, Any],
                  parent: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "stage": stage,
        "run": run,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": base_model,
        "parent": parent,
        "inputs": inputs,
        "libraries": library_versions(),
        "git_sha": git_sha(),
        **(extra or {}),
    }


def read_manifest(stage_dir: str | Path) -> dict[str, Any]:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise OutputError(f"{stage_dir} has no {MANIFEST}: it is not a finished align stage output")
    return json.loads(path.read_text(encoding="utf-8"))
