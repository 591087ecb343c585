"""Choosing without peeking at the test split: validation schemes, the
simpler-unless-clearly-better rule, text trust tuning, few-shot sampling.

A *scheme* says where a choice is scored:
  val split   fit on the training rows, score (and stop early) on the val split;
  k-fold CV   within K shots per class: fit on the other folds, score each fold; the final
              head is refit on all the shots for the mean number of steps the folds used
              (so nothing is tuned on more than the K labelled examples per class);
  none        1 shot per class: no fold can hold out an example of every class, so nothing
              that needs scoring is used: text features and the label prior are left out
              (image-only).

The rule (`choose`): candidates come ordered simplest first (image-only, then text with
growing trust); the simplest one whose score is within one paired standard error of
the best wins. A text feature therefore has to beat image-only clearly on validation
to be kept: the head is never knowingly worse than image-only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from phrasefuse.fuse.data import Blocks
from phrasefuse.fuse.heads import Align, FittedHead, Task, Transform, batch_size_for, fit
from phrasefuse.fuse.metrics import example_scores

TRUST_GRID = (0.0, 0.25, 0.5, 1.0)  # per text feature, linear and lgbm heads
MAX_FOLDS = 5


@dataclass
class Scheme:
    name: str
    folds: list[tuple[np.ndarray, np.ndarray]]  # (fit rows, score rows); holdout: one
    pool: np.ndarray  # rows the final head is fitted on (cv, none)
    holdout: bool

    def describe(self) -> str:
        return self.name


def holdout(train_rows: np.ndarray, val_rows: np.ndarray) -> Scheme:
    return Scheme("val split", [(train_rows, val_rows)], train_rows, True)


def cross_validation(rows: np.ndarray, y: np.ndarray, multilabel: bool, k: int, seed: int) -> Scheme:
    """Stratified folds within the shots (k examples per class -> min(k, 5) folds)."""
    n_folds = min(k, MAX_FOLDS)
    if n_folds < 2:
        return Scheme("1 shot per class: no fold can hold one out", [], rows, False)
    rng = np.random.default_rng(seed + 7919)
    perm = rows[rng.permutation(len(rows))]
    if multilabel:
        fold = np.arange(len(perm)) % n_folds
    else:
        fold = rank_within_group(y[perm]) % n_folds
    folds = [(perm[fold != f], perm[fold == f]) for f in range(n_folds)]
    return Scheme(f"{n_folds}-fold cross-validation within the shots", folds, rows, False)


def rank_within_group(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2... for the successive occurrences of each value (in order of appearance)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups) != 0) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(groups), np.int64)
    rank[order] = np.arange(len(order)) - first
    return rank


# ---------------------------------------------------------------- the rule


@dataclass
class Trial:
    config: dict[int, float]  # block index -> trust scale
    scores: np.ndarray  # per scored example (concatenated folds)
    steps: list[int]
    heads: list[FittedHead] = field(default_factory=list)
    probs: np.ndarray | None = None  # out-of-fold probabilities of the scored rows (concatenated folds)
    rows: np.ndarray | None = None  # which rows those are

    @property
    def mean(self) -> float:
        s = self.scores[np.isfinite(self.scores)]
        return float(s.mean()) if len(s) else float("nan")


def choose(trials: Sequence[Trial], n_se: float = 1.0) -> int:
    """Index of the simplest trial within `n_se` paired standard errors of the best."""
    means = np.array([t.mean for t in trials])
    best = int(np.nanargmax(means)) if np.isfinite(means).any() else 0
    for i, t in enumerate(trials):
        d = trials[best].scores - t.scores
        d = d[np.isfinite(d)]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        if means[i] >= means[best] - n_se * se - 1e-12:
            return i
    return best


# ---------------------------------------------------------------- trials


class Tuner:
    """Fits and scores head configurations under one scheme (memoised by config)."""

    def __init__(self, kind: str, blocks: Blocks, y: np.ndarray, task: Task, roles: Sequence[str], params: dict,
                 seed: int, scheme: Scheme, align: Align | None = None):
        self.kind, self.blocks, self.y, self.task = kind, blocks, y, task
        self.roles, self.params, self.seed, self.scheme, self.align = list(roles), params, seed, scheme, align
        components = params.get("components") if kind == "lgbm" else None
        # Normalisation / projections depend only on the fit rows: fitted once per fold for every config.
        self.transforms = [Transform.fit(blocks.take(fit_rows), components, y[fit_rows], task.num_classes)
                           for fit_rows, _ in scheme.folds]
        self._trials: dict[tuple, Trial] = {}

    def trial(self, config: dict[int, float]) -> Trial:
        key = tuple(sorted(config.items()))
        if key not in self._trials:
            which = sorted(config)
            scores, steps, heads, all_probs = [], [], [], []
            for (fit_rows, score_rows), transform in zip(self.scheme.folds, self.transforms):
                head = self._fit(which, config, fit_rows, transform.select(which), stop_rows=score_rows)
                probs = head.predict(self.blocks.take(score_rows).select(which))
                scores.append(example_scores(probs, self.y[score_rows], self.task.multilabel))
                steps.append(head.steps)
                heads.append(head)
                all_probs.append(probs)
            scored = [rows for _, rows in self.scheme.folds]
            self._trials[key] = Trial(dict(config), np.concatenate(scores) if scores else np.zeros(0), steps,
                                      heads if self.scheme.holdout else [],
                                      np.concatenate(all_probs) if all_probs else None,
                                      np.concatenate(scored) if scored else None)
        return self._trials[key]

    def final(self, config: dict[int, float]) -> FittedHead:
        """The head to keep: the holdout fit itself, or a refit on the whole pool."""
        if self.scheme.holdout:
            return self.trial(config).heads[0]
        which = sorted(config)
        steps = None
        if self.scheme.folds:
            trial = self.trial(config)
            if self.kind == "lgbm":
                steps = max(1, int(round(np.mean(trial.steps))))
            else:  # as many epochs as the folds needed, in steps of the whole pool's batches
                epochs = [s / _steps_per_epoch(len(f), self.params)
                          for s, (f, _) in zip(trial.steps, self.scheme.folds)]
                steps = max(1, int(round(np.mean(epochs) * _steps_per_epoch(len(self.scheme.pool), self.params))))
        return self._fit(which, config, self.scheme.pool, None, stop_rows=None, steps=steps)

    def _fit(self, which, config, fit_rows, transform, stop_rows, steps=None) -> FittedHead:
        blocks = self.blocks.take(fit_rows).select(which)
        stop = (self.blocks.take(stop_rows).select(which), self.y[stop_rows]) if stop_rows is not None else None
        return fit(self.kind, blocks, self.y[fit_rows], self.task, [self.roles[j] for j in which],
                   [config[j] for j in which], self.params, self.seed, stop=stop, steps=steps,
                   transform=transform, align=self.align)


def _steps_per_epoch(n: int, params: dict) -> int:
    return math.ceil(n / batch_size_for(n, params.get("batch_size")))


def tune_trust(tuner: Tuner, base: dict[int, float], text_blocks: Sequence[int],
               grid: Sequence[float] = TRUST_GRID) -> tuple[dict[int, float], list[dict]]:
    """Greedy, one text feature at a time: its scale from `grid` (0 = left out) by `choose`."""
    config, log = dict(base), []
    for t in text_blocks:
        candidates = [config] + [{**config, t: float(s)} for s in grid if s > 0]
        trials = [tuner.trial(c) for c in candidates]
        pick = choose(trials)
        log.append({"block": t, "scales": [0.0] + [float(s) for s in grid if s > 0],
                    "scores": [t_.mean for t_ in trials], "chosen": float(candidates[pick].get(t, 0.0))})
        config = candidates[pick]
    return config, log


# ---------------------------------------------------------------- sampling


def sample_shots(rows: np.ndarray, y: np.ndarray, multilabel: bool, k: int, seed: int) -> np.ndarray:
    """K rows per class (fewer when a class has fewer), drawn with `seed`; multi-label:
    K rows carrying each label."""
    rng = np.random.default_rng(seed)
    perm = rows[rng.permutation(len(rows))]
    if not multilabel:
        return np.sort(perm[rank_within_group(y[perm]) < k])
    picked = np.zeros(len(perm), bool)
    for c in range(y.shape[1]):  # per label (not per row): the first k rows of the shuffle having it
        picked[np.flatnonzero(y[perm, c] > 0.5)[:k]] = True
    return np.sort(perm[picked])


def stratified_subsample(rows: np.ndarray, y: np.ndarray, multilabel: bool, n_max: int, seed: int) -> np.ndarray:
    """At most n_max rows, each class in proportion (every class keeps at least one row)."""
    if len(rows) <= n_max:
        return rows
    rng = np.random.default_rng(seed + 104729)
    perm = rows[rng.permutation(len(rows))]
    if multilabel:
        return np.sort(perm[:n_max])
    groups = y[perm]
    rank = rank_within_group(groups)
    counts = np.bincount(groups[groups >= 0], minlength=int(groups.max()) + 1)
    position = rank / counts[groups]
    return np.sort(perm[np.argsort(position, kind="stable")[:n_max]])
