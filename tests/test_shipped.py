"""The shipped demo data and gold judge work from an installed (non-editable) package, not only from the checkout:
the wheel is built (offline) from a copy of the source, installed into a directory, and imported by a fresh
process that sees neither the repository nor a reward_data/ of its working directory. Also: where a relative
data path is looked for, in which order, and the error when the gold judge is needed but missing."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from align.data import shipped
from align.data.rows import resolve_path
from align.evaluation.judges import gold_part
from align.runtime.errors import ConfigError

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
# the fresh process: what the installed package finds, as JSON
PROBE = """
import json, align
from align.data import shipped
from align.data.rows import resolve_path
path = resolve_path("reward_data/prefs/train.jsonl")
judge = shipped.gold_judge()
print(json.dumps({"align": align.__file__, "path": str(path), "row": json.loads(path.read_text().splitlines()[0]),
                  "checkout": str(shipped.CHECKOUT), "judge": str(shipped.judge_path()),
                  "score": judge.gold_score("q", "2 + 3 = 5. The answer is 5.", 5)}))
"""


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file under root by its relative path; bytecode caches left out."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source (so the build leaves nothing in the checkout), installed with
    `pip install --target`. --no-index: neither step may reach the network."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("align", "reward_data"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp / "dist", src],
                   check=True, env=env, capture_output=True)
    (wheel,) = (tmp / "dist").glob("align_rlhf-*.whl")
    subprocess.run([*PIP, "install", "--no-deps", "--no-index", "-q", "--target", tmp / "site", wheel],
                   check=True, env=env, capture_output=True)
    return tmp / "site"


def test_the_installed_package_finds_its_data_and_gold_judge(site, tmp_path):
    empty = tmp_path / "cwd"
    empty.mkdir()
    # PYTHONPATH comes before site-packages, where the editable install's finder (a meta-path hook that runs after
    # the path-based one) would otherwise hand out the checkout's align; the assertion on align.__file__ checks it
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    ran = subprocess.run([sys.executable, "-c", PROBE], cwd=empty, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    got = json.loads(ran.stdout.strip().splitlines()[-1])
    assert Path(got["align"]).is_relative_to(site)
    assert got["checkout"] == "None"
    data = site / "align" / "_shipped" / "reward_data"
    assert Path(got["path"]) == data / "prefs" / "train.jsonl"
    assert set(got["row"]) >= {"prompt", "chosen", "rejected"}
    assert Path(got["judge"]) == data / "judge.py"
    assert got["score"] > 2  # correct 2.0 + format 0.5 + working 0.25 = 2.75
    assert not (site / "reward_data").exists()  # a copy inside align/, not a top-level package


def test_the_wheel_carries_the_repositorys_data_and_every_module(site):
    assert _files(site / "align" / "_shipped" / "reward_data") == _files(ROOT / "reward_data")
    # pyproject.toml lists align's subpackages by hand (a mapped package cannot be found): none may be missing
    installed = {p.relative_to(site).as_posix() for p in (site / "align").rglob("*.py") if "_shipped" not in p.parts}
    assert installed == {p.relative_to(ROOT).as_posix() for p in (ROOT / "align").rglob("*.py")}


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A checkout and an installed copy of reward_data/, each with one file of its own and one in common."""
    checkout, installed = tmp_path / "checkout", tmp_path / "site" / "align" / "_shipped"
    for root in (checkout, installed):
        (root / "reward_data" / "prefs").mkdir(parents=True)
        (root / "reward_data" / "prefs" / "both.jsonl").write_text("{}\n")
    (checkout / "reward_data" / "prefs" / "checkout.jsonl").write_text("{}\n")
    (installed / "reward_data" / "prefs" / "installed.jsonl").write_text("{}\n")
    (installed / "other.jsonl").write_text("{}\n")
    monkeypatch.setattr(shipped, "CHECKOUT", checkout)
    monkeypatch.setattr(shipped, "INSTALLED", installed)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd, checkout, installed


def test_a_relative_path_is_looked_for_in_the_working_directory_then_the_checkout_then_the_package(places):
    cwd, checkout, installed = places
    assert resolve_path("reward_data/prefs/both.jsonl") == checkout / "reward_data/prefs/both.jsonl"
    assert resolve_path("reward_data/prefs/installed.jsonl") == installed / "reward_data/prefs/installed.jsonl"
    assert resolve_path("reward_data/prefs/checkout.jsonl") == checkout / "reward_data/prefs/checkout.jsonl"
    (cwd / "reward_data" / "prefs").mkdir(parents=True)
    (cwd / "reward_data" / "prefs" / "both.jsonl").write_text("{}\n")
    assert resolve_path("reward_data/prefs/both.jsonl") == Path("reward_data/prefs/both.jsonl")  # the user's own
    # only the shipped data come from the installed package; anything else there is no data path
    assert resolve_path("other.jsonl") is None
    assert resolve_path("reward_data/../other.jsonl") is None
    assert resolve_path("org/some-dataset") is None  # a hub id


def test_the_gold_judge_is_optional_where_no_prompt_has_a_gold_answer_and_an_error_where_one_has(places):
    # neither place has judge.py
    assert shipped.gold_judge() is None
    answers = [("The answer is 5.", [1])]
    assert gold_part([([{"role": "user", "content": "q"}], None)], answers, answers) == {}
    with pytest.raises(ConfigError, match=r"judging the 1 prompts that carry a gold 'answer' needs the gold judge, "
                                          r"reward_data/judge.py.*reinstall"):
        gold_part([([{"role": "user", "content": "q"}], 5)], answers, answers)
    with pytest.raises(ConfigError, match="--judge gold needs the gold judge.*pass --judge runs/<run>/reward"):
        shipped.require_gold_judge("--judge gold", "pass --judge runs/<run>/reward to judge with a reward model")
