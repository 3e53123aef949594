"""The whole loop as one command: SFT → reward model → DPO and/or PPO → evaluation → promotion → merge → report.

    align run recipes/configs/pipeline.yaml               # the embedded model, offline
    align run recipes/configs/pipeline.yaml --from dpo    # DPO and everything after it again
    align run recipes/configs/pipeline.yaml data.preferences=reward_data/prefs/train.jsonl,new-pairs.jsonl

A stage is skipped when its inputs — its resolved config, the content of its data, the base model, and the
artifacts it starts from — are those of an artifact this pipeline already made. A run that trains anything is a
new version vN (align/loop/versions.py); a failed stage stops the run with its error, and the next run continues the
same version from there (the failed stage from its newest checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from align.data.rows import data_hash
from align.loop.settings import (  # noqa: F401 - the pipeline's settings, re-exported for its callers
    PARENTS,
    POLICIES,
    STAGE_ORDER,
    STEPS,
    EvalSection,
    MergeSection,
    PipelineData,
    PipelineSettings,
)
from align.loop.steps import evaluate_step, finish
from align.loop.versions import Home, now
from align.modeling.models import resolve_model
from align.runtime.config import (
    STAGES,
    StageConfig,
    _apply_override,
    _nearest,
    _read_yaml,
    all_keys,
    build,
    to_dict,
)
from align.runtime.errors import ConfigError
from align.runtime.runs import json_hash
from align.stages import dpo, grpo, ppo, reward, sft
from align.stages.rewards import names_reward_model

log = logging.getLogger(__name__)
OPT_IN = ("grpo",)  # stages a pipeline runs only when its file (or an override) names them


@dataclass
class StagePlan:
    enabled: bool
    config: str | None  # the stage's own YAML; the pipeline's keys and the pipeline-set ones win over it
    raw: dict[str, Any]


@dataclass
class Pipeline:
    settings: PipelineSettings
    stages: dict[str, StagePlan]
    round_pairs: dict[str, Any] | None = None  # this round's on-policy pairs (pairs.enabled): file and summary

    @property
    def home(self) -> Home:
        return Home(Path(self.settings.runs_dir) / self.settings.name)

    def enabled(self) -> list[str]:
        return [s for s in STAGE_ORDER if self.stages[s].enabled]


# ---------------------------------------------------------------------------------------------- config


def load_pipeline(path: str | Path | None, overrides: list[str] = ()) -> Pipeline:
    """The pipeline YAML + dotted overrides (`dpo.beta=0.25` reaches into a stage), checked before anything runs."""
    raw = _read_yaml(Path(path)) if path else {}
    stage_raw, named = {}, set()
    for stage in STAGE_ORDER:
        if raw.get(stage) is not None:
            named.add(stage)
        section = raw.pop(stage, None) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"'{stage}' must be a mapping of keys (enabled, config, or {stage} stage keys)")
        stage_raw[stage] = copy.deepcopy(section)
    for item in overrides:
        head, _, rest = item.partition(".")
        if head in STAGE_ORDER and rest:
            named.add(head)
            key, _, text = rest.partition("=")
            if key.strip() in ("enabled", "config"):
                stage_raw[head][key.strip()] = yaml.safe_load(text) if text.strip() else None
            else:
                full = f"{head}.{key.strip()}"
                if key.strip() not in all_keys(STAGES[head]):
                    known = [f"{head}.{k}" for k in ("enabled", "config", *all_keys(STAGES[head]))]
                    raise ConfigError(f"unknown config key '{full}'{_nearest(full, known)}")
                _apply_override(stage_raw[head], rest, STAGES[head])
        else:
            _apply_override(raw, item, PipelineSettings)
    settings = build(PipelineSettings, raw)
    plans = {}
    for stage, section in stage_raw.items():
        # GRPO needs rewards a user chooses (the gold judge reads the demo's answers): on when the file names it
        enabled = section.pop("enabled", stage not in OPT_IN or stage in named)
        config = section.pop("config", None)
        if not isinstance(enabled, bool):
            raise ConfigError(f"config key '{stage}.enabled' = {enabled!r}: expected true/false")
        if config is not None:
            config = _stage_yaml(stage, config, path)
        plans[stage] = StagePlan(enabled, config, section)
    pipeline = Pipeline(settings, plans)
    _check(pipeline)
    return pipeline


def _stage_yaml(stage: str, config: Any, pipeline_file: str | Path | None) -> str:
    """A stage's YAML as given, or relative to the pipeline file."""
    if isinstance(config, str):
        for candidate in (Path(config), Path(pipeline_file or ".").parent / config):
            if candidate.is_file():
                return str(candidate)
    raise ConfigError(f"config key '{stage}.config' = {config!r}: no such stage config file (paths are taken as "
                      "given, then relative to the pipeline file)")


