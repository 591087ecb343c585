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


@_plain_text
def ablation_bars(table: dict, path: str | os.PathLike) -> None:
    """One bar per feature set: the first metric, mean with the spread over seeds."""
    plt = _pyplot()
    metric = table["columns"][0]
    rows = table["rows"]
    means = np.array([100 * r[metric]["mean"] for r in rows])
    stds = np.array([100 * r[metric]["std"] for r in rows])
    labels = [r["features"].replace(" (image only)", "\n(image only)") for r in rows]
    base = next((m for r, m in zip(rows, means) if "(image only)" in r["features"]), None)
    def colour(row: dict, mean: float) -> str:  # grey: image only or level with it; green: above; red: below
        if "(image only)" in row["features"] or base is None or abs(mean - base) < 0.05:
            return "#9e9e9e"
        return "#2a9d8f" if mean > base else "#e76f51"

    colours = [colour(r, m) for r, m in zip(rows, means)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.2), dpi=110)
    ax.bar(range(len(rows)), means, yerr=stds, color=colours, capsize=3)
    if base is not None:
        from matplotlib.patches import Patch

        ax.axhline(base, color="#444", lw=0.8, ls="--", label="image only")
        handles = [ax.get_legend_handles_labels()[0][0], Patch(color="#2a9d8f", label="above image only"),
                   Patch(color="#e76f51", label="below image only"),
                   Patch(color="#9e9e9e", label="image only, or level with it")]
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    for i, m in enumerate(means):
        ax.text(i, m + 1, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"test {NAMES.get(metric, metric)} (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Ablation ({table['regime']}, {table['seeds']} seed(s))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


@_plain_text
def few_shot_curves(tables: Sequence[dict], path: str | os.PathLike) -> None:
    """Test score against labelled examples per class, one line per feature set (mean, band = std)."""
    plt = _pyplot()
    tables = sorted((t for t in tables if t["shots"]), key=lambda t: t["shots"])
    metric = tables[0]["columns"][0]
    shots = [t["shots"] for t in tables]
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=110)
    for label in [r["features"] for r in tables[0]["rows"]]:
        rows = [next(r for r in t["rows"] if r["features"] == label) for t in tables]
        mean = np.array([100 * r[metric]["mean"] for r in rows])
        std = np.array([100 * r[metric]["std"] for r in rows])
        line, = ax.plot(shots, mean, marker="o", label=label)
        ax.fill_between(shots, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel(f"test {NAMES.get(metric, metric)} (%)")
    ax.set_title("Few-shot", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


@_plain_text
def confusion(matrix: np.ndarray, vocab: Sequence[str], path: str | os.PathLike, title: str) -> None:
    """Rows: true label; columns: predicted; cells: share of the row (counts written in)."""
    plt = _pyplot()
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(vocab)
    size = min(12.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i, j in zip(*np.nonzero(matrix)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), vocab, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), vocab, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    """Counts of (true, predicted) class indices; -1 (unknown) rows are left out."""
    true, predicted = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)  # [] is float
    ok = (true >= 0) & (predicted >= 0)
    return np.bincount(true[ok] * n + predicted[ok], minlength=n * n).reshape(n, n)
