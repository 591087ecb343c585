"""The report's plots: arrays and tables in, PNG files out (matplotlib, no screen)."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

NAMES = {"top1": "top-1", "top5": "top-5", "mAP": "mAP", "micro_f1": "micro-F1"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _plain_text(plot):
    """Every text of the plot drawn as written. Labels and feature names are the user's data: with
    mathtext on, a label with two '$' ('$10_to_$20') is parsed as a formula (an error, or a formula
    drawn instead of the label), and with usetex a '%' or '&' reaches LaTeX. Turning the parsing off
    for the whole figure (matplotlib's text.parse_math) covers every text, tick label, legend and
    title alike, where escaping each string would have to find every one."""

    @functools.wraps(plot)
    def drawn(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return plot(*args, **kwargs)

    return drawn


IMAGE_ONLY = "(image only)"  # how ablation rows name the image-only feature set (fuse/ablate.py)
REFERENCE = dict(color="#222", lw=1.6, ls="--")  # the image-only reference line, in both plots


def _split_head(split: str, head: str | None) -> str:
    return f"{head} head, {split} split" if head else f"{split} split"


def _save(fig, path: str | os.PathLike):
    """Write the PNG and release pyplot's hold on the figure; the figure is returned to the caller
    so that tests can read what was drawn (its artists stay readable after close)."""
    plt = _pyplot()
    fig.savefig(path, format="png")
    plt.close(fig)
    return fig


@_plain_text
def ablation_bars(table: dict, path: str | os.PathLike, head: str | None = None):
    """One bar per feature set: the first metric, mean with the spread over seeds; the figure."""
    plt = _pyplot()
    metric = table["columns"][0]
    rows = table["rows"]
    means = np.array([100 * r[metric]["mean"] for r in rows])
    stds = np.array([100 * r[metric]["std"] for r in rows])
    labels = [r["features"].replace(f" {IMAGE_ONLY}", f"\n{IMAGE_ONLY}") for r in rows]
    base = next((m for r, m in zip(rows, means) if IMAGE_ONLY in r["features"]), None)
    def colour(row: dict, mean: float) -> str:  # grey: image only or level with it; green: above; red: below
        if IMAGE_ONLY in row["features"] or base is None or abs(mean - base) < 0.05:
            return "#9e9e9e"
        return "#2a9d8f" if mean > base else "#e76f51"

    colours = [colour(r, m) for r, m in zip(rows, means)]
    # constrained layout makes room for a legend outside the axes: inside, it covered the bars
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)) + 2.2, 4.2), dpi=110, layout="constrained")
    ax.bar(range(len(rows)), means, yerr=stds, color=colours, capsize=3)
    if base is not None:
        from matplotlib.patches import Patch

        ax.axhline(base, label="image only (reference)", zorder=3, **REFERENCE)
        handles = [ax.get_legend_handles_labels()[0][0], Patch(color="#2a9d8f", label="above image only"),
                   Patch(color="#e76f51", label="below image only"),
                   Patch(color="#9e9e9e", label="image only, or level with it")]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8,
                  title="error bar: ± 1 std over seeds", title_fontsize=8)
    for i, (m, sd) in enumerate(zip(means, stds)):  # above the error bar, where the bar's cap does not cross it
        ax.text(i, m + sd + 1, f"{m:.1f}", ha="center", va="bottom", fontsize=8,
                bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.8))
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"test {NAMES.get(metric, metric)} (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Ablation: {_split_head('test', head)} ({table['regime']}, {table['seeds']} seed(s))",
                 fontsize=10)
    return _save(fig, path)


@_plain_text
def few_shot_curves(tables: Sequence[dict], path: str | os.PathLike, head: str | None = None):
    """Test score against labelled examples per class, one line per feature set (mean; band: ± 1 std
    over seeds); the figure. The image-only line is the reference, drawn last, dashed and on top:
    where a fused line equals it (text not kept), drawn first it was hidden under that line."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    tables = sorted((t for t in tables if t["shots"]), key=lambda t: t["shots"])
    metric = tables[0]["columns"][0]
    shots = [t["shots"] for t in tables]
    fig, ax = plt.subplots(figsize=(8.2, 4.0), dpi=110, layout="constrained")
    names = [r["features"] for r in tables[0]["rows"]]
    for label in sorted(names, key=lambda n: IMAGE_ONLY in n):  # image only last
        rows = [next(r for r in t["rows"] if r["features"] == label) for t in tables]
        mean = np.array([100 * r[metric]["mean"] for r in rows])
        std = np.array([100 * r[metric]["std"] for r in rows])
        if IMAGE_ONLY in label:
            line, = ax.plot(shots, mean, marker="s", mfc="none", label=f"{label}: reference", zorder=5, **REFERENCE)
        else:
            line, = ax.plot(shots, mean, marker="o", label=label, zorder=3)
        ax.fill_between(shots, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    # no minor tick labels: the log axis writes them as mathtext, printed raw with parse_math off
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel(f"test {NAMES.get(metric, metric)} (%)")
    ax.set_title(f"Few-shot: {_split_head('test', head)}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8,
              title="line: mean over seeds\nband: ± 1 std over seeds", title_fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


@_plain_text
def confusion(matrix: np.ndarray, vocab: Sequence[str], path: str | os.PathLike, title: str):
    """Rows: true label; columns: predicted; cells: share of the row, so that a rare class reads on
    the same scale as a common one (percent and count written in), with its colour bar; the figure.
    `title` names the head and the split."""
    plt = _pyplot()
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(vocab)
    size = min(12.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size + 1.2, size * 0.9), dpi=110, layout="constrained")
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class's rows")
    bar.ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
    if n <= 30:
        for i, j in zip(*np.nonzero(matrix)):
            ax.text(j, i, f"{100 * share[i, j]:.0f}%\n({matrix[i, j]})", ha="center", va="center", fontsize=6,
                    color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), vocab, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), vocab, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    """Counts of (true, predicted) class indices; -1 (unknown) rows are left out."""
    true, predicted = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)  # [] is float
    ok = (true >= 0) & (predicted >= 0)
    return np.bincount(true[ok] * n + predicted[ok], minlength=n * n).reshape(n, n)
