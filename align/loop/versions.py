"""Versions of a pipeline: `<runs_dir>/<name>/v1`, `v2`, ... with lineage, and the champion pointer.

    <runs_dir>/<name>/index.json       finished stage artifacts by input key (what lets a stage be skipped)
    <runs_dir>/<name>/champion.json    the current best policy (version, stage, path) and why it is there
    <runs_dir>/<name>/vN/version.json  status, what each stage is (trained here or reused from vK), evaluation,
                                       the promotion decision
    <runs_dir>/<name>/vN/<stage>/      stage outputs trained in this version (a reused stage stays where it is)

Every file here is written atomically; a version whose pipeline stopped half-way stays `running` or `failed`
and is the one the next run continues.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from align.runtime.errors import OutputError
from align.runtime.runs import CHAMPION_FILE, atomic_write_json

VERSION_FILE = "version.json"
INDEX_FILE = "index.json"
_VERSION = re.compile(r"^v(\d+)$")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Home:
    """One pipeline's directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- versions
    def versions(self) -> list[str]:
        found = [(int(m.group(1)), p.name) for p in self.root.glob("v*")
                 if (m := _VERSION.match(p.name)) and (p / VERSION_FILE).is_file()]
        return [name for _, name in sorted(found)]

    def read(self, version: str) -> dict[str, Any]:
        path = self.root / version / VERSION_FILE
        if not path.is_file():
            known = ", ".join(self.versions()) or "none yet"
            raise OutputError(f"{self.root}: no version {version!r} (versions: {known})")
        return json.loads(path.read_text(encoding="utf-8"))

    def write(self, record: dict[str, Any]) -> None:
        record["updated"] = now()
        atomic_write_json(self.root / record["version"] / VERSION_FILE, record)

    def latest(self) -> dict[str, Any] | None:
        names = self.versions()
        return self.read(names[-1]) if names else None

    def open_version(self, config: dict[str, Any], reopen: bool = False) -> dict[str, Any]:
        """The newest version when its pipeline did not finish (so the next run continues it) or when `reopen`
        (nothing new is trained, only evaluated or merged again), else a new one."""
        last = self.latest()
        if last is not None and (last["status"] != "done" or reopen):
            last.update(status="running", config=config, error=None)
            return last
        number = int(last["version"][1:]) + 1 if last else 1
        record = {"version": f"v{number}", "status": "running", "created": now(), "config": config,
                  "stages": {}, "evaluation": None, "decision": None, "error": None}
        self.write(record)
        return record

    # -- artifacts by key
    def index(self) -> dict[str, str]:
        path = self.root / INDEX_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def known(self, key: str) -> Path | None:
        """A finished artifact made from exactly these inputs, if one is still there."""
        path = self.index().get(key)
        return Path(path) if path and (Path(path) / "manifest.json").is_file() else None

    def remember(self, key: str, path: Path) -> None:
        index = self.index()
        index[key] = str(path)
        atomic_write_json(self.root / INDEX_FILE, index)

    # -- champion
    def champion(self) -> dict[str, Any] | None:
        path = self.root / CHAMPION_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def set_champion(self, champion: dict[str, Any]) -> None:
        atomic_write_json(self.root / CHAMPION_FILE, champion)


def pipelines(runs_dir: str | Path) -> list[Home]:
    """Every pipeline directory under runs_dir (one that holds at least one version)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return [Home(p) for p in sorted(runs_dir.iterdir()) if p.is_dir() and Home(p).versions()]


def find_home(runs_dir: str | Path, name: str | None) -> Home:
    """The pipeline called `name`, or the only one there is."""
    homes = pipelines(runs_dir)
    if name is not None:
        home = Home(Path(runs_dir) / name)
        if not home.versions():
            raise OutputError(f"{home.root}: no pipeline versions there; run `align run` first")
        return home
    if len(homes) == 1:
        return homes[0]
    if not homes:
        raise OutputError(f"no pipeline versions under {runs_dir}; run `align run recipes/configs/pipeline.yaml`")
    names = ", ".join(h.root.name for h in homes)
    raise OutputError(f"several pipelines under {runs_dir} ({names}); name one with --name")
