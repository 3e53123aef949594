"""CPU stand-in for the GPU memory table, for sessions without a GPU: peak memory of plain TRL against align's own
stage on the same random-initialised model, data and settings, each side in a process of its own.

    python bench/cpu_memory.py --shape qwen2.5-0.5b --layers 2 --seq 1024 --stages sft,reward,dpo
    python bench/cpu_memory.py --shape qwen2.5-0.5b --layers 2 --seq 512 --precision bf16-nf4 --tag _bf16_nf4

The model has the real shape's vocabulary and widths but only `--layers` decoder layers, so the vocabulary-sized
tensors (logits, their softmax and gradients) weigh as much against the rest as they do at the 0.5B / 1.5B shapes on
a GPU, and a CPU step takes seconds rather than minutes. Both sides are the ones bench/compare.py runs (its
`run_baseline` / `run_align`): float32 and unquantized by default, or with `--precision bf16-nf4` an NF4 base and
bfloat16 autocast, the dtypes of a GPU run (bitsandbytes has CPU kernels). The headline is the peak of live tensors
during training, read by torch's MemTracker: the CPU counterpart of `torch.cuda.max_memory_allocated`. The process's
`ru_maxrss` is reported next to it (`floor`: resident memory after imports, before the model loads). CPU tokens/s
are printed too, but CPU timings say little about a GPU, and neither does the DPO ratio against TRL: TRL's fused
log-prob head has a Triton kernel on CUDA and a different torch path on CPU. Use it to see align's own memory move
(an option, a change) where no GPU is at hand.
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
from live_tensors import GIB, at_peak_lines, compiles, metered_training


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def child(side: str, stage: str, model_dir: str, data_dir: str, seq: int, batch: int, steps: int,
          overrides: list[str], precision: str) -> dict:
    """One side's run, in this process: its peak resident memory, the peak of its live tensors during training,
    and what compare.py measures."""
    floor = rss_gib()
    gpu_like = precision == "bf16-nf4"
    if gpu_like:
        gpu_like_on_cpu()
        overrides = ["model.dtype=bfloat16", *overrides]
    s = argparse.Namespace(quantization="nf4" if gpu_like else "none", gradient_checkpointing=True, bf16=gpu_like,
                           batch=batch, warmup=1, steps=steps, seq=seq, profile=False, align_overrides=overrides)
    data = {"sft": Path(data_dir) / "sft.jsonl", "pairs": Path(data_dir) / "pairs.jsonl"}
    run = cmp.run_baseline if side == "baseline" else cmp.run_align
    tensors: dict = {}
    with metered_training(tensors):
        r = run(stage, Path(model_dir), data, s, Path(data_dir).parent / f"work-{side}")
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "floor_gib": floor,
            "tensor_peak_gib": tensors["peak"] / GIB, "weights_gib": tensors["weights"] / GIB,
            "at_peak": tensors["at_peak"],
            "tok_s": r.get("tok_s_incl_ref", r["tok_s"]), "losses": r["losses"]}


def gpu_like_on_cpu() -> None:
    """align's side as on a GPU: bfloat16 autocast in the Trainer (align turns it on by torch.cuda.is_available();
    here it is told). compare.py's baseline takes `bf16` from its settings."""
    from align.stages import common as stage

    inner_defaults = stage.use_cuda_defaults
    stage.use_cuda_defaults = lambda cfg: {**inner_defaults(cfg), "bf16": True}


def _cell(side: dict | None, key: str) -> str:
    """One side's figure for the table, or a dash for a side not run this time."""
    if not side:
        return "—"
    if key == "losses":
        return ", ".join(f"{v:.4f}" for v in side["losses"])
    return f"{side['peak_gib'] - side['floor_gib'] if key == 'above_floor' else side[key]:.2f}"


