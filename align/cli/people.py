"""`align chat` and `align label`: the verbs where a person meets the models (thin: parse, load, call)."""

from __future__ import annotations

import argparse
import sys

from align.runtime.errors import ConfigError

MODEL_HELP = ("a policy: a stage output (runs/<run>/dpo), a pipeline directory (runs/<name>: its champion), a run "
              "directory with one policy stage, or a merged model directory (align merge's output)")

CHAT_EPILOG = """\
in a terminal:
  type a message and press Enter; the answer is shown as it is generated. /reset forgets the conversation,
  /exit (or Ctrl-D) leaves. With --compare each turn is answered by both models, one after the other, each
  keeping its own side of the conversation.

from a pipe or a file (stdin not a terminal):
  each input line is one single-turn prompt and gets one output line, in order. Plain text: the answer on one
  line (newlines written as \\n; with --compare the two answers separated by a tab). --json: input lines are
  {"prompt": "..."} or {"messages": [...]} and each output line is the input object with "answer" (and
  "compare") added. A bad line gets an error line and the rest go on; the exit status is 1 when any failed.

examples:
  align chat --model runs/demo                       # the pipeline's champion
  align chat --model runs/demo --compare runs/demo/v1/sft --temperature 0
  echo "What is 2 + 3?" | align chat --model merged/ --temperature 0
"""


def add_parsers(sub) -> None:
    p = sub.add_parser("chat", help="talk to a trained policy (or answer prompts from a pipe)",
                       description="Talk to a trained policy through its own chat template and sampling.",
                       epilog=CHAT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help=MODEL_HELP)
    p.add_argument("--compare", metavar="DIR", help="a second policy (same kinds as --model) answering every turn")
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature; 0 = greedy, the same answer every time (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this (default 1.0 = the model's whole distribution)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="answer budget (default 256)")
    p.add_argument("--seed", type=int, help="seed each answer's sampling (the same seed, the same answer)")
    p.add_argument("--json", action="store_true", help="piped input and output are JSON lines (see below)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")


def chat_command(args: argparse.Namespace) -> int:
    # loaded for this verb only: it brings torch and the models, which `align --help` does not need
    from align.modeling.generate import Sampling
    from align.serving import chat
    from align.serving.trained import load_any_policy

    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    speakers = []
    for flag, spec in (("--model", args.model), ("--compare", args.compare)):
        if spec:
            model, tokenizer = load_any_policy(spec, args.device, flag)
            speakers.append(chat.Speaker(spec, model, tokenizer))
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p)
    if sys.stdin.isatty():
        return chat.interactive(speakers, sampling, args.max_new_tokens, args.system, seed=args.seed)
    failed = chat.piped(speakers, sys.stdin, sampling, args.max_new_tokens, args.system, args.json, seed=args.seed)
    if failed:
        print(f"{failed} input lines failed (see the errors above)", file=sys.stderr)
    return 1 if failed else 0
