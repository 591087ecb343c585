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

`fit_and_choose` (what `fuse train` saves and `fuse ablate` tabulates, for any subset of
features): the image-only head and the fused head, each text feature's trust tuned (a
scale from TRUST_GRID for heads that do not learn it), the better one kept by the rule;
then, given pseudo-shots, the kept head's configuration with growing sets of them, kept
only when clearly better (two standard errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from phrasefuse.fuse.data import Blocks, rank_within_group
from phrasefuse.fuse.heads import HEADS, Align, FittedHead, Task, Transform, fit
from phrasefuse.fuse.labeltext import choose_prior_weight
from phrasefuse.fuse.metrics import example_scores
from phrasefuse.fuse.pseudo import PER_LABEL as PSEUDO_PER_LABEL
from phrasefuse.fuse.pseudo import RULE as PSEUDO_RULE
from phrasefuse.fuse.pseudo import PseudoShots, with_pseudo_rows

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


def cross_validation(rows: np.ndarray, y: np.ndarray, multilabel: bool, k: int, seed: int,
                     within: str = "the shots") -> Scheme:
    """Stratified folds within `rows` (k examples per class -> min(k, 5) folds)."""
    n_folds = min(k, MAX_FOLDS)
    if n_folds < 2:
        return Scheme("1 shot per class: no fold can hold one out" if within == "the shots" else
                      f"1 row per label within {within}: no fold can hold one out", [], rows, False)
    rng = np.random.default_rng(seed + 7919)
    perm = rows[rng.permutation(len(rows))]
    if multilabel:
        fold = np.arange(len(perm)) % n_folds
    else:
        fold = rank_within_group(y[perm]) % n_folds
    folds = [(perm[fold != f], perm[fold == f]) for f in range(n_folds)]
    return Scheme(f"{n_folds}-fold cross-validation within {within}", folds, rows, False)


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
        components = HEADS[kind].components(params)
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
            steps = HEADS[self.kind].refit_steps(self.trial(config).steps, [len(f) for f, _ in self.scheme.folds],
                                                 len(self.scheme.pool), self.params)
        return self._fit(which, config, self.scheme.pool, None, stop_rows=None, steps=steps)

    def _fit(self, which, config, fit_rows, transform, stop_rows, steps=None) -> FittedHead:
        blocks = self.blocks.take(fit_rows).select(which)
        stop = (self.blocks.take(stop_rows).select(which), self.y[stop_rows]) if stop_rows is not None else None
        return fit(self.kind, blocks, self.y[fit_rows], self.task, [self.roles[j] for j in which],
                   [config[j] for j in which], self.params, self.seed, stop=stop, steps=steps,
                   transform=transform, align=self.align)


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


def val_split_schemes(train_rows: np.ndarray, val_rows: np.ndarray, y: np.ndarray, multilabel: bool,
                      tune_rows: int | None, seed: int) -> tuple[Scheme, Scheme | None]:
    """The val-split scheme, and the one text trust is tuned on: the same val rows, fitted on at
    most `tune_rows` train rows (a stratified sample); None when that sample is every train row."""
    tune = stratified_subsample(train_rows, y, multilabel, int(tune_rows or len(train_rows)), seed)
    return holdout(train_rows, val_rows), (holdout(tune, val_rows) if len(tune) < len(train_rows) else None)


def shots_scheme(train_rows: np.ndarray, y: np.ndarray, multilabel: bool, k: int, seed: int) -> Scheme:
    """K shots per class drawn from the train rows with `seed`, cross-validated within them."""
    return cross_validation(sample_shots(train_rows, y, multilabel, k, seed), y, multilabel, k, seed)


NO_VAL = "the training rows (no val split)"


def train_cv_schemes(train_rows: np.ndarray, y: np.ndarray, multilabel: bool, tune_rows: int | None,
                     seed: int) -> tuple[Scheme, Scheme | None]:
    """No val split: the shots regime's cross-validation within every training row, with as many
    folds as the median label has rows (at most 5; so 5 photos per class fold exactly as `fuse ablate
    --shots 5`), and text trust tuned on at most `tune_rows` of them (a stratified sample)."""
    counts = (y[train_rows] > 0.5).sum(axis=0) if multilabel else np.bincount(y[train_rows][y[train_rows] >= 0])
    k = int(np.median(counts[counts > 0])) if (counts > 0).any() else 1
    scheme = cross_validation(train_rows, y, multilabel, k, seed, NO_VAL)
    tune = stratified_subsample(train_rows, y, multilabel, int(tune_rows or len(train_rows)), seed)
    return scheme, (cross_validation(tune, y, multilabel, k, seed, NO_VAL) if len(tune) < len(train_rows) else None)


def training_schemes(train_rows: np.ndarray, val_rows: np.ndarray, y: np.ndarray, multilabel: bool,
                     tune_rows: int | None, seed: int, shots: int | None = None) -> tuple[Scheme, Scheme | None]:
    """Where `fuse train`, a run's head and `fuse ablate` score their choices (text trust, the label
    prior, early stopping), and the scheme text trust is tuned on (None: the same): K shots per class
    drawn with `seed`, cross-validated within them (the val split is not read); else the val split;
    else, without one, the same cross-validation within the training rows."""
    if shots is not None:
        return shots_scheme(train_rows, y, multilabel, shots, seed), None
    if len(val_rows):
        return val_split_schemes(train_rows, val_rows, y, multilabel, tune_rows, seed)
    return train_cv_schemes(train_rows, y, multilabel, tune_rows, seed)


# ---------------------------------------------------------------- fit and choose

TEXT_RULE = ("candidates ordered simplest first (image-only, then growing text trust); the simplest whose validation "
             "top-1 (or per-image AP) is within one paired standard error of the best is saved")


@dataclass
class Outcome:
    """The head to keep, and the two it was chosen between."""

    saved: FittedHead
    saved_blocks: list[int]
    choice: str  # "fused" | "image-only" | "single"
    reason: str
    fused: FittedHead | None = None
    fused_blocks: list[int] = field(default_factory=list)
    image_only: FittedHead | None = None
    image_blocks: list[int] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)  # mean selection score per candidate
    tuning: list[dict] = field(default_factory=list)
    scheme: str = ""
    tuner: Tuner | None = None  # scores the saved configuration again (out-of-fold probabilities)
    saved_config: dict[int, float] = field(default_factory=dict)  # block -> trust of the saved head
    pseudo: dict | None = None  # pseudo-shots: what was tried, the scores, what was kept (fuse/pseudo.py)

    def held_out(self) -> Trial | None:
        """The saved configuration's trial: its out-of-fold (or validation) probabilities and
        rows; None when nothing was held out (1 shot per class)."""
        if self.tuner is None or not self.tuner.scheme.folds:
            return None
        trial = self.tuner.trial(self.saved_config)
        return trial if trial.probs is not None else None


