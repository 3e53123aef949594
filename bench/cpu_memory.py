"""CPU stand-in for the GPU memory table, for sessions without a GPU: peak resident memory of plain TRL against
align's own stage on the same random-initialised model, data and settings, each side in a process of its own.

    python bench/cpu_memory.py --shape qwen2.5-0.5b --layers 2 --seq 1024 --stages sft,reward,dpo

The model has the real shape's vocabulary and widths but only `--layers` decoder layers, so the vocabulary-sized
tensors (logits, their softmax and gradients) weigh as much against the rest as they do at the 0.5B / 1.5B shapes on
a GPU, and a CPU step takes seconds rather than minutes. Both sides are the ones bench/compare.py runs (its
`run_baseline` / `run_align`, float32, no quantization: bitsandbytes' 4-bit path is a GPU matter). Peak memory is
the process's `ru_maxrss` at the end of training; `floor` is its resident memory after imports and before the model
loads, the same for both sides within a few MB. CPU tokens/s are printed too, but CPU timings say little about a GPU,
and neither does the ratio against TRL: TRL's fused log-prob head has a Triton kernel on CUDA and a different torch
path on CPU. Use it to see align's own memory move (an option, a change) where no GPU is at hand.
Results: bench/results/cpu_memory_<date><tag>.json and .md, rows shaped like compare.py's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as cmp
import ppo_step as ps

GIB = 2 ** 30


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def child(side: str, stage: str, model_dir: str, data_dir: str, seq: int, batch: int, steps: int,
          overrides: list[str]) -> dict:
    """One side's run, in this process: its peak resident memory and what compare.py measures."""
    floor = rss_gib()
    s = argparse.Namespace(quantization="none", gradient_checkpointing=True, batch=batch, warmup=1, steps=steps,
                           seq=seq, profile=False, align_overrides=overrides)
    data = {"sft": Path(data_dir) / "sft.jsonl", "pairs": Path(data_dir) / "pairs.jsonl"}
    run = cmp.run_baseline if side == "baseline" else cmp.run_align
    r = run(stage, Path(model_dir), data, s, Path(data_dir).parent / f"work-{side}")
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "floor_gib": floor,
            "tok_s": r.get("tok_s_incl_ref", r["tok_s"]), "losses": r["losses"]}


def markdown(report: dict) -> str:
    st = report["settings"]
    lines = [f"# align vs plain TRL, peak resident memory on CPU ({report['date']})", "",
             f"- device: {report['device']}; versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"- model: {st['shape']} widths and vocabulary, {st['layers']} decoder layers, random weights, float32",
             f"- settings: seq {st['seq']}, batch {st['batch']} rows (a pair is 2 sequences), {st['steps']} + 1 steps, "
             f"LoRA r={cmp.LORA['r']} all-linear, gradient checkpointing; align overrides: "
             f"{' '.join(st['align_overrides']) or 'none'}",
             "- peak = ru_maxrss of the side's own process (GiB); floor = resident after imports, before the model",
             "- TRL's fused log-prob head runs its Triton kernel only on CUDA/XPU; on CPU it scores every position in "
             "torch tiles, so a ratio against TRL here is not a forecast of the GPU one. What carries over is align's "
             "own memory moving between versions or options.", "",
             "| stage | baseline peak GiB | align peak GiB | memory ratio | baseline above floor | align above floor "
             "| baseline tok/s (CPU) | align tok/s (CPU) | losses baseline / align |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        b, a = r["baseline"], r["align"]
        lines.append(f"| {r['stage']} | {b['peak_gib']:.2f} | {a['peak_gib']:.2f} | {r['memory_ratio']:.2f}× | "
                     f"{b['peak_gib'] - b['floor_gib']:.2f} | {a['peak_gib'] - a['floor_gib']:.2f} | "
                     f"{b['tok_s']:.0f} | {a['tok_s']:.0f} | "
                     f"{', '.join(f'{x:.4f}' for x in b['losses'])} / {', '.join(f'{x:.4f}' for x in a['losses'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-0.5b",
                   help="widths and vocabulary from: " + ", ".join(sorted(ps.SHAPES)))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--stages", default="sft,reward,dpo")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    p.add_argument("--align-overrides", default="", help="space-separated KEY=VALUE for align's side only")
    p.add_argument("--work", default=str(ps.ROOT / "bench" / "work"))
    p.add_argument("--tokenizer")
    p.add_argument("--out", default=str(ps.ROOT / "bench" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--child", nargs=4, metavar=("SIDE", "STAGE", "MODEL", "DATA"), help=argparse.SUPPRESS)
    s = p.parse_args(argv)
    overrides = s.align_overrides.split()
    if s.child:
        print("RESULT " + json.dumps(child(*s.child, s.seq, s.batch, s.steps, overrides)), flush=True)
        return 0
    if s.shape not in ps.SHAPES:
        p.error(f"unknown shape {s.shape}; one of {', '.join(sorted(ps.SHAPES))}")
    family, config = ps.SHAPES[s.shape]
    name = f"{s.shape}-{s.layers}layers"
    ps.SHAPES[name] = (family, {**config, "num_hidden_layers": s.layers})
    work = Path(s.work).resolve()
    tok_dir = ps.tokenizer_dir(work, s.tokenizer)
    from transformers import AutoTokenizer

    model_dir, _ = ps.build_model(name, work, tok_dir, 0)
    data_dir = work / "cpu_memory" / str(s.seq) / "data"
    cmp.write_data(AutoTokenizer.from_pretrained(tok_dir), data_dir, s.seq, s.batch * (s.steps + 1), 0)
    date = dt.datetime.now(dt.UTC)
    report = {"date": date.isoformat(timespec="seconds"), "device": f"CPU ({platform.machine()}, "
              f"{os.cpu_count()} cores)", "versions": cmp.versions(), "rows": [],
              "settings": {"shape": s.shape, "layers": s.layers, "seq": s.seq, "batch": s.batch, "steps": s.steps,
                           "align_overrides": overrides}}
    for stage in [x for x in s.stages.split(",") if x]:
        sides = {}
        for side in ("baseline", "align"):
            cmd = [sys.executable, __file__, "--child", side, stage, str(model_dir), str(data_dir), "--seq",
                   str(s.seq), "--batch", str(s.batch), "--steps", str(s.steps), "--align-overrides", s.align_overrides]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if not found:
                sys.stderr.write(done.stderr[-4000:])
                raise SystemExit(f"{stage} {side} failed (exit {done.returncode}); its log tail is above")
            sides[side] = json.loads(found[-1][len("RESULT "):])
            print(f"{stage} {side}: peak {sides[side]['peak_gib']:.2f} GiB, {sides[side]['tok_s']:.0f} tok/s",
                  flush=True)
        b, a = sides["baseline"], sides["align"]
        report["rows"].append({"stage": stage, "model": name, "baseline_tok_s": b["tok_s"], "align_tok_s": a["tok_s"],
                               "speedup": a["tok_s"] / b["tok_s"], "baseline_peak_gb": b["peak_gib"],
                               "align_peak_gb": a["peak_gib"], "memory_ratio": a["peak_gib"] / b["peak_gib"],
                               "baseline": b, "align": a})
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu_memory_{date.strftime('%Y-%m-%d')}{s.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
