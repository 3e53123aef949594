"""A version's report: `report.md` and the PNGs it shows, in the version's directory.

Training curves of every stage in its lineage, the reward-vs-KL picture of the policies, answer-length
distributions, a table of the evaluation against the baseline, the promotion decision, and sample answers side by
side. Plots are drawn with matplotlib's file-only backend (no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from align.evaluation.progress import plot_progress, version_points
from align.runtime.runs import atomic_write_text

ROWS = [  # (label, key in the headline metrics, format)
    ("gold-judge win-rate", "gold_win_rate", "{:.1%}"), ("  95% interval", "gold_ci95", "interval"),
    ("  wins / ties / losses (sign test p)", "gold", "counts"), ("  length-controlled", "gold_lc_win_rate", "{:.1%}"),
    ("reward-model win-rate", "rm_win_rate", "{:.1%}"), ("  95% interval", "rm_ci95", "interval"),
    ("  wins / ties / losses (sign test p)", "rm", "counts"), ("  length-controlled", "rm_lc_win_rate", "{:.1%}"),
    ("KL to its reference (nats/answer)", "kl_to_reference", "{:.3f}"),
    ("KL to SFT, the lineage's root (nats/answer)", "kl_to_sft", "{:.3f}"),
    ("KL to the baseline (nats/answer)", "kl_estimate", "{:.3f}"),
]
PAIRED = [  # (label, policy key, baseline key, format): one value for the policy, one for the baseline
    ("gold score", "gold_score_policy", "gold_score_reference", "{:.3f}"),
    ("right final answers (gold judge)", "gold_right_policy", "gold_right_reference", "{:.1%}"),
    ("reward-model score", "rm_score_policy", "rm_score_reference", "{:.3f}"),
    ("answer length (words)", "policy_words_mean", "reference_words_mean", "{:.1f}"),
    ("perplexity on held-out SFT rows", "perplexity_policy", "perplexity_baseline", "{:.3f}"),
    ("BLEU vs reference answers", "bleu_policy", "bleu_baseline", "{:.1f}"),
    ("ROUGE-L vs reference answers", "rouge_l_policy", "rouge_l_baseline", "{:.3f}"),
]


def _fmt(fmt: str, value: Any) -> str:
    return "—" if value is None else fmt.format(value)


def _cell(fmt: str, metrics: dict[str, Any], key: str) -> str:
    """One table cell; "interval" and "counts" rows combine several numbers of a judge (key = its prefix)."""
    if fmt == "interval":
        ci = metrics.get(key)
        return "—" if not ci else f"{ci[0]:.1%} – {ci[1]:.1%}"
    if fmt == "counts":
        if metrics.get(f"{key}_wins") is None:
            return "—"
        p = metrics.get(f"{key}_sign_test_p")
        return (f"{metrics[f'{key}_wins']} / {metrics[f'{key}_ties']} / {metrics[f'{key}_losses']}"
                + (f" (p = {p:.2g})" if p is not None else ""))
    return _fmt(fmt, metrics.get(key))


def _read_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def metrics_table(policies: dict[str, dict[str, Any]], baseline_name: str) -> str:
    names = list(policies)
    lines = [f"| metric | baseline: {baseline_name} | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for label, key, fmt in ROWS:
        cells = [_cell(fmt, policies[n], key) for n in names]
        if any(c != "—" for c in cells):  # a judge or measure this evaluation did not use gets no row
            lines.append(f"| {label} | — | " + " | ".join(cells) + " |")
    for label, pkey, bkey, fmt in PAIRED:
        base = next((policies[n][bkey] for n in names if policies[n].get(bkey) is not None), None)
        cells = [_fmt(fmt, policies[n].get(pkey)) for n in names]
        if base is not None or any(c != "—" for c in cells):
            lines.append(f"| {label} | {_fmt(fmt, base)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(h["step"], h[key]) for h in history if key in h and "step" in h and isinstance(h[key], (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


PANELS = [  # (stage, title, [(metric key, label)])
    ("sft", "SFT loss", [("loss", "train loss"), ("eval_loss", "held-out loss")]),
    ("reward", "reward model", [("loss", "pairwise loss"), ("accuracy", "train accuracy")]),
    ("dpo", "DPO loss", [("loss", "loss")]),
    ("dpo", "DPO implicit reward", [("margin", "margin"), ("accuracy", "accuracy")]),
    ("ppo", "PPO reward (training rollouts)", [("reward_mean", "mean reward (weighted sum)"), ("reward_*", "")]),
    ("ppo", "PPO KL and entropy", [("kl", "KL to reference"), ("entropy", "entropy per token")]),
    ("grpo", "GRPO reward (training answers)", [("reward_mean", "mean reward (weighted sum)"), ("reward_*", "")]),
    ("grpo", "GRPO groups", [("group_std", "reward std within a prompt's answers"),
                             ("uniform_share", "share of groups scored alike")]),
    ("grpo", "GRPO answers", [("response_tokens", "answer tokens"), ("no_eos_share", "share without EOS")]),
    ("grpo", "GRPO KL, entropy, clipping", [("kl", "KL to reference"), ("entropy", "entropy per token"),
                                            ("clip_low_fraction", "clipped low"),
                                            ("clip_high_fraction", "clipped high")]),
]


def _expand(history: list[dict[str, Any]], series: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """'reward_*' stands for each reward term's own mean (reward_gold, reward_format, ...)."""
    out = []
    for key, label in series:
        if key.endswith("*"):
            names = sorted({k for h in history for k in h if k.startswith(key[:-1])} - {k for k, _ in series})
            out += [(k, k[len(key) - 1:]) for k in names if k not in ("reward_std",)]
        else:
            out.append((key, label))
    return out