def choose_label_prior(outcome: Outcome, cos: np.ndarray, y: np.ndarray) -> tuple[float, dict]:
    """The label prior's weight and how it was chosen (labeltext.choose_prior_weight), for `fuse
    train`, `run` and `fuse ablate` alike: on the saved head's out-of-fold (or validation)
    probabilities, and when those are inconclusive, the prior's own temperature fitted on the
    head's training rows; with 1 shot per class nothing is held out, and the temperature is
    fitted on the shots, which the prior never trained on."""
    trial = outcome.held_out()
    if trial is None:
        shots = outcome.tuner.scheme.pool if outcome.tuner is not None else np.zeros(0, dtype=np.int64)
        weight, record = choose_prior_weight(None, cos[shots], y[shots])
        return weight, {"scheme": "1 shot: the prior's temperature fitted on the shots", **record}
    pool = outcome.tuner.scheme.pool
    pool = pool[pool < len(y)]  # the labelled rows; pseudo-shot rows (appended after them) have no prior score
    weight, record = choose_prior_weight(trial.probs, cos[trial.rows], y[trial.rows], trained=(cos[pool], y[pool]))
    return weight, {"scheme": outcome.scheme, **record}


def fit_and_choose(kind: str, blocks: Blocks, y: np.ndarray, task: Task, roles: Sequence[str], params: dict,
                   seed: int, scheme: Scheme, tuning_scheme: Scheme | None = None,
                   align: Align | None = None, pseudo: PseudoShots | None = None) -> Outcome:
    """Fit image-only and fused heads under `scheme`, tune text trust, keep the better one;
    then, given `pseudo`, add pseudo-shots to the kept head's training rows when they clearly help."""
    outcome = _choose_text(kind, blocks, y, task, roles, params, seed, scheme, tuning_scheme, align)
    if pseudo is not None and not task.multilabel:
        outcome = choose_pseudo(outcome, kind, blocks, y, task, roles, params, seed, scheme, align, pseudo)
    return outcome


# The best of four candidate sets is compared with none: at one standard error a set of noise rows
# would win in up to half the draws (1 - 0.84^4), at two in under a tenth (1 - 0.977^4).
PSEUDO_N_SE = 2.0