def markdown(report: dict) -> str:
    st = report["settings"]
    model = ("NF4 base, bfloat16 autocast (as on a GPU)" if st.get("precision") == "bf16-nf4"
             else "float32, unquantized")
    lines = [f"# align vs plain TRL, peak memory on CPU ({report['date']})", "",
             f"- device: {report['device']}; versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"- model: {st['shape']} widths and vocabulary, {st['layers']} decoder layers, random weights, {model}",
             f"- settings: seq {st['seq']}, batch {st['batch']} rows (a pair is 2 sequences), {st['steps']} + 1 steps, "
             f"LoRA r={cmp.LORA['r']} all-linear, gradient checkpointing; align overrides: "
             f"{' '.join(st['align_overrides']) or 'none'}",
             "- live tensors = peak bytes of tensors alive during Trainer.train (a dispatcher-level count: weights, gradients, "
             "optimizer states, activations, temporaries), the CPU counterpart of torch.cuda.max_memory_allocated; "
             "resident = ru_maxrss of the side's own process, above its resident memory after imports (floor)",
             "- TRL's fused log-prob head runs its Triton kernel only on CUDA/XPU; on CPU it scores every position in "
             "torch tiles, so a ratio against TRL's DPO here is not a forecast of the GPU one. What carries over is "
             "align's own memory moving between versions or options.", "",
             "| stage | baseline live tensors GiB | align live tensors GiB | memory ratio | baseline resident above floor "
             "| align resident above floor | align weights GiB | losses baseline / align |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        b, a = r.get("baseline") or r.get("baseline_alone"), r.get("align") or r.get("align_alone")
        ratio = f"{r['memory_ratio']:.2f}×" if "memory_ratio" in r else "—"
        lines.append(f"| {r['stage']} | {_cell(b, 'tensor_peak_gib')} | {_cell(a, 'tensor_peak_gib')} | {ratio} | "
                     f"{_cell(b, 'above_floor')} | {_cell(a, 'above_floor')} | {_cell(a, 'weights_gib')} | "
                     f"{_cell(b, 'losses')} / {_cell(a, 'losses')} |")
    for r in report["rows"]:
        for side in ("baseline", "align"):
            found = (r.get(side) or r.get(f"{side}_alone") or {}).get("at_peak")
            if found:
                lines += at_peak_lines(f"{r['stage']} {side}", found)
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
    p.add_argument("--chunk-elements", type=int, default=None,
                   help="align.modeling.heads.CHUNK_ELEMENTS for align's side (logits elements per chunk of the vocabulary "
                   "projection); default: align's own")
    p.add_argument("--sides", default="baseline,align", help="baseline,align or one of them (the report's ratio "
                   "needs both)")
    p.add_argument("--precision", choices=("fp32", "bf16-nf4"), default="fp32",
                   help="fp32: unquantized float32 (fast on any CPU); bf16-nf4: NF4 base and bfloat16 autocast as on "
                   "a GPU (bitsandbytes' CPU kernels; slow without AVX512-BF16: use few layers and a short --seq)")
    p.add_argument("--child", nargs=4, metavar=("SIDE", "STAGE", "MODEL", "DATA"), help=argparse.SUPPRESS)
    s = p.parse_args(argv)
    overrides = s.align_overrides.split()
    overrides_note = f"heads.CHUNK_ELEMENTS={s.chunk_elements}" if s.chunk_elements else None
    if compiles(overrides):
        p.error("training.compile=true cannot be measured here: LiveTensors sees eager code only (dynamo runs "
                "eagerly under its dispatch mode), so the reading would be the eager one")
    if s.child:
        if s.chunk_elements:
            from align.modeling import heads

            heads.CHUNK_ELEMENTS = s.chunk_elements
        print("RESULT " + json.dumps(child(*s.child, s.seq, s.batch, s.steps, overrides, s.precision)), flush=True)
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
                           "align_overrides": overrides + ([overrides_note] if overrides_note else []),
                           "precision": s.precision}}
    for stage in [x for x in s.stages.split(",") if x]:
        sides = {}
        for side in s.sides.split(","):
            cmd = [sys.executable, __file__, "--child", side, stage, str(model_dir), str(data_dir), "--seq",
                   str(s.seq), "--batch", str(s.batch), "--steps", str(s.steps), "--align-overrides", s.align_overrides,
                   "--precision", s.precision, *(["--chunk-elements", str(s.chunk_elements)] if s.chunk_elements
                                                 else [])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if not found:
                sys.stderr.write(done.stderr[-4000:])
                raise SystemExit(f"{stage} {side} failed (exit {done.returncode}); its log tail is above")
            sides[side] = json.loads(found[-1][len("RESULT "):])
            print(f"{stage} {side}: peak resident {sides[side]['peak_gib']:.2f} GiB, live tensors "
                  f"{sides[side]['tensor_peak_gib']:.2f} GiB, {sides[side]['tok_s']:.0f} tok/s", flush=True)
        if len(sides) < 2:
            report["rows"].append({"stage": stage, "model": name, **{f"{k}_alone": v for k, v in sides.items()}})
            continue
        b, a = sides["baseline"], sides["align"]
        report["rows"].append({"stage": stage, "model": name, "baseline_tok_s": b["tok_s"], "align_tok_s": a["tok_s"],
                               "speedup": a["tok_s"] / b["tok_s"], "baseline_peak_gb": b["tensor_peak_gib"],
                               "align_peak_gb": a["tensor_peak_gib"],
                               "memory_ratio": a["tensor_peak_gib"] / b["tensor_peak_gib"],
                               "rss_memory_ratio": a["peak_gib"] / b["peak_gib"], "baseline": b, "align": a})
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu_memory_{date.strftime('%Y-%m-%d')}{s.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
