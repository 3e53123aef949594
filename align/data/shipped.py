"""Where the shipped demo data live, and the one place that finds them: reward_data/ (the arithmetic word
problems: SFT examples, preference pairs, held-out prompts, their card) and its gold judge (judge.py, which
loads its sibling tasks.py).

A source checkout, or an editable install of one, uses the repository's reward_data/. A wheel carries a copy
inside the package, align/_shipped/reward_data/ (pyproject.toml maps the directory there), so an installed
`align` has the demo's data and judge without the repository. A relative data path is looked up

    1. as given, in the working directory (a reward_data/ of the user's own wins) — the caller does this;
    2. in the checkout align/ was imported from (any relative path, as before the package shipped its data);
    3. a path under reward_data/: in the copy inside the installed package.

The gold judge is code, so it is never taken from the working directory: the checkout's, else the installed
copy. Standard library only (the data readers and the CLI's parser import this without torch).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

from align.runtime.errors import ConfigError

SHIPPED = "reward_data"
JUDGE = f"{SHIPPED}/judge.py"
_PACKAGE = Path(__file__).resolve().parents[1]
# the copy of reward_data/ inside an installed package (absent in a checkout: there the repository's is used)
INSTALLED = _PACKAGE / "_shipped"


def _checkout() -> Path | None:
    root = _PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / SHIPPED).is_dir() else None


# the repository root when align/ is imported from a source tree (or an editable install of one), else None
CHECKOUT = _checkout()


def locate(spec: str | Path) -> Path | None:
    """Where a relative path that is not in the working directory is found: in the checkout, else (a path under
    reward_data/) in the installed copy; None when neither has it, or the path is absolute."""
    p = Path(spec).expanduser()
    if p.is_absolute():
        return None
    if CHECKOUT is not None and (CHECKOUT / p).exists():
        return CHECKOUT / p
    if p.parts[:1] == (SHIPPED,) and ".." not in p.parts and (INSTALLED / p).exists():
        return INSTALLED / p
    return None


def judge_path() -> Path | None:
    """reward_data/judge.py of the checkout, else of the installed package; None when neither has one."""
    for root in (CHECKOUT, INSTALLED):
        if root is not None and (root / JUDGE).is_file():
            return root / JUDGE
    return None


@functools.cache
def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("align_gold_judge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gold_judge() -> ModuleType | None:
    """The gold judge (gold_score, gold_breakdown, judge_pair; see reward_data/judge.py), or None when there is
    none — for a caller to whom it is optional. A caller that needs it calls require_gold_judge."""
    path = judge_path()
    return None if path is None else _load(path)


def require_gold_judge(purpose: str, instead: str = "judge with a reward model") -> ModuleType:
    """The gold judge, or a ConfigError that says who needs it, where it was looked for and what to do."""
    judge = gold_judge()
    if judge is None:
        places = [str(root / JUDGE) for root in (CHECKOUT, INSTALLED) if root is not None]
        raise ConfigError(f"{purpose} needs the gold judge, {JUDGE}, and there is none (looked for "
                          f"{' and '.join(places)}): the align-rlhf wheel ships it, so reinstall the package, or "
                          f"{instead}")
    return judge