def plot_training(histories: dict[str, list[dict[str, Any]]], out: Path) -> bool:
    import matplotlib.pyplot as plt

    panels = [(stage, title, series) for stage, title, series in PANELS if histories.get(stage)]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (stage, title, series) in zip(axes.flat, panels):
        for key, label in _expand(histories[stage], series):
            x, y = _series(histories[stage], key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 12 else None, markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_reward_kl(points: dict[str, dict[str, float | None]], out: Path) -> bool:
    """Held-out score against KL to the reference, one point per policy: what each bought with its drift."""
    import matplotlib.pyplot as plt

    judges = [("rm", "reward-model score"), ("gold", "gold score")]
    judges = [(j, label) for j, label in judges if any(p.get(j) is not None for p in points.values())]
    if not judges:
        return False
    fig, axes = plt.subplots(1, len(judges), figsize=(5 * len(judges), 3.8), squeeze=False)
    for ax, (judge, label) in zip(axes.flat, judges):
        for name, p in points.items():
            if p.get(judge) is not None and p.get("kl") is not None:
                ax.scatter([p["kl"]], [p[judge]], s=60, zorder=3, label=name)
                ax.annotate(name, (p["kl"], p[judge]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("KL to the SFT reference (nats per answer)")
        ax.set_ylabel(f"mean {label} on held-out prompts")
        ax.set_title(f"{label} vs KL", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_lengths(lengths: dict[str, list[int]], out: Path) -> bool:
    import matplotlib.pyplot as plt

    lengths = {k: v for k, v in lengths.items() if v}
    if not lengths:
        return False
    low, top = min(min(v) for v in lengths.values()), max(max(v) for v in lengths.values())
    bins = list(range(max(0, low - 1), top + 3, max(1, (top - low + 3) // 30)))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, words in lengths.items():
        ax.hist(words, bins=bins, histtype="step", lw=1.6, label=f"{name} (mean {sum(words) / len(words):.1f})")
    ax.set_xlabel("answer length (words)")
    ax.set_ylabel("held-out prompts")
    ax.set_title("answer lengths", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- the report


def write_report(home: Path, record: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    vdir = home / record["version"]
    stages = record["stages"]
    evaluation = record.get("evaluation") or {}
    reports = {n: _read_json(f) for n, f in (evaluation.get("files") or {}).items()}
    baseline_name = evaluation.get("baseline_name", "baseline")
    histories = {s: _read_json(Path(e["path"]) / "metrics.json").get("log_history", []) for s, e in stages.items()}
    figures = []
    if plot_training(histories, vdir / "training.png"):
        figures.append(("Training curves", "training.png"))
    points = _policy_points(reports, record, baseline_name)
    if reports and plot_reward_kl(points, vdir / "reward_kl.png"):
        figures.append(("Reward against KL", "reward_kl.png"))
    lengths = {baseline_name: next((r.get("reference_words", []) for r in reports.values()), [])}
    lengths.update({n: r.get("policy_words", []) for n, r in reports.items()})
    if reports and plot_lengths(lengths, vdir / "lengths.png"):
        figures.append(("Answer lengths", "lengths.png"))
    if plot_progress(version_points(home), vdir / "progress.png"):
        figures.append(("Progress across versions", "progress.png"))
    text = _markdown(home, record, reports, baseline_name, figures)
    path = vdir / "report.md"
    atomic_write_text(path, text)
    return path


def _policy_points(reports: dict[str, dict[str, Any]], record: dict[str, Any], baseline_name: str
                   ) -> dict[str, dict[str, float | None]]:
    decision = record.get("decision") or {}
    previous = decision.get("previous_champion")
    # the baseline is SFT itself (KL 0) on a first round; a champion's KL was measured when it was promoted
    was = (previous or {}).get("metrics") or {}
    base_kl = 0.0 if previous is None else was.get("kl_to_sft", was.get("kl_to_reference", 0.0))
    first = next(iter(reports.values()), {})
    points = {baseline_name: {"kl": base_kl, "rm": first.get("rm_score_reference"),
                              "gold": first.get("gold_score_reference")}}
    for name, r in reports.items():
        kl = r.get("kl_to_sft") if r.get("kl_to_sft") is not None else r.get("kl_to_reference")
        points[name] = {"kl": kl, "rm": r.get("rm_score_policy"),
                        "gold": r.get("gold_score_policy")}
    return points


def _markdown(home: Path, record: dict[str, Any], reports: dict[str, dict[str, Any]], baseline_name: str,
              figures: list[tuple[str, str]]) -> str:
    version, stages = record["version"], record["stages"]
    decision = record.get("decision") or {}
    champion = decision.get("champion")
    out = [f"# {home.name} {version}", "",
           f"Status: {record['status']} · created {record['created']} · report written {record.get('updated', '')}",
           ""]
    out += ["## Decision", "", decision.get("reason", "no decision yet").capitalize() + ".", ""]
    if champion:
        state = "new champion" if decision.get("changed") else "champion stays"
        out += [f"**{state}: {champion['version']} {champion['stage']}** (`{champion['path']}`)", ""]
    if record.get("merged"):
        m = record["merged"]
        out += [f"Merged into a plain model directory: `{m['path']}` ({m['dtype']}).", ""]
    out += ["## Lineage", "", "| stage | artifact | made in | parents |", "|---|---|---|---|"]
    for name, e in stages.items():
        made = e["made_in"] + ("" if e["made_in"] == version else " (reused: inputs unchanged)")
        parents = ", ".join(f"{q}: `{p}`" for q, p in (e.get("parents") or {}).items()) or "—"
        out.append(f"| {name} | `{e['path']}` | {made} | {parents} |")
    data = (record.get("config") or {}).get("data") or {}
    if data:
        out += ["", "Data: " + ", ".join(f"{k} `{v}`" for k, v in data.items() if v), ""]
    rm = (record.get("evaluation") or {}).get("reward_model")
    if rm:
        out += ["## Reward model", "",
                f"Held-out pairwise accuracy {_fmt('{:.1%}', rm.get('eval_accuracy'))}, mean margin "
                f"{_fmt('{:.3f}', rm.get('eval_mean_margin'))}, calibration error (ECE of σ(margin)) "
                f"{_fmt('{:.3f}', rm.get('eval_ece'))}.", ""]
    if reports:
        policies = (record.get("evaluation") or {}).get("policies") or {}
        first = next(iter(reports.values()))
        where = f" from `{first['prompts']}`" if first.get("prompts") else ""
        judges = f" Judged by {first['judges']}." if first.get("judges") else ""
        n, kl_n = first.get("n_prompts"), first.get("kl_prompts")
        kl_on = f" on the first {kl_n}" if kl_n and n and kl_n < n else ""
        out += ["## Evaluation against the baseline", "",
                f"New policies against {baseline_name} on {n} held-out prompts{where} (greedy answers; KL sampled "
                f"at temperature 1{kl_on}).{judges}", "", metrics_table(policies, baseline_name), ""]
    for title, file in figures:
        out += [f"## {title}", "", f"![{title}]({file})", ""]
    out += _samples(reports, baseline_name)
    return "\n".join(out).rstrip() + "\n"


def _sample_answer(report: dict[str, Any], i: int) -> str:
    samples = report.get("samples") or []
    return samples[i]["policy"] if i < len(samples) else "—"


def _samples(reports: dict[str, dict[str, Any]], baseline_name: str) -> list[str]:
    if not reports:
        return []
    names = list(reports)
    first = reports[names[0]].get("samples", [])
    out = ["## Sample answers", ""]
    for i, sample in enumerate(first):
        out += [f"**Prompt:** {sample['prompt']}", "", f"| {baseline_name} | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names)]
        cells = [sample["reference"]] + [_sample_answer(reports[n], i) for n in names]
        out.append("| " + " | ".join(c.replace("\n", "<br>").replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return out
