"""Metrics on arrays: scores (n, C) against encoded labels (see data.Labels).

Multi-class (probabilities, labels (n,) int, -1 = a label the head never saw,
always counted wrong): top-1, top-5, macro-F1, per-class accuracy.
Multi-label (sigmoid probabilities, labels (n, C) 0/1, plus each row's count of
labels outside the vocabulary, counted as misses): mAP, micro precision /
recall / F1 of the thresholded and capped decision, recall at 80% precision.
All values are fractions in [0, 1]; reports print them as percentages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from phrasefuse.fuse.data import Labels


# ---------------------------------------------------------------- multi-class


TOPK_VALUES = 1 << 24  # scores per chunk of `topk_accuracy`


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    if len(y) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    if k == scores.shape[1]:
        return float(np.mean(np.isin(y, np.arange(k))))
    # In row chunks: -scores and argpartition's int64 indices of a whole (n, C) split are 3x its
    # bytes (15,000 rows x 15,000 classes: 2.7 GB on top of the scores).
    rows, hits = max(1, TOPK_VALUES // scores.shape[1]), 0
    for i in range(0, len(y), rows):
        top = np.argpartition(-scores[i:i + rows], k - 1, axis=1)[:, :k]
        hits += int(np.sum(np.any(top == y[i:i + rows, None], axis=1)))
    return hits / len(y)


def per_class_counts(pred: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, predicted count, support) per class."""
    tp = np.bincount(y[pred == y], minlength=num_classes)
    predicted = np.bincount(pred, minlength=num_classes)
    support = np.bincount(y[y >= 0], minlength=num_classes)
    return tp, predicted, support


def multiclass_metrics(scores: np.ndarray, y: np.ndarray, vocab: Sequence[str]) -> dict:
    pred = np.argmax(scores, axis=1)
    tp, predicted, support = per_class_counts(pred, y, len(vocab))
    fp, fn = predicted - tp, support - tp
    seen = (support + predicted) > 0  # classes in the truth or the predictions (as scikit-learn)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(vocab)), where=seen)
    has = support > 0
    return {
        "rows": int(len(y)),
        "top1": topk_accuracy(scores, y, 1),
        "top5": topk_accuracy(scores, y, 5),
        "macro_f1": float(f1[seen].mean()) if seen.any() else float("nan"),
        "per_class_accuracy": {vocab[c]: float(tp[c] / support[c]) for c in np.flatnonzero(has)},
        "unknown_labels": int(np.sum(y < 0)),
    }


# ---------------------------------------------------------------- multi-label


def decide(probs: np.ndarray, threshold: float | np.ndarray, max_labels: int | None) -> np.ndarray:
    """Labels kept per image: probability >= threshold (global or per label), at most
    `max_labels` of them (the most probable)."""
    keep = probs >= np.asarray(threshold, np.float32)
    if max_labels is not None and 0 < max_labels < probs.shape[1]:
        # rank of each label within its row (0 = most probable)
        order = np.argsort(-probs, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(probs.shape[1])[None].repeat(len(probs), 0), axis=1)
        keep &= rank < max_labels
    return keep


def _precision_recall_steps(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, precision) at each distinct score threshold, highest first; tied
    scores count as one threshold (as scikit-learn)."""
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tps = np.cumsum(p)[last_of_tie]
    return tps, tps / (last_of_tie + 1)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall steps."""
    n_pos = positive.sum()
    if n_pos == 0:
        return float("nan")
    tps, precision = _precision_recall_steps(scores, positive)
    return float(np.sum(np.diff(np.r_[0.0, tps / n_pos]) * precision))


def recall_at_precision(scores: np.ndarray, positive: np.ndarray, min_precision: float, total_positive: int) -> float:
    """Highest recall over thresholds whose precision is at least `min_precision` (0 when none)."""
    if total_positive == 0:
        return float("nan")
    tps, precision = _precision_recall_steps(scores, positive)
    ok = precision >= min_precision - 1e-12
    return float(tps[ok].max() / total_positive) if ok.any() else 0.0


