"""The picture of progress across versions: the champion's held-out score and its KL to SFT after each version,
with the candidates that lost shown faded. Read from the versions' own records; nothing is measured again.

Each version's evaluation answers the same held-out prompts with the champion it started with (the baseline) and
with its new policies, so the champion's score after a version is the baseline's score when it stayed, or the
winner's when it was replaced — numbers measured in that version, comparable from one version to the next.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _versions(root: Path) -> list[dict[str, Any]]:
    paths = [p for p in root.glob("v*/version.json") if p.parent.name[1:].isdigit()]
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(paths, key=lambda p: int(p.parent.name[1:]))]


def version_points(root: Path) -> list[dict[str, Any]]:
    """Per evaluated version: {version, judge, champion: {stage, score, kl}, candidates: [{stage, score, kl,
    promoted}]}; judge is 'gold' when the prompts carry gold answers, else 'rm'."""
    out: list[dict[str, Any]] = []
    kl_now = 0.0  # the champion's KL to SFT: SFT's own is 0
    for r in _versions(root):
        policies = (r.get("evaluation") or {}).get("policies") or {}
        decision = r.get("decision") or {}
        if not policies or not decision:
            continue
        first = next(iter(policies.values()))
        judge = "gold" if first.get("gold_score_reference") is not None else "rm"
        champion = decision.get("champion") or {}
        winner = decision.get("promote")

        def kl(m: dict[str, Any]) -> float | None:
            return m.get("kl_to_sft", m.get("kl_to_reference"))

        candidates = [{"stage": n, "score": m.get(f"{judge}_score_policy"), "kl": kl(m), "promoted": n == winner}
                      for n, m in policies.items()]
        if decision.get("changed") and winner in policies:
            score, kl_now = policies[winner].get(f"{judge}_score_policy"), kl(policies[winner]) or 0.0
        else:  # kept, or SFT became the first champion: the baseline measured in this version
            score = first.get(f"{judge}_score_reference")
            kl_now = 0.0 if champion.get("stage") == "sft" else kl_now
        out.append({"version": r["version"], "judge": judge, "candidates": candidates,
                    "champion": {"stage": f"{champion.get('version', '?')} {champion.get('stage', '?')}",
                                 "score": score, "kl": kl_now}})
    return out


def plot_progress(points: list[dict[str, Any]], out: Path) -> bool:
    """Two panels over versions: the champion's held-out score, and its KL to SFT; lost candidates faded."""
    import matplotlib.pyplot as plt

    if not points:
        return False
    judge = "gold score" if points[-1]["judge"] == "gold" else "reward-model score"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = list(range(1, len(points) + 1))
    for ax, key, label in ((axes[0], "score", f"held-out {judge}"), (axes[1], "kl", "KL to SFT (nats/answer)")):
        for i, p in zip(x, points):
            lost = [c for c in p["candidates"] if not c["promoted"] and c[key] is not None]
            ax.scatter([i] * len(lost), [c[key] for c in lost], color="grey", alpha=0.35, s=25,
                       label="candidates that lost" if i == 1 else None)
            for c in lost:
                ax.annotate(c["stage"], (i, c[key]), textcoords="offset points", xytext=(4, -3), fontsize=7,
                            alpha=0.5)
        ys = [p["champion"][key] for p in points]
        ax.plot([i for i, y in zip(x, ys) if y is not None], [y for y in ys if y is not None], marker="o",
                color="tab:blue", label="champion after the version")
        for i, p in zip(x, points):
            if p["champion"][key] is not None:
                ax.annotate(p["champion"]["stage"], (i, p["champion"][key]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.set_xticks(x, [p["version"] for p in points])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
