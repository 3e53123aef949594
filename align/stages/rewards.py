"""What the RL stages (GRPO, PPO) maximise: a weighted sum of rewards, each a function of (prompt, answer, row)
or a trained reward model.

    rewards: [gold, {source: format, weight: 0.5}, {source: my_rewards.py:brevity, weight: 0.2}]

Sources: `gold` (the shipped arithmetic judge; rows need an integer 'answer'), `format` (the shipped task's
closing sentence), `reward_model` (the run named by the stage's reward_model=), a reward run or merged reward
model directory, or a user's function `path/to/file.py:fn` / `module:fn`. A function is called as
fn(prompt, answer, row): the last user message's text, the sampled answer's text, and the prompt's data row (a
dict, so a checker can read its reference answer). It must return a finite number; anything else stops the run
with a message naming the function, the row and what came back — a reward that silently turns into 0 or NaN
would train the policy on nonsense.

Each term's mean is logged on its own, so a run shows which reward moved. Rows a term cannot score (gold without
an 'answer') are rejected when the data is read, before a model is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.data.shipped import require_gold_judge
from align.runtime.config import RewardTerm
from align.runtime.errors import ConfigError, RewardError, RowError
from align.runtime.runs import sha256_path

REWARD_MODEL = "reward_model"
Fn = Callable[[str, str, dict[str, Any]], Any]


@dataclass
class Term:
    name: str                  # as logged: gold, format, reward_model, my_rewards.py:brevity
    weight: float
    fn: Fn | None = None       # None: a reward model, scored by the stage (an adapter role on the same base)
    model: Path | None = None  # the reward run or merged reward model of a model term
    needs: Callable[[dict[str, Any]], None] | None = None  # raises RowError for a row this term cannot score


def _int_answer(row: dict[str, Any]) -> None:
    answer = row.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise RowError(f"the gold reward needs an integer 'answer' in every prompt row, got {answer!r}; add the "
                       "answers, or choose other rewards (rewards=[...])")


def _judge():
    return require_gold_judge("the gold and format rewards", "choose other rewards (rewards=[...])")


def _gold() -> Fn:
    judge = _judge()
    return lambda prompt, answer, row: judge.gold_score(prompt, answer, row["answer"])


def _format() -> Fn:
    judge = _judge()

    def format_reward(prompt: str, answer: str, row: dict[str, Any]) -> float:
        gold = row.get("answer")
        parts = judge.gold_breakdown(prompt, answer, gold if isinstance(gold, int) else 0)
        return 1.0 if parts["format"] > 0 else 0.0  # the format part does not depend on the answer being right

    return format_reward


def _user_function(source: str) -> Fn:
    """`path/to/file.py:fn` or `module.sub:fn`, imported now so a typo fails before a model loads."""
    where, sep, attr = source.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise ConfigError(f"reward {source!r}: not a known reward, a directory, or a function written as "
                          "path/to/file.py:fn or module:fn")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"reward {source!r}: no such file {where}")
        name = f"align_reward_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling inside the user's module look themselves up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's code: whatever it raises is theirs to fix, with the reason shown
            raise ConfigError(f"reward {source!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise ConfigError(f"reward {source!r}: cannot import module {where!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward {source!r}: {where} has no function {attr!r}")
    return fn


def spec_of(item: RewardTerm | str) -> RewardTerm:
    """A configured reward as {source, weight}: a bare source weighs 1."""
    spec = item if isinstance(item, RewardTerm) else RewardTerm(source=item)
    return RewardTerm(source=spec.source.strip(), weight=spec.weight)


def names_reward_model(rewards: list[RewardTerm | str]) -> bool:
    """Whether the rewards name the stage's reward_model= (the pipeline's reward stage)."""
    return any(spec_of(r).source == REWARD_MODEL for r in rewards)


def terms_of(rewards: list[RewardTerm | str], reward_model: str | None) -> list[Term]:
    """The configured rewards, resolved and checked: functions imported, directories found."""
    if not rewards:
        raise ConfigError("rewards is empty: name at least one, e.g. rewards=[gold] or rewards=[reward_model]")
    terms: list[Term] = []
    for item in rewards:
        spec = spec_of(item)
        source = spec.source
        if source == "gold":
            term = Term("gold", spec.weight, _gold(), needs=_int_answer)
        elif source == "format":
            term = Term("format", spec.weight, _format())
        elif source == REWARD_MODEL:
            if not reward_model:
                raise ConfigError("rewards names reward_model, but reward_model= is empty: pass reward_model=runs/"
                                  "<run>/reward (train one with `align reward`), or choose other rewards")
            term = Term(REWARD_MODEL, spec.weight, model=Path(reward_model))
        elif Path(source).expanduser().is_dir():
            term = Term(source, spec.weight, model=Path(source).expanduser())
        else:
            term = Term(source, spec.weight, _user_function(source))
        if term.name in [t.name for t in terms]:
            raise ConfigError(f"rewards names {term.name!r} twice; give it one entry with the weight you want")
        terms.append(term)
    models = [t for t in terms if t.model is not None]
    if len(models) > 1:
        raise ConfigError(f"rewards names {len(models)} reward models ({', '.join(t.name for t in models)}); one "
                          "run uses one reward model")
    return terms


def model_term(terms: list[Term]) -> Term | None:
    return next((t for t in terms if t.model is not None), None)


def reward_inputs(terms: list[Term]) -> dict[str, str]:
    """Content hashes of what the rewards are made of (a reward model's weights, a function's file), so a stage
    whose reward changed is trained again."""
    out = {}
    for t in terms:
        if t.model is not None:
            weights = [t.model / n for n in ("adapter_model.safetensors", "model.safetensors")
                       if (t.model / n).is_file()]
            out[f"reward:{t.name}"] = sha256_path(weights[0] if weights else t.model)
        elif t.name.rpartition(":")[0].endswith(".py"):
            out[f"reward:{t.name}"] = sha256_path(Path(t.name.rpartition(":")[0]).expanduser())
    return out


def reward_names(terms: list[Term]) -> list[dict[str, Any]]:
    """What a manifest records of the rewards: each one's name, weight and, for a reward model, its directory."""
    return [{"name": t.name, "weight": t.weight, **({"model": str(t.model.resolve())} if t.model else {})}
            for t in terms]


