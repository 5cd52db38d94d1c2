"""PNG plots of run summaries (matplotlib, Agg backend: no display needed).

- `pareto.png`: quality (F1, and J when judged) against grounding tokens per answer (log scale),
  one point per (system, k), with the Pareto frontier (nothing cheaper is better) drawn as a step.
- `categories.png`: F1 (and J) per LoCoMo category, one bar per (system, k).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tsubasa.eval.locomo import CATEGORY_NAMES

if TYPE_CHECKING:
    from tsubasa.eval.report import Summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with fewer-or-equal tokens and higher quality, by tokens."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _label_offsets(groups: dict[tuple[float, float], list[str]]) -> dict[tuple[float, float], float]:
    """Vertical label offsets (points): within a cluster of points at about the same tokens (log
    distance under 0.12 decades), the highest point is labelled above and the others below, stacked,
    so labels of points on one vertical line do not print over each other."""
    import math

    offsets: dict[tuple[float, float], float] = {}
    keys = sorted(groups, key=lambda k: math.log10(max(k[0], 1e-9)))
    clusters: list[list[tuple[float, float]]] = []
    for key in keys:
        if clusters and math.log10(max(key[0], 1e-9)) - math.log10(max(clusters[-1][0][0], 1e-9)) < 0.12:
            clusters[-1].append(key)
        else:
            clusters.append([key])
    for cluster in clusters:
        below = 0
        for i, key in enumerate(sorted(cluster, key=lambda k: -k[1])):
            lines = len(groups[key])
            if i == 0:
                offsets[key] = 8
            else:
                offsets[key] = -10 - 9 * (lines - 1) - below
                below += 9 * lines + 4
    return offsets


def _name(s: Summary, compare: bool) -> str:
    return f"{s.run}: {s.label}" if compare else s.label


def plot_pareto(summaries: Sequence[Summary], path: str | Path, compare: bool = False) -> Path:
    plt = _pyplot()
    from matplotlib import ticker

    metrics = [("f1", "F1 (x100)")]
    if any(s.overall.j is not None for s in summaries):
        metrics.append(("j", "LLM-judge J (x100)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5.0), squeeze=False)
    cmap = plt.get_cmap("tab10")
    names = list(dict.fromkeys(_name(s, compare) for s in summaries))
    for ax, (metric, ylabel) in zip(axes[0], metrics, strict=True):
        pts = []
        # Points that coincide (memory-static reads what rag-observations reads) share one label.
        groups: dict[tuple[float, float], list[str]] = {}
        for s in summaries:
            y = getattr(s.overall, metric)
            if y is None:
                continue
            x = max(s.grounding_tokens, 1.0)  # k=0 systems sit at 1 token on the log axis
            pts.append((x, y))
            ax.scatter([x], [y], s=70, color=cmap(names.index(_name(s, compare)) % 10), zorder=3,
                       edgecolor="black", linewidth=0.5, label=_name(s, compare))
            groups.setdefault((round(x, 1), round(y, 2)), []).append(_name(s, compare))
        for (x, y), dy in _label_offsets(groups).items():
            ax.annotate("\n".join(groups[(x, y)]), (x, y), textcoords="offset points", xytext=(6, dy), fontsize=8)
        front = pareto_front(pts)
        if len(front) > 1:
            xs, ys = zip(*front, strict=True)
            ax.step(xs, ys, where="post", color="grey", linestyle="--", linewidth=1, zorder=2,
                    label="Pareto frontier")
        ax.legend(loc="best", fontsize=7, framealpha=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("grounding tokens per answer (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if pts:
            lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
            ax.set_xlim(lo / 2, hi * 4)  # room for the labels right of the points
            top = max(5.0, max(p[1] for p in pts) * 1.25)
            ax.set_ylim(-0.05 * top, top)  # points at 0 stay visible
    fig.suptitle("LoCoMo: answer quality vs grounding tokens (one point per system and k)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_categories(summaries: Sequence[Summary], path: str | Path, compare: bool = False) -> Path:
    plt = _pyplot()
    cats = sorted({c for s in summaries for c in s.categories})
    metrics = [("f1", "F1 (x100)")]
    if any(s.overall.j is not None for s in summaries):
        metrics.append(("j", "J (x100)"))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(7.0, 1.6 * len(cats) * max(1, len(summaries)) / 2),
                                                       3.8 * len(metrics)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    width = 0.8 / max(len(summaries), 1)
    for ax, (metric, ylabel) in zip(axes[:, 0], metrics, strict=True):
        for i, s in enumerate(summaries):
            ys = [getattr(s.categories[c], metric) or 0.0 if c in s.categories else 0.0 for c in cats]
            xs = [j + (i - (len(summaries) - 1) / 2) * width for j in range(len(cats))]
            ax.bar(xs, ys, width=width, color=cmap(i % 10), label=_name(s, compare))
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([f"{c} {CATEGORY_NAMES[c]}" for c in cats])
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=2)
    axes[0, 0].set_title("LoCoMo quality per question category")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
