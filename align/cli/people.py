"""`align chat` and `align label`: the verbs where a person meets the models (thin: parse, load, call)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    from align.serving.policies import load_policies

    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    named = [(flag, spec) for flag, spec in (("--model", args.model), ("--compare", args.compare)) if spec]
    speakers = [chat.Speaker(p.name, p.model, p.tokenizer, adapter=p.adapter)
                for p in load_policies(named, args.device)]
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p)
    if sys.stdin.isatty():
        return chat.interactive(speakers, sampling, args.max_new_tokens, args.system, seed=args.seed)
    failed = chat.piped(speakers, sys.stdin, sampling, args.max_new_tokens, args.system, args.json, seed=args.seed)
    if failed:
        print(f"{failed} input lines failed (see the errors above)", file=sys.stderr)
    return 1 if failed else 0


LABEL_EPILOG = """\
what to label (one of):
  --pairs FILE                            review preference data: each row's chosen and rejected, in random order
  --policy RUN --prompts FILE             collect preferences: the policy answers each prompt twice (sampled)
  --policy RUN --against OTHER --prompts FILE
                                          human evaluation: both policies answer each prompt; the page shows the
                                          answers blind and in random order (`align eval --human OUT` reads them)

the file written (--out):
  one line per judgement, appended as it is made (a kill never leaves half a line): a preference row
  {"prompt", "chosen", "rejected"} when one answer won, that `align reward`, `align dpo` and
  `align run data.preferences=OUT` read as it is; ties and "both bad" keep their "label" and both answers and are
  left out of the pairs. Every row also says who judged it ("annotator"), when, and which side wrote which answer
  ("written_by"). OUT.items.jsonl keeps the answers shown and OUT.skips.jsonl the skipped items: the same command
  again resumes where each annotator stopped.

several annotators:
  open the page in several browsers (each asks for a name, or add &annotator=NAME to the address); they see the
  same items, and `align eval --human OUT` reports their agreement (Cohen's kappa).

keys on the page: A/1 answer A is better, B/2 answer B, T/3 tie, X/4 both bad, S skip.
the page listens on 127.0.0.1; to open it to other machines set ALIGN_API_KEY and give --host (they then open
http://HOST:PORT/?key=KEY).
"""


def add_label_parser(sub) -> None:
    p = sub.add_parser("label", help="a local web page where people judge two answers (review data, collect "
                       "preferences, blind human evaluation)", description="Judge pairs of answers in a browser.",
                       epilog=LABEL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", metavar="FILE", help="a preference file to review")
    p.add_argument("--policy", metavar="DIR", help=MODEL_HELP)
    p.add_argument("--against", metavar="DIR", help="the policy --policy is compared with, blind (e.g. the champion)")
    p.add_argument("--prompts", metavar="FILE", help="prompts to draw answers for ('prompt' rows; an integer "
                   "'answer' lets `align eval --human` check the gold judge against people)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="the judgements (appended; resumed)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N rows / prompts (default: all)")
    p.add_argument("--temperature", type=float, help="sampling temperature of the answers (default: 0.7 when one "
                   "policy answers twice, 0 = greedy when two policies are compared, as `align eval` does)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer budget (default 128)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8100, help="port (default 8100)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")


def _check_port_free(host: str, port: int) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): another program (another align label?) "
                              "has it; choose another --port") from None


def human_summary(report: dict) -> str:
    """`align eval --human` in a few lines: the win-rate with its certainty, the judges' agreement with people."""
    lines = [f"{report['human_judgements']} judgements of {report['human_items']} items "
             f"({', '.join(f'{k} {v}' for k, v in sorted(report['human_labels'].items()))})"]
    if report.get("human_win_rate") is not None:
        low, high = report["human_ci95"]
        counts = f"{report['human_wins']}/{report['human_ties']}/{report['human_losses']}"
        lines.append(f"human win-rate of {report['candidate']} against {report['baseline']}: "
                     f"{report['human_win_rate']:.1%} (95% {low:.1%}–{high:.1%}; {counts}, sign test p = "
                     f"{report['human_sign_test_p']:.2g})")
    for prefix, judge in (("gold", "the gold judge"), ("rm", "the reward model")):
        if report.get(f"{prefix}_agreement_n"):
            lines.append(f"{judge} prefers the answer people preferred on {report[f'{prefix}_agrees_with_people']:.0%}"
                         f" of {report[f'{prefix}_agreement_n']} items people decided")
    for pair in report["human_agreement"]["pairs"]:
        kappa = "undefined (one label only)" if pair["kappa"] is None else f"{pair['kappa']:.2f}"
        lines.append(f"agreement {pair['annotators'][0]} / {pair['annotators'][1]}: Cohen's kappa {kappa}, raw "
                     f"{pair['raw']:.0%} on {pair['items']} shared items")
    return "\n".join(lines)


def label_command(args: argparse.Namespace) -> int:
    # loaded for this verb only: the server and the models, which `align --help` does not need
    from align.evaluation.human import agreement
    from align.serving.label_app import make_server
    from align.serving.label_items import Setup
    from align.serving.label_session import LabelSession
    from align.serving.policies import load_policies
    from align.serving.serve import API_KEY_ENV, check_bind

    setup = Setup(args.pairs, args.policy, args.against, args.prompts, args.limit, args.temperature,
                  args.max_new_tokens, args.seed)
    setup.check()
    api_key = os.environ.get(API_KEY_ENV) or None
    check_bind(args.host, api_key)
    _check_port_free(args.host, args.port)  # before loading a model for minutes
    flags = {args.policy: "--policy", args.against: "--against"}
    session = LabelSession(setup, Path(args.out),
                           lambda specs: load_policies([(flags.get(s, "--policy"), s) for s in specs], args.device))
    session.start()
    server = make_server(session, args.host, args.port, api_key, agreement)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"label page: http://{shown_host}:{args.port}/{'?key=KEY' if api_key else ''}  (Ctrl-C to stop; "
          f"judgements go to {args.out})", file=sys.stderr, flush=True)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C is how a labelling session ends: every judgement is already on disk
        pass
    finally:
        session.stop()
        n = len(session.judgements)
        print(f"{n} judgements in {args.out}", file=sys.stderr)
        summary = agreement(session.judgements)
        for pair in summary["pairs"]:
            kappa = "undefined (one label only)" if pair["kappa"] is None else f"{pair['kappa']:.2f}"
            print(f"  agreement {pair['annotators'][0]} / {pair['annotators'][1]}: kappa {kappa}, raw "
                  f"{pair['raw']:.0%} on {pair['items']} shared items", file=sys.stderr)
    return 0