def _check(p: Pipeline) -> None:
    enabled = p.enabled()
    if not enabled:
        raise ConfigError("every stage is disabled; enable at least sft, dpo or ppo")
    for stage in ("ppo", "grpo"):
        if stage in enabled and "reward" not in enabled and uses_reward_model(p, stage):
            raise ConfigError(f"{stage}'s rewards name reward_model, the reward stage's model: set reward.enabled=true,"
                              f" or give {stage} other rewards ({stage}.rewards=[gold]), or {stage}.enabled=false")
    placeholders = {q: Path("<parent>") for q in STAGE_ORDER}
    for stage in enabled:  # a typo or bad value in any stage fails now, not after an hour of SFT
        stage_config(p, stage, "v0", placeholders)


def _merge_into(target: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def stage_config(p: Pipeline, stage: str, version: str, parents: dict[str, Path],
                 start: dict[str, Any] | None = None) -> StageConfig:
    """The stage's config: its own YAML, then the pipeline's data for it, then the pipeline file's keys for the
    stage (so `dpo: {data: {eval: null}}` wins over the pipeline's data), then what only the pipeline decides: run
    directory, base model, parent artifacts, the policy a round starts from (`start`, see start_of). The policy
    stages' own win-rate is off: the evaluation step judges every new policy against the champion instead."""
    plan, s = p.stages[stage], p.settings
    raw = _read_yaml(Path(plan.config)) if plan.config else {}
    d = s.data
    prompts = {"train": d.prompts or d.preferences, "eval": None}
    data = {"sft": {"train": d.sft, "eval": d.sft_eval}, "ppo": prompts, "grpo": prompts
            }.get(stage, {"train": d.preferences, "eval": d.preferences_eval})
    _merge_into(raw, {"data": data})
    _merge_into(raw, plan.raw)
    forced: dict[str, Any] = {"run": version, "runs_dir": str(p.home.root), "model": to_dict(s.model)}
    if stage != "sft":
        forced["init_from_sft"] = str(parents["sft"]) if "sft" in parents else None
    if stage in ("ppo", "grpo"):
        forced["reward_model"] = str(parents["reward"]) if "reward" in parents else None
    if stage in POLICIES:
        forced["eval_prompts"] = None
        forced["init_from"] = None
        if start is not None and s.reference == "champion":  # the champion is both the start and the reference
            forced["init_from_sft"] = start["path"]
        elif start is not None:
            forced["init_from"] = start["path"]
    return build(STAGES[stage], _merge_into(raw, forced), prefix=f"{stage}.")


def start_of(p: Pipeline, champion: dict[str, Any] | None) -> dict[str, Any] | None:
    """The policy a new version's DPO, PPO and GRPO start from: the champion, when it is a trained policy (a dpo,
    ppo or grpo one: an SFT champion is what they start from anyway) and start_from is champion."""
    if p.settings.start_from != "champion" or not champion or champion.get("stage") not in POLICIES:
        return None
    return {k: champion[k] for k in ("version", "stage", "path", "key")}


def stage_key(stage: str, cfg: StageConfig, parent_keys: dict[str, str], base_model: dict[str, Any]) -> str:
    """What a stage's artifact is made from. Paths that differ between versions (run dir, parents) are left out;
    data enter by content, parents by their own keys."""

    d = to_dict(cfg)
    for name in ("run", "runs_dir", "overwrite", "resume", "init_from_sft", "init_from", "reward_model"):
        d.pop(name, None)
    d["data"]["train"] = data_hash(cfg.data.train)
    d["data"]["eval"] = data_hash(cfg.data.eval) if cfg.data.eval else None
    return json_hash({"stage": stage, "config": d, "parents": parent_keys, "base_model": base_model})


# ---------------------------------------------------------------------------------------------- running


def _stage_runner(stage: str):

    return {"sft": sft.run, "reward": reward.run, "dpo": dpo.run, "ppo": ppo.run, "grpo": grpo.run}[stage]


def plan_keys(p: Pipeline, start: dict[str, Any] | None = None) -> dict[str, str]:
    """Each enabled stage's key; a policy stage's includes the policy it starts from and how it is referenced."""
    base = resolve_model(p.settings.model).description
    keys: dict[str, str] = {}
    placeholders = {q: Path("<parent>") for q in STAGE_ORDER}
    for stage in p.enabled():
        cfg = stage_config(p, stage, "v0", placeholders, start)
        parent_keys = {q: keys[q] for q in parents_of(p, stage) if q in keys}
        if stage in POLICIES and start is not None:
            parent_keys["start"] = f"{p.settings.reference}:{start['key']}"
        keys[stage] = stage_key(stage, cfg, parent_keys, base)
    return keys


def uses_reward_model(p: Pipeline, stage: str) -> bool:
    """Whether an RL stage's rewards name the reward stage's model (PPO by default; GRPO when asked)."""
    cfg = stage_config(p, stage, "v0", {q: Path("<parent>") for q in STAGE_ORDER})
    return names_reward_model(cfg.rewards)


def parents_of(p: Pipeline, stage: str) -> tuple[str, ...]:
    """The stages this one starts from: a GRPO run on the gold judge alone does not wait for (or retrain with) the
    reward model."""
    if stage in ("ppo", "grpo") and not uses_reward_model(p, stage):
        return tuple(q for q in PARENTS[stage] if q != "reward")
    return PARENTS[stage]


def run(p: Pipeline, start: str | None = None) -> dict[str, Any]:
    """Run the loop; returns the version record (with `nothing_to_do` when every stage was already made)."""
    if start is not None and start not in STEPS:
        raise ConfigError(f"--from {start}: not a step; choose one of {', '.join(STEPS)}")
    home, forced = p.home, set(STEPS[STEPS.index(start):]) if start else set()
    last = home.latest()
    _round_pairs(p, home, last, fresh_round=start is None)
    policy_start = (last or {}).get("start")  # what the latest version's policies started from
    keys = plan_keys(p, policy_start)
    made = {stage: None if stage in forced else home.known(key) for stage, key in keys.items()}
    to_train = [stage for stage, path in made.items() if path is None]
    awaiting = bool(((last or {}).get("decision") or {}).get("awaiting"))  # people may have judged since
    if not to_train and last is not None and last["status"] == "done" and not forced and not awaiting:
        where = ", ".join(f"{stage} ({path})" for stage, path in made.items())
        log.info("nothing to do: every stage is up to date: %s", where)
        return {**last, "nothing_to_do": True}
    if to_train and (last is None or last["status"] == "done"):  # a new version: it starts from today's champion
        fresh = start_of(p, home.champion())
        if fresh != policy_start:
            policy_start = fresh
            keys = plan_keys(p, policy_start)
            made = {stage: None if stage in forced else home.known(key) for stage, key in keys.items()}
            to_train = [stage for stage, path in made.items() if path is None]
    record = home.open_version(dataclasses.asdict(p.settings), reopen=not to_train)
    record["start"] = policy_start
    if p.round_pairs:
        record["pairs"] = p.round_pairs
    if policy_start:
        log.info("DPO, PPO and GRPO start from the champion, %s %s (%s); their reference is %s",
                 policy_start["version"], policy_start["stage"], policy_start["path"],
                 "that policy" if p.settings.reference == "champion" else "the SFT adapter")
    version = record["version"]
    log.info("pipeline %s, version %s: %s", p.settings.name, version,
             f"training {', '.join(to_train)}" if to_train else "nothing to train")
    record["stages"] = {s: e for s, e in record["stages"].items() if s in keys}
    for stage in p.enabled():
        _run_stage(p, home, record, stage, keys[stage], made[stage])

    _step(home, record, "evaluate", lambda: evaluate_step(p, home, record, force="evaluate" in forced))
    _step(home, record, "merge", lambda: finish(p, home, record))
    record["status"] = "done"
    home.write(record)
    return record


def _round_pairs(p: Pipeline, home: Home, last: dict[str, Any] | None, fresh_round: bool) -> None:
    """With pairs.enabled, the on-policy pairs of this round go in front of data.preferences: the latest version's
    when it is continued or steps of it run again (--from), else new ones sampled from the champion on prompts no
    earlier round used."""
    s = p.settings
    if not s.pairs.enabled:
        return
    if last is not None and (last["status"] != "done" or not fresh_round):  # continued, or --from STEP: as it was
        made = last.get("pairs")
    elif home.champion() is None:
        made = None
        log.info("pairs: no champion yet to sample; this round trains on data.preferences alone")
    else:
        from align.loop.onpolicy import sample_pairs  # loads torch and the champion: only when a round samples
        from align.modeling.generate import Sampling  # (with the sampler above: torch, only when a round samples)

        number = int(last["version"][1:]) + 1
        out = home.root / "pairs" / f"v{number}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        q = s.pairs
        log.info("pairs: sampling the champion on %d new prompts, %d answers each", q.limit, q.n)
        summary = sample_pairs(str(home.root), q.prompts or s.data.prompts or s.data.preferences, str(out),
                               sampling=Sampling(q.temperature, 1.0, q.n), max_new_tokens=q.max_new_tokens,
                               limit=q.limit, device=s.evaluate.device, force=True, fresh=True)
        log.info("pairs: %d pairs from %d prompts (%d used before were left out) -> %s", summary["pairs"],
                 summary["prompts"], summary["skipped_as_used"], out)
        made = {**summary, "file": str(out)} if summary["pairs"] else None
    if made:
        p.round_pairs = made
        s.data = dataclasses.replace(s.data, preferences=f"{made['file']},{s.data.preferences}")


def _step(home: Home, record: dict[str, Any], name: str, fn) -> None:
    try:
        fn()
    except BaseException as e:
        record.update(status="failed", error={"step": name, "message": str(e) or type(e).__name__, "at": now()})
        home.write(record)
        raise


def _run_stage(p: Pipeline, home: Home, record: dict[str, Any], stage: str, key: str, made: Path | None) -> None:
    version = record["version"]
    if made is not None:
        origin = made.parent.name
        parents = (home.read(origin)["stages"].get(stage) or {}).get("parents") if origin in home.versions() else None
        record["stages"][stage] = {"path": str(made), "key": key, "made_in": origin, "trained": origin == version,
                                   "parents": parents or {}}
        if origin != version:
            log.info("%s: inputs unchanged since %s; reusing %s", stage, origin, made)
        home.write(record)
        return
    parents = {q: Path(record["stages"][q]["path"]) for q in parents_of(p, stage) if q in record["stages"]}
    start = record.get("start") if stage in POLICIES else None
    cfg = stage_config(p, stage, version, parents, start)
    if start:  # the lineage names the policy it started from
        parents["start"] = Path(start["path"])
    out = home.root / version / stage
    if out.exists():  # an earlier attempt of this unfinished version made it from other inputs
        cfg = dataclasses.replace(cfg, overwrite=True)
    log.info("%s: training into %s", stage, out)
    started = time.time()

    def train() -> None:
        path = _stage_runner(stage)(cfg)
        home.remember(key, Path(path))
        record["stages"][stage] = {"path": str(path), "key": key, "made_in": version, "trained": True,
                                   "seconds": round(time.time() - started, 1),
                                   "parents": {q: str(v) for q, v in parents.items()}}
        home.write(record)

    _step(home, record, stage, train)