def check_row(terms: list[Term], row: dict[str, Any]) -> None:
    """Raise RowError when a term cannot score this prompt row (the loader rejects it with the reason)."""
    for t in terms:
        if t.needs is not None:
            t.needs(row)


def call(term: Term, prompt: str, answer: str, row: dict[str, Any], where: str) -> float:
    """One function reward; a failure names the function, the row and what it gave."""
    shown = f"on {where} (prompt {prompt[:60]!r}, answer {answer[:60]!r})"
    try:
        value = term.fn(prompt, answer, row)
    except Exception as e:  # the user's code: stop with its reason, not a traceback from deep in the loop
        raise RewardError(f"reward {term.name!r} raised {type(e).__name__}: {e} {shown}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(f"reward {term.name!r} returned {value!r} ({type(value).__name__}) {shown}; it must "
                          "return a number")
    if not math.isfinite(float(value)):
        raise RewardError(f"reward {term.name!r} returned {value!r} {shown}; it must return a finite number")
    return float(value)


def combine(terms: list[Term], prompts: list[str], answers: list[str], rows: list[dict[str, Any]],
            wheres: list[str], model_scores: list[float] | None) -> tuple[list[float], dict[str, float]]:
    """Each answer's weighted total, and each term's mean over the batch (unweighted, as the term gives it)."""
    totals = [0.0] * len(answers)
    means: dict[str, float] = {}
    for t in terms:
        if t.fn is None:
            if model_scores is None:
                raise ValueError(f"reward {t.name!r} is a reward model, but no scores were given")
            values = list(model_scores)
        else:
            values = [call(t, p, a, r, w) for p, a, r, w in zip(prompts, answers, rows, wheres)]
        means[t.name] = sum(values) / len(values) if values else 0.0
        totals = [s + t.weight * v for s, v in zip(totals, values)]
    return totals, means
