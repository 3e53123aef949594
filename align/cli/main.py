"""`align <verb>`: a thin shell over the modules. Errors a user can fix are printed as one message (exit 2)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from align.cli import loop as cli_pipeline
from align.cli import people as cli_people
from align.runtime.config import STAGES, ModelConfig, describe, load_config, to_yaml
from align.runtime.errors import AlignError, ConfigError
from align.runtime.runs import atomic_write_json

CONFIG_HELP = """\
configuration:
  Settings come from --config FILE (YAML), then KEY=VALUE overrides, e.g.
    align {stage} --config recipes/configs/{stage}.yaml training.learning_rate=1e-4 run=exp1
  Every key, its default and meaning:
"""


def _stage_parser(sub, stage: str, summary: str) -> None:
    cls = STAGES[stage]
    p = sub.add_parser(stage, help=summary, description=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=CONFIG_HELP.format(stage=stage) + "\n".join(describe(cls)))
    p.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults, the same as "
                   f"recipes/configs/{stage}.yaml except the demo's run paths it names, init_from_sft and "
                   "reward_model, which default to empty)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align",
        description="Preference alignment on one GPU: SFT, reward model, DPO, PPO, GRPO as LoRA adapters.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _stage_parser(sub, "sft", "supervised fine-tuning of a LoRA adapter on chat / prompt-completion / text data")
    _stage_parser(sub, "reward", "train a reward model (LoRA adapter + score head) on preference pairs")
    _stage_parser(sub, "dpo", "direct preference optimisation of a policy adapter against the frozen SFT adapter")
    _stage_parser(sub, "ppo", "PPO: raise a reward model's score with a KL penalty to the SFT policy (one base)")
    _stage_parser(sub, "grpo", "GRPO / RLOO: raise rewards you compute (a checker, a reward model) by comparing "
                  "several answers per prompt; no value model")
    cli_pipeline.add_parsers(sub)
    _pairs_parser(sub)
    _merge_parser(sub)
    _eval_parser(sub)
    _score_parser(sub)
    _serve_parser(sub)
    cli_people.add_parsers(sub)
    cli_people.add_label_parser(sub)
    m = sub.add_parser("model", help="prepare a base model (converts the embedded default once) and print its path")
    m.add_argument("name_or_path", nargs="?", help="model dir, hub id or .gguf (default: embedded SmolLM2)")
    return parser


SCORE_EPILOG = """\
input rows (JSONL, JSON, CSV, Parquet, a saved dataset; '-' = JSONL on stdin):
  {"prompt": "...", "response": "..."}                      -> {"row": N, "score": s}
  {"messages": [..., {"role": "assistant", ...}]}           -> {"row": N, "score": s}  (last answer scored)
  {"prompt": "...", "chosen": "...", "rejected": "..."}     -> {"row": N, "chosen_score", "rejected_score",
                                                                "margin", "correct"}
  a bad row                                                 -> {"row": N, "error": "why"}
One output row per input row, in input order (JSONL on stdout by default; --output F.jsonl|.csv|.parquet).
Scoring uses the model's own tokenizer, chat template, EOS and max length: a training row gets the score it
had in training.

exit status: 0 all rows scored; 1 some rows failed (their error rows say why); 2 bad arguments or model.
"""

SERVE_EPILOG = """\
  POST /score  {"items": [{"prompt": "...", "response": "..."}, ...]}  ->  {"scores": [s, ...]}
               (pair items {"prompt", "chosen", "rejected"} get {"chosen_score", "rejected_score", "margin",
               "correct"}; messages items as in `align score`)
  GET  /health ->  {"status": "ok", "queue": {"queued": .., "scored": .., ...}, ...}  (answers while busy)