def multilabel_metrics(probs: np.ndarray, y: np.ndarray, vocab: Sequence[str], threshold: float | np.ndarray,
                       max_labels: int | None, unknown: np.ndarray | None = None) -> dict:
    unknown = np.zeros(len(y), np.int64) if unknown is None else unknown
    positive = y > 0.5
    kept = decide(probs, threshold, max_labels)
    tp = int(np.sum(kept & positive))
    fp = int(np.sum(kept & ~positive))
    fn = int(np.sum(~kept & positive) + unknown.sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    ap = {vocab[c]: average_precision(probs[:, c], positive[:, c]) for c in np.flatnonzero(positive.any(axis=0))}
    return {
        "rows": int(len(y)),
        "mAP": float(np.mean(list(ap.values()))) if ap else float("nan"),
        "micro_precision": float(precision),
        "micro_recall": float(recall),
        "micro_f1": float(f1),
        "recall_at_80_precision": recall_at_precision(probs.ravel(), positive.ravel(), 0.8,
                                                      int(positive.sum() + unknown.sum())),
        "threshold": "per-label" if np.ndim(threshold) else float(threshold),
        "max_labels": max_labels,
        "per_label_ap": ap,
        "unknown_labels": int(unknown.sum()),
    }


# ---------------------------------------------------------------- per-example scores (for choosing)


def example_scores(scores: np.ndarray, y: np.ndarray, multilabel: bool) -> np.ndarray:
    """One number per example whose mean is the selection criterion: top-1 correctness
    (multi-class), or the image's label-ranking average precision (multi-label; NaN for
    an image without labels). Paired differences give a standard error."""
    if not multilabel:
        return (np.argmax(scores, axis=1) == y).astype(np.float64)
    positive = y > 0.5
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(positive, order, axis=1).astype(np.float64)
    precision_at = np.cumsum(hits, axis=1) / np.arange(1, scores.shape[1] + 1)
    n_pos = hits.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, (precision_at * hits).sum(axis=1) / n_pos, np.nan)


def headline_key(metrics: dict) -> str:
    """The metric that ranks heads: top-1, or mAP for multi-label (the report's head table)."""
    return "top1" if "top1" in metrics else "mAP"


def headline(metrics: dict) -> float:
    """The one number that ranks heads (the report picks its best head by it)."""
    return float(metrics[headline_key(metrics)])


def summary(metrics: dict) -> dict:
    """The metrics without per-class detail (for tables and train reports)."""
    return {k: v for k, v in metrics.items() if k not in ("per_class_accuracy", "per_label_ap")}


# ---------------------------------------------------------------- a head's probabilities on labels

DEFAULT_THRESHOLD = 0.3  # multi-label decisions: the tagging study's global threshold


def evaluate_probs(probs: np.ndarray, labels: Labels, threshold: float | np.ndarray = DEFAULT_THRESHOLD,
                   max_labels: int | None = None) -> dict:
    """Every metric of probabilities (n, C) against `labels` (multi-label: decided at `threshold`)."""
    if labels.multilabel:
        return multilabel_metrics(probs, labels.y, labels.vocab, threshold, max_labels, labels.unknown)
    return multiclass_metrics(probs, labels.y, labels.vocab)


def tune_thresholds(probs: np.ndarray, y: np.ndarray, default: float) -> np.ndarray:
    """Per label, the threshold in 0.05..0.95 with the best F1 on validation (the global one
    for labels without a validation positive)."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2).astype(np.float32)
    positive = y > 0.5
    kept = probs[:, :, None] >= grid
    tp = (kept & positive[:, :, None]).sum(axis=0)
    fp = (kept & ~positive[:, :, None]).sum(axis=0)
    fn = positive.sum(axis=0)[:, None] - tp
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(tp.shape), where=(2 * tp + fp + fn) > 0)
    best = grid[np.argmax(f1, axis=1)]
    return np.where(positive.any(axis=0), best, np.float32(default)).astype(np.float32)
