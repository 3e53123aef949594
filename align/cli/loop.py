"""`align run` (the whole loop) and `align runs` (its versions): parsers and printing."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from align.evaluation.progress import version_points
from align.loop.settings import STEPS, PipelineSettings
from align.loop.versions import find_home
from align.runtime.config import describe
from align.runtime.errors import ConfigError

RUN_EPILOG = """\
steps: sft, reward, dpo, ppo, evaluate, merge (a stage with enabled: false is left out)
  A stage whose inputs (resolved config, data content, base model, the artifacts it starts from) are those of an
  artifact this pipeline already made is skipped and says so. A run that trains anything makes a new version
  <runs_dir>/<name>/vN with report.md; a failed step stops the run, and the next `align run` continues it.

configuration:
  The pipeline YAML, then KEY=VALUE overrides; keys under a stage reach into that stage's own config, e.g.
    align run recipes/configs/pipeline.yaml dpo.beta=0.25 ppo.enabled=false
    align run recipes/configs/pipeline.yaml data.preferences=reward_data/prefs/train.jsonl,my-new-pairs.jsonl
  Stage sections: enabled (true/false), config (the stage's own YAML), and any key of that stage
  (`align sft --help` etc.). Pipeline keys:
"""


def add_parsers(sub) -> None:
    p = sub.add_parser("run", help="the whole loop: SFT → reward → DPO/PPO → evaluate → promote → merge → report",
                       description="Run the alignment loop as versioned, resumable pipeline.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=RUN_EPILOG + "\n".join(describe(PipelineSettings)))
    p.add_argument("config", nargs="?", metavar="PIPELINE.yaml", help="pipeline config (default: built-in "
                   "defaults, same as recipes/configs/pipeline.yaml without its demo sizes)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--from", dest="start", choices=STEPS, metavar="STEP",
                   help=f"run this step and every one after it again even if unchanged ({', '.join(STEPS)})")
    r = sub.add_parser("runs", help="list a pipeline's versions with their key metrics; `runs show vN` for one",
                       description="List pipeline versions, or show one with its lineage.")
    r.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    r.add_argument("version", nargs="?", metavar="vN", help="with show: the version (default: the latest)")
    r.add_argument("--name", help="the pipeline (default: the only one under --runs-dir)")
    r.add_argument("--runs-dir", default="runs", metavar="DIR", help="where pipelines live (default runs)")


def run_command(args: argparse.Namespace) -> int:
    # loaded for this verb only: it brings torch and the models, which `align --help` does not need
    from align.loop.pipeline import load_pipeline, run
    from align.runtime.distributed import launched

    if launched():
        raise ConfigError("`align run` drives the whole loop from one process (its evaluation, promotion and merge "
                          "are single-process); launch the stages you want to scale out instead, e.g. "
                          "`accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/dpo.py ...`")
    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)  # `align run key=value` with no file
        config = None
    p = load_pipeline(config, overrides)
    try:
        record = run(p, args.start)
    except Exception:
        print(f"the pipeline stopped; fix the cause and run the same command again: finished stages are kept and "
              f"the failed one continues from its newest checkpoint ({p.home.root})", file=sys.stderr)
        raise
    if record.get("nothing_to_do"):
        print(f"nothing to do: every stage of {p.settings.name} is up to date (latest {record['version']}, report "
              f"{record.get('report')}); use --from STEP to run steps again")
        return 0
    print_version(record, p.home.champion())
    return 0


def _pct(v: Any) -> str:
    return "—" if v is None else f"{v:.1%}"


def _num(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}"


def _counts(m: dict[str, Any], judge: str) -> str:
    """'12/17/3, p = 0.035': wins / ties / losses and the sign test, so a win-rate is read with its certainty."""
    if m.get(f"{judge}_wins") is None:
        return ""
    p = m.get(f"{judge}_sign_test_p")
    return f"{m[f'{judge}_wins']}/{m[f'{judge}_ties']}/{m[f'{judge}_losses']}" + ("" if p is None else f", p = {p:.2g}")


def print_version(record: dict[str, Any], champion: dict[str, Any] | None) -> None:
    print(f"\n{record['version']} ({record['status']})")
    for name, e in record["stages"].items():
        how = "trained" if e["made_in"] == record["version"] else f"reused from {e['made_in']}"
        print(f"  {name:<8} {how:<18} {e['path']}")
    evaluation = record.get("evaluation") or {}
    rm = evaluation.get("reward_model") or {}
    if rm:
        print(f"  reward model held-out accuracy {_pct(rm.get('eval_accuracy'))}, ECE {_num(rm.get('eval_ece'))}")
    for name, m in (evaluation.get("policies") or {}).items():
        gold = "; ".join(x for x in (_counts(m, "gold"), f"length-controlled {_pct(m.get('gold_lc_win_rate'))}") if x)
        rm = _counts(m, "rm")
        judged_by_rm = "" if m.get("rm_win_rate") is None else \
            f"RM win-rate {_pct(m.get('rm_win_rate'))}{f' ({rm})' if rm else ''}, "
        print(f"  {name} vs {evaluation.get('baseline_name')}: gold win-rate {_pct(m.get('gold_win_rate'))} ({gold}), "
              f"{judged_by_rm}KL to reference {_num(m.get('kl_to_reference'))}")
        if m.get("human_n"):
            print(f"    people: win-rate {_pct(m.get('human_win_rate'))} ({_counts(m, 'human')}) over "
                  f"{m['human_n']} items")
    decision = record.get("decision") or {}
    if decision:
        print(f"  decision: {decision.get('reason')}")
    for name, command in (decision.get("label") or {}).items():
        print(f"  {name} awaits people's judgements: {command}\n  then run `align run` again to decide")
    if champion:
        print(f"  champion: {champion['version']} {champion['stage']} ({champion['path']})")
    if record.get("merged"):
        print(f"  merged: {record['merged']['path']}")
    if record.get("report"):
        print(f"  report: {record['report']}")


def runs_command(args: argparse.Namespace) -> int:

    home = find_home(args.runs_dir, args.name)
    champion = home.champion()
    if args.action == "show":
        record = home.read(args.version) if args.version else home.latest()
        print_version(record, champion)
        print_lineage(record)
        return 0
    if args.version:
        print("error: a version is given only with `align runs show vN`", file=sys.stderr)
        return 2
    print(f"{home.root}  (champion: {champion['version']} {champion['stage']})" if champion else str(home.root))
    progress = {p["version"]: p["champion"] for p in version_points(home.root)}
    print(f"  {'version':<8} {'status':<8} {'created':<21} {'trained':<24} {'RM acc':>7} {'DPO gold':>9} "
          f"{'PPO gold':>9} {'GRPO gold':>10} {'KL':>7} {'champion score':>15} {'KL to SFT':>9}  decision")
    for name in home.versions():
        r = home.read(name)
        ev = r.get("evaluation") or {}
        pol = ev.get("policies") or {}
        trained = ",".join(s for s, e in r["stages"].items() if e["made_in"] == name) or "—"
        kls = [m.get("kl_to_reference") for m in pol.values() if m.get("kl_to_reference") is not None]
        mark = "*" if champion and champion["version"] == name else " "
        decision = (r.get("decision") or {}).get("promote") or ("kept" if r.get("decision") else "—")
        if r.get("decision", {}) and r["decision"].get("changed") and r["decision"]["champion"]["stage"] == "sft":
            decision = "sft (first champion)"
        if (r.get("decision") or {}).get("awaiting"):
            decision = f"awaiting human evaluation ({', '.join(r['decision']['awaiting'])})"
        gold = {s: _pct(pol.get(s, {}).get("gold_win_rate")) for s in ("dpo", "ppo", "grpo")}
        champ = progress.get(name, {})
        print(f"{mark} {name:<8} {r['status']:<8} {r['created']:<21} {trained:<24} "
              f"{_pct((ev.get('reward_model') or {}).get('eval_accuracy')):>7} {gold['dpo']:>9} {gold['ppo']:>9} "
              f"{gold['grpo']:>10} {_num(max(kls) if kls else None):>7} {_num(champ.get('score')):>15} "
              f"{_num(champ.get('kl')):>9}  {decision}")
    return 0


def print_lineage(record: dict[str, Any]) -> None:
    print("\n  lineage:")
    for name, e in record["stages"].items():
        parents = ", ".join(f"{q} ← {p}" for q, p in (e.get("parents") or {}).items())
        print(f"    {name:<8} {e['path']}  made in {e['made_in']}, key {e['key'][:12]}"
              + (f"; from {parents}" if parents else ""))
    data = (record.get("config") or {}).get("data") or {}
    for k, v in data.items():
        if v:
            print(f"    data.{k:<16} {v}")
    if record.get("error"):
        err = record["error"]
        print(f"\n  failed at {err.get('step')}: {err.get('message')}")