Errors: 400 malformed JSON, 401 API key, 413 body or item count over the limit, 422 a bad item; 503 with a
Retry-After header and a JSON message when --queue-size sequences already wait (retry after that many seconds).
Concurrent requests are scored together: their sequences join one queue and one worker scores them in passes
of --batch-size, each request answered with its own scores in its own order (the same as `align score`).
Listening beyond loopback needs an API key in $ALIGN_API_KEY; clients send "Authorization: Bearer <key>".
"""


def _model_args(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a reward run (runs/<run>/reward) or a merged reward model directory")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="tokens per prompt + answer (default: the length the model was trained with)")


def _score_parser(sub) -> None:
    p = sub.add_parser("score", help="score responses or pairs with a trained reward model",
                       description="Score (prompt, response) rows or preference pairs with a trained reward model.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SCORE_EPILOG)
    _model_args(p)
    p.add_argument("--input", required=True, metavar="FILE", help="rows to score; '-' reads JSONL from stdin")
    p.add_argument("--output", default="-", metavar="FILE",
                   help="where to write one result per row: .jsonl, .csv or .parquet; '-' = stdout (default)")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve-rm", help="serve a trained reward model over HTTP (POST /score, GET /health)",
                       description="Serve a trained reward model over HTTP.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EPILOG)
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-items", type=int, default=64, metavar="N", help="items per request (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, metavar="N",
                   help="request body limit in bytes (default 2 MB)")
    p.add_argument("--queue-size", type=int, metavar="N",
                   help="sequences waiting to be scored (a pair is 2); past it requests get 503 + Retry-After "
                        "(default 1024 on a GPU, 64 on a CPU, where a pass takes seconds)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, metavar="N",
                   help="padded tokens per forward pass, across requests (default 16384)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a pass that is not full waits for more requests (default 5)")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="open connections; past it uvicorn answers a plain 503 (default 1024)")


PAIRS_EPILOG = """\
Each prompt is answered --n times by the policy (sampled at --temperature / --top-p); the judge scores every
answer and the best and worst answer of a prompt become one pair. Prompts whose answers all score alike, and
answers cut off at --max-new-tokens, give no pair. Output rows (JSONL):
  {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"[, "answer"]}
Train on them with:  align dpo --config recipes/configs/dpo.yaml data.train=OUT data.eval=
"""


def _pairs_parser(sub) -> None:
    p = sub.add_parser("pairs", help="make on-policy preference pairs: sample the policy, judge, keep best vs worst",
                       description="Make preference pairs from a policy's own answers.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PAIRS_EPILOG)
    p.add_argument("--policy", required=True, metavar="DIR",
                   help="a policy stage output (runs/<run>/sft, dpo or ppo), or a pipeline directory (its champion)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="rows with a 'prompt' (and an integer 'answer' for the gold judge); JSONL/JSON/CSV/Parquet")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="where to write the pairs (atomically)")
    p.add_argument("--judge", default="gold", metavar="gold|DIR",
                   help="'gold' (reward_data/judge.py, default) or a reward run / merged reward model directory")
    p.add_argument("--n", type=int, default=4, help="answers sampled per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="answer budget (default 64)")
    p.add_argument("--limit", type=int, metavar="N", help="use the first N prompts (after --skip and --fresh)")
    p.add_argument("--skip", type=int, default=0, metavar="N", help="leave out the first N prompts (default 0)")
    p.add_argument("--fresh", action="store_true", help="with --policy a pipeline directory: leave out the prompts "
                   "its earlier rounds drew pairs from, and add this run's to its ledger (runs/<name>/used-prompts."
                   "jsonl), so every round sees new questions")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="answers generated at once (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def _pairs(args: argparse.Namespace) -> int:
    # loaded for this verb only: it brings torch and the models, which `align --help` does not need
    from align.loop.onpolicy import sample_pairs
    from align.modeling.generate import Sampling

    _positive_args(args, ["n", "max_new_tokens", "limit", "batch_size"])
    if args.skip < 0:
        raise ConfigError(f"--skip must be >= 0, got {args.skip}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature must be > 0 and --top-p in (0, 1]: pairs need sampled, varied answers")
    summary = sample_pairs(args.policy, args.prompts, args.out, args.judge,
                           Sampling(args.temperature, args.top_p, args.n), args.max_new_tokens, args.limit,
                           args.seed, args.batch_size, args.device, args.force, args.skip, args.fresh)
    if summary["skipped_as_used"]:
        print(f"{summary['skipped_as_used']} prompts used by earlier rounds were left out", file=sys.stderr)
    print(f"{summary['pairs']} pairs from {summary['prompts']} prompts ({summary['samples']} answers, mean score "
          f"{summary['mean_score']:.3f}, {summary['no_eos_share']:.1%} cut off) -> {summary['out']}", file=sys.stderr)
    return 0 if summary["pairs"] else 1


MERGE_EPILOG = """\
The base model is read from the run (config.yaml, checked against manifest.json) and loaded unquantized in
--dtype; an adapter trained over a 4-bit base is merged into the dequantized base (the drift from the 4-bit
model is measured and reported). Policies (sft, dpo, ppo) give a causal-LM directory; reward runs give a
sequence-classification directory with the trained score head. The written directory is loaded back and
compared with base + adapter on probe inputs from the run's data; over the thresholds nothing is kept
(exit 2) unless --accept-drift. Merging the same adapter into the same --out again does nothing.
"""


def _merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge a stage's adapter into its base model and verify the result",
                       description="Merge a LoRA adapter into its base and verify the merged model.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=MERGE_EPILOG)
    p.add_argument("--adapter", required=True, metavar="DIR", help="a finished stage output (runs/<run>/<stage>)")
    p.add_argument("--out", required=True, metavar="DIR", help="new directory for the merged model")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--accept-drift", action="store_true", help="keep the merge even when verification fails")
    p.add_argument("--probes", type=int, default=8, metavar="N", help="probe inputs for verification (default 8)")


def _merge(args: argparse.Namespace) -> int:
    # loaded for this verb only: it brings torch and the models, which `align --help` does not need
    from align.serving.merge import merge

    _positive_args(args, ["probes"])
    s = merge(args.adapter, args.out, args.dtype, args.force, args.accept_drift, args.probes)
    if s.get("already_merged"):
        print(f"{args.out} already holds this adapter merged in {s['dtype']}; nothing to do", file=sys.stderr)
        return 0
    v = s["verification"]
    shown = ", ".join(f"{k} {v[k]:.3g}" for k in ("max_logit_diff", "top1_agreement", "max_score_diff") if k in v)
    print(f"merged {s['stage']} adapter into {args.out} ({s['dtype']}); verified on {v['probes']} probes: {shown}"
          + ("" if s["passed"] else " — OVER THE THRESHOLDS, kept because of --accept-drift"), file=sys.stderr)
    if "drift_from_nf4" in v:
        print(f"  drift from the 4-bit model it was trained on: {v['drift_from_nf4']}", file=sys.stderr)
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a policy run against a baseline policy (win-rates, KL, perplexity, "
                       "BLEU/ROUGE)", description="Evaluate a policy run against a baseline policy run.")
    p.add_argument("--policy", metavar="DIR",
                   help="a policy stage output (runs/<run>/sft, dpo, ppo, grpo), or a pipeline directory (its "
                   "champion)")
    p.add_argument("--human", metavar="FILE", help="instead of answering prompts: people's judgements from `align "
                   "label` (a blind comparison of two policies gives a human win-rate with its interval and sign "
                   "test); reports the annotators' agreement (Cohen's kappa), the gold judge's agreement with people "
                   "on items with gold answers, and the reward model's with --reward-model")
    p.add_argument("--baseline", metavar="DIR", help="the policy to beat: a stage output or a pipeline directory "
                   "(its champion); default: the policy's SFT parent, else the base model")
    p.add_argument("--reward-model", metavar="DIR", help="also judge the win-rate with this reward run")
    p.add_argument("--prompts", default="reward_data/prefs/prompts.jsonl", metavar="FILE",
                   help="held-out prompts; rows with an integer 'answer' are judged by the gold judge")
    p.add_argument("--sft-data", default="reward_data/sft/eval.jsonl", metavar="FILE",
                   help="held-out SFT rows for perplexity and BLEU/ROUGE ('' = skip)")
    p.add_argument("--limit", type=int, default=64, metavar="N", help="prompts / rows used from each (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="answer budget (default 64)")
    p.add_argument("--kl-limit", type=int, default=None, metavar="N",
                   help="estimate the KL on the first N prompts only (default: all of --limit)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--out", default="-", metavar="FILE.json", help="write the report here (default: stdout)")


def _eval(args: argparse.Namespace) -> int:
    # loaded for this verb only: it brings torch and the models, which `align --help` does not need
    from align.evaluation.evaluate import evaluate_policy

    _positive_args(args, ["limit", "max_new_tokens", "kl_limit"])
    if bool(args.policy) == bool(args.human):
        raise ConfigError("name what to evaluate: --policy DIR (answers judged automatically) or --human FILE "
                          "(people's judgements from align label)")
    if args.human:
        # loaded for this verb only: with --reward-model it brings torch and the model
        from align.evaluation.human import evaluate_human

        report = evaluate_human(args.human, args.reward_model, args.device)
        _write_report(report, args.out)
        print(cli_people.human_summary(report), file=sys.stderr)
        return 0
    report = evaluate_policy(args.policy, args.baseline, args.reward_model, args.prompts, args.sft_data or None,
                             args.limit, args.max_new_tokens, args.device, args.kl_limit)
    _write_report(report, args.out)
    return 0


def _write_report(report: dict, out: str) -> None:
    if out == "-":
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        atomic_write_json(out, report)
        print(f"report written to {out}", file=sys.stderr)


def _positive_args(args: argparse.Namespace, names: list[str]) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _score(args: argparse.Namespace) -> int:
    # loaded for this verb only: it brings torch and the models, which `align --help` does not need
    from align.serving.score import load_reward_model, read_input, score_rows, summarize, write_output

    _positive_args(args, ["batch_size", "max_length"])
    rows = read_input(args.input)
    rm = load_reward_model(args.model, args.device)
    results = score_rows(rm, rows, args.batch_size, args.max_length, progress=True)
    write_output(results, args.output)
    s = summarize(results)
    line = f"scored {s.rows - s.failed} of {s.rows} rows"
    if s.pairs:
        line += f"; {s.pairs} pairs: accuracy {s.accuracy:.3f}, mean margin {s.mean_margin:.3f}"
    print(line, file=sys.stderr)
    for r in [r for r in results if "error" in r][:5]:
        print(f"  {args.input}:{r['row']}: {r['error']}", file=sys.stderr)
    if s.failed:
        print(f"{s.failed} rows failed (see their error rows)", file=sys.stderr)
    return 1 if s.failed else 0


def _serve(args: argparse.Namespace) -> int:
    # loaded for this verb only: it brings torch and the models, which `align --help` does not need
    from align.serving.score import load_reward_model
    from align.serving.serve import API_KEY_ENV, Limits, check_bind, default_queue_size, make_server

    _positive_args(args, ["batch_size", "max_length", "max_items", "max_body_bytes", "queue_size",
                          "max_batch_tokens", "max_connections"])
    if args.max_wait_ms < 0:
        raise ConfigError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    api_key = os.environ.get(API_KEY_ENV) or None
    check_bind(args.host, api_key)  # before the minutes of model loading
    rm = load_reward_model(args.model, args.device)
    queue_size = args.queue_size or default_queue_size(rm)
    limits = Limits(args.max_body_bytes, args.max_items, args.batch_size, args.max_length, queue_size,
                    args.max_batch_tokens, args.max_wait_ms, args.max_connections)
    make_server(rm, args.host, args.port, limits, api_key).run()
    return 0


def _setup_logging(quiet: bool) -> None:
    # loaded once a verb runs (`--help` exits before): it brings torch
    from align.runtime.distributed import launch_rank

    rank = launch_rank()  # the main process of a multi-process run narrates
    logging.basicConfig(level=logging.WARNING if quiet or rank else logging.INFO,
                        format=f"align[rank {rank}]: %(message)s" if rank else "align: %(message)s", stream=sys.stderr)
    # the libraries below are chatty at INFO; their warnings still show
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "bitsandbytes", "httpx", "urllib3", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # on CPU, bitsandbytes warns at import that an optional kernels package is missing: nothing to act on
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _run_stage(stage: str, args: argparse.Namespace) -> int:
    cfg = load_config(STAGES[stage], args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    # loaded for this verb only: it brings torch and the models, which `align --help` does not need
    from align.runtime.distributed import launch_rank
    from align.stages import dpo, grpo, ppo, reward, sft

    out = {"sft": sft.run, "reward": reward.run, "dpo": dpo.run, "ppo": ppo.run, "grpo": grpo.run}[stage](cfg)
    if launch_rank() == 0:  # the main process evaluates the saved policy and prints one summary
        if getattr(cfg, "eval_prompts", None):
            # evaluation loads torch and the models: only for the stages that ask for it
            from align.evaluation.evaluate import evaluate_stage_output

            try:
                evaluate_stage_output(out, cfg.eval_prompts, cfg.eval_limit, cfg.max_new_tokens,
                                      judging_reward_model(cfg))
            except (AlignError, RuntimeError, OSError) as e:  # the trained policy is saved: say so, keep it
                print(f"error: the {stage} policy is trained and saved in {out}, but its evaluation failed: {e}\n"
                      f"evaluate it again with: align eval --policy {out} --prompts {cfg.eval_prompts}",
                      file=sys.stderr)
                return 1
        _print_summary(stage, out, json.loads((Path(out) / "metrics.json").read_text()))
    return 0


def judging_reward_model(cfg) -> str | None:
    """The reward model that judges a stage's saved policy next to the gold judge: the one its rewards used. A
    reward_model= the rewards leave out (PPO with rewards: [gold] keeps the recipe's runs/demo/reward) has no
    say, and may not exist."""
    # loaded for the RL verbs only, with the stage modules above
    from align.stages.rewards import names_reward_model

    rewards = getattr(cfg, "rewards", None)
    if rewards is not None and not names_reward_model(rewards):
        return None
    return getattr(cfg, "reward_model", None) or None


def _print_summary(stage: str, out: Path, metrics: dict) -> None:
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"\n{stage} finished: {out}")
    for k, v in shown.items():
        print(f"  {k:<24} {v:.4g}" if isinstance(v, float) else f"  {k:<24} {v}")
    indent = "\n" + " " * 18
    for s in metrics.get("samples", []):
        print()
        for label, key in (("prompt:", "prompt"), ("base:", "base"), ("base + adapter:", "adapter")):
            print(f"  {label:<16}{s[key].replace(chr(10), indent)}")


def _model(args: argparse.Namespace) -> int:
    # loaded for this verb only: it brings torch and the models, which `align --help` does not need
    from align.modeling.models import resolve_model

    ref = resolve_model(ModelConfig(name_or_path=args.name_or_path))
    print(ref.path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # raised inside peft/trl on every run, about an API they call, not one a user can change
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
    try:
        if args.verb in STAGES:
            return _run_stage(args.verb, args)
        verbs = {"run": cli_pipeline.run_command, "runs": cli_pipeline.runs_command, "pairs": _pairs,
                 "merge": _merge, "eval": _eval, "score": _score, "serve-rm": _serve, "model": _model,
                 "chat": cli_people.chat_command, "label": cli_people.label_command}
        return verbs[args.verb](args)
    except AlignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the newest checkpoint", file=sys.stderr)
        return 130


def recipe(stage: str, script: str, argv: list[str] | None = None) -> int:
    """Entry of recipes/<stage>.py: the stage, with the YAML next to the script unless --config is given."""
    args = sys.argv[1:] if argv is None else argv
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        args = ["--config", str(Path(script).resolve().parent / "configs" / f"{stage}.yaml"), *args]
    return main([stage, *args])


if __name__ == "__main__":
    sys.exit(main())