def choose_pseudo(outcome: Outcome, kind: str, blocks: Blocks, y: np.ndarray, task: Task, roles: Sequence[str],
                  params: dict, seed: int, scheme: Scheme, align: Align | None, pseudo: PseudoShots) -> Outcome:
    """The kept head's configuration refitted with growing sets of pseudo-shots (pseudo.PER_LABEL),
    scored on the same held-out rows as without them; `choose` keeps the simplest within two
    paired standard errors of the best (off unless clearly better)."""
    img = next((j for j, r in enumerate(roles) if r == "image"), None)
    record: dict = {"index": pseudo.index, "text_encoder": pseudo.text_encoder, "rule": PSEUDO_RULE,
                    "per_label": 0, "rows": 0, "candidates": []}
    if img is None or not scheme.folds or outcome.tuner is None:
        outcome.pseudo = {**record, "reason": f"{scheme.describe()}: nothing held out to show the pseudo-shots "
                                             f"help, so they are left out" if img is not None else
                          "no image feature: pseudo-shots left out"}
        return outcome
    config = outcome.saved_config
    trials, tuners, sets = [outcome.tuner.trial(config)], [outcome.tuner], [np.zeros(0, np.int64)]
    for per_label in PSEUDO_PER_LABEL:
        taken = pseudo.taken(per_label)
        if len(taken) == 0 or len(taken) == len(sets[-1]):
            continue
        ext_blocks, ext_y, extra = with_pseudo_rows(blocks, y, img, pseudo, taken)
        ext_scheme = Scheme(scheme.name, [(np.r_[f, extra], s) for f, s in scheme.folds],
                            np.r_[scheme.pool, extra], scheme.holdout)
        tuners.append(Tuner(kind, ext_blocks, ext_y, task, roles, params, seed, ext_scheme, align))
        trials.append(tuners[-1].trial(config))
        sets.append(taken)
        record["candidates"].append({**pseudo.describe(per_label, task.vocab), "score": trials[-1].mean})
    pick = choose(trials, PSEUDO_N_SE)
    record["score_without"] = trials[0].mean
    if pick == 0:
        best = max(record["candidates"], key=lambda c: c["score"], default=None)
        detail = f" (best {100 * (best['score'] - trials[0].mean):+.1f} pt with {best['per_label']} per label)" \
            if best else ""
        outcome.pseudo = {**record, "reason": "no candidate beat the head without pseudo-shots by more than two "
                                             "paired standard errors" + detail}
        return outcome
    chosen = record["candidates"][pick - 1]
    gain, se = _paired_gain(trials[pick], trials[0])
    outcome.saved = tuners[pick].final(config)
    outcome.tuner = tuners[pick]
    outcome.pseudo = {**record, "per_label": chosen["per_label"], "rows": chosen["rows"],
                      "reason": f"{chosen['rows']} pseudo-shots ({chosen['per_label']} per label) beat the head "
                                f"without them by {100 * gain:+.1f} pt, more than two standard errors "
                                f"({100 * se:.1f} pt)"}
    outcome.reason += f"; {outcome.pseudo['reason']}"
    return outcome


def _choose_text(kind: str, blocks: Blocks, y: np.ndarray, task: Task, roles: Sequence[str], params: dict,
                 seed: int, scheme: Scheme, tuning_scheme: Scheme | None = None,
                 align: Align | None = None) -> Outcome:
    """Fit image-only and fused heads under `scheme`, tune text trust, keep the better one."""
    img = next((j for j, r in enumerate(roles) if r == "image"), None)
    texts = [j for j, r in enumerate(roles) if r != "image"]
    full = Tuner(kind, blocks, y, task, roles, params, seed, scheme, align)
    if img is None or not texts:
        config = {j: 1.0 for j in range(len(roles))}
        head = full.final(config)
        what = "image feature only" if img is not None else "no image feature: text features at full trust"
        return Outcome(head, sorted(config), "single", what, scheme=scheme.describe(), tuner=full,
                       saved_config=config)
    base = {img: 1.0}
    tuning: list[dict] = []
    if not scheme.folds:  # nothing can be scored: no untested default may change predictions
        image_only = full.final(base)
        return Outcome(image_only, [img], "image-only",
                       f"{scheme.describe()}: text cannot be validated, so it is left out", None, [], image_only,
                       [img], scheme=scheme.describe(), tuner=full, saved_config=base)
    if HEADS[kind].learns_trust:  # gates, modality dropout
        fused_cfg = {img: 1.0, **{t: 1.0 for t in texts}}
    else:
        tuner = Tuner(kind, blocks, y, task, roles, params, seed, tuning_scheme) if tuning_scheme else full
        fused_cfg, tuning = tune_trust(tuner, base, texts)
    base_trial = full.trial(base)
    image_only = full.final(base)
    validation = {"image_only": base_trial.mean}
    if fused_cfg == base:
        return Outcome(image_only, [img], "image-only",
                       "every text feature's trust was tuned to 0 on validation", None, [], image_only, [img],
                       validation, tuning, scheme.describe(), full, base)
    fused_trial = full.trial(fused_cfg)
    fused = full.final(fused_cfg)
    validation["fused"] = fused_trial.mean
    pick = choose([base_trial, fused_trial])
    gain, se = _paired_gain(fused_trial, base_trial)
    if pick == 1:
        choice, saved, which, saved_cfg = "fused", fused, sorted(fused_cfg), fused_cfg
        reason = (f"fused beats image-only on validation by {100 * gain:+.1f} pt, more than one standard "
                  f"error ({100 * se:.1f} pt)")
    else:
        choice, saved, which, saved_cfg = "image-only", image_only, [img], base
        reason = (f"fused is not clearly better than image-only on validation ({100 * gain:+.1f} pt, standard "
                  f"error {100 * se:.1f} pt)")
    return Outcome(saved, which, choice, reason, fused, sorted(fused_cfg), image_only, [img], validation, tuning,
                   scheme.describe(), full, saved_cfg)


def _paired_gain(a: Trial, b: Trial) -> tuple[float, float]:
    d = a.scores - b.scores
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return 0.0, 0.0
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
