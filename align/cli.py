"""`align <verb>`: a thin shell over the modules. Errors a user can fix are printed as one message (exit 2)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .config import STAGES, describe, load_config, to_yaml
from .errors import AlignError

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
    p.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults, same as "
                   f"recipes/configs/{stage}.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align", description="Preference alignment on one GPU: SFT, reward model, DPO, PPO as LoRA adapters.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _stage_parser(sub, "sft", "supervised fine-tuning of a LoRA adapter on chat / prompt-completion / text data")
    m = sub.add_parser("model", help="prepare a base model (converts the embedded default once) and print its path")
    m.add_argument("name_or_path", nargs="?", help="model dir, hub id or .gguf (default: embedded SmolLM2)")
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="align: %(message)s",
                        stream=sys.stderr)
    # the libraries below are chatty at INFO; their warnings still show
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "bitsandbytes", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _run_stage(stage: str, args: argparse.Namespace) -> int:
    cfg = load_config(STAGES[stage], args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from . import sft

    out = {"sft": sft.run}[stage](cfg)
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    _print_summary(stage, out, metrics)
    return 0


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
    from .config import ModelConfig
    from .models import resolve_model

    ref = resolve_model(ModelConfig(name_or_path=args.name_or_path))
    print(ref.path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # raised inside peft/trl on every run, about an API they call, not one a user can change
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        if args.verb in STAGES:
            return _run_stage(args.verb, args)
        return _model(args)
    except AlignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the newest checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
