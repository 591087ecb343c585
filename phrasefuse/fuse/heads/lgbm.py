"""The LightGBM head: boosted trees on each block projected on its most discriminant
directions (base.discriminant_axes); the trust scale of a text block is its `feature_contri`
(split-gain multiplier); multi-class softmax, one-vs-rest boosters for multi-label. Saved as
LightGBM's own model text, checked (lgbm_check) before LightGBM reads it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np

from phrasefuse.errors import BadInput
from phrasefuse.fuse.data import Blocks
from phrasefuse.fuse.heads.base import SMALL_WORK, Align, FittedHead


@dataclass
class LgbmHead(FittedHead):
    kind: ClassVar[str] = "lgbm"
    # LightGBM's 100-class rounds cost the most: fewer tuning rows than the torch heads.
    defaults: ClassVar[dict] = {"components": 32, "learning_rate": 0.2, "num_leaves": 7, "max_rounds": 300,
                                "early_stopping_rounds": 10, "default_rounds": 60, "lambda_l2": 1.0,
                                "feature_fraction": 0.8, "max_bin": 63, "min_data_in_leaf": 20, "tune_rows": 5_000}
    uses_projections: ClassVar[bool] = True

    boosters: list = field(default_factory=list)  # one (multi-class) or one per label (None: no positives)

    @classmethod
    def refit_steps(cls, fold_steps: Sequence[int], fold_rows: Sequence[int], pool_rows: int, params: dict) -> int:
        """Boosting rounds see every row: the folds' mean number of rounds."""
        return max(1, int(round(np.mean(fold_steps))))

    def train(self, blocks: Blocks, y: np.ndarray, seed: int, stop: tuple[Blocks, np.ndarray] | None,
              steps: int | None, align: Align | None) -> None:
        _lgbm_fit(self, blocks, y, seed, stop, steps)

    def load(self, arch: dict, tensors: dict[str, np.ndarray], files: dict[str, str]) -> None:
        import lightgbm as lgb

        from phrasefuse.fuse.lgbm_check import BadModel, checked_model_text

        # The multi-class booster has exactly the rounds meta.json records; one-vs-rest boosters each
        # stopped at their own round (meta.json keeps their mean), so only their text can tell.
        iterations = self.steps if not self.task.multilabel and self.steps > 0 else None

        def booster(name: str, n_classes: int | None):  # checked first: LightGBM trusts its model text
            try:
                text = checked_model_text(files[name], sum(self.widths), n_classes, iterations)
            except BadModel as e:
                raise BadModel(f"{name}: {e}") from None
            return lgb.Booster(model_str=text)

        if self.task.multilabel:
            self.boosters = [booster(f"lgbm-{c:05d}.txt", None) if f"lgbm-{c:05d}.txt" in files
                             else None for c in range(self.task.num_classes)]
        else:
            self.boosters = [booster("lgbm.txt", self.task.num_classes)]

    def weights(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        if not self.task.multilabel:
            return {}, {"lgbm.txt": self.boosters[0].model_to_string()}
        return {}, {f"lgbm-{c:05d}.txt": b.model_to_string() for c, b in enumerate(self.boosters) if b is not None}

    def predict(self, blocks: Blocks) -> np.ndarray:
        x = self.transform.apply(blocks)
        n, C = len(x), self.task.num_classes
        if not self.task.multilabel:
            return np.asarray(self.boosters[0].predict(x), np.float32).reshape(n, C)
        out = np.zeros((n, C), np.float32)
        constants = dict(zip(self.params.get("constant_labels", []), self.params.get("constant_values", [])))
        for c, b in enumerate(self.boosters):
            out[:, c] = b.predict(x) if b is not None else constants.get(c, 0.0)
        return out


def _lgbm_params(head: LgbmHead, n_rows: int, seed: int, objective: str, contri: list[float]) -> dict:
    p = head.params
    # Few-shot sets: a leaf may hold as few as 2 rows, else no split is ever possible.
    min_leaf = int(max(2, min(p["min_data_in_leaf"], n_rows // max(4, 2 * head.task.num_classes))))
    params = {"objective": objective, "learning_rate": p["learning_rate"], "num_leaves": p["num_leaves"],
              "min_data_in_leaf": min_leaf, "min_sum_hessian_in_leaf": 1e-3, "lambda_l2": p["lambda_l2"],
              "feature_fraction": p["feature_fraction"], "max_bin": p["max_bin"], "feature_contri": contri,
              "num_threads": lgbm_threads(n_rows * sum(head.widths)),
              "seed": seed, "deterministic": True, "verbose": -1}
    if objective == "multiclass":
        params["num_class"] = head.task.num_classes
    return params


THREADS_ENV = "PHRASEFUSE_LGBM_THREADS"


def lgbm_threads(work: int) -> int:
    """LightGBM's thread count: $PHRASEFUSE_LGBM_THREADS when set (its sums, so its trees, depend on
    the thread count: a fixed value makes a head the same on any machine), else one thread for small
    work (thread start-up costs more than it saves) and the cores this process may use for the rest."""
    fixed = os.environ.get(THREADS_ENV, "").strip()
    if fixed:
        try:
            threads = int(fixed)
        except ValueError:
            threads = 0
        if threads < 1:
            raise BadInput(f"${THREADS_ENV}={fixed!r}: must be a whole number of threads, 1 or more (or unset)")
        return threads
    if work < SMALL_WORK:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _lgbm_fit(head: LgbmHead, blocks: Blocks, y: np.ndarray, seed: int, stop, steps: int | None) -> None:
    import lightgbm as lgb

    p = head.params
    x = head.transform.apply(blocks)
    contri = [float(s) for s, w in zip(head.scales, head.widths) for _ in range(w)]
    x_stop = head.transform.apply(stop[0]) if stop is not None else None
    rounds = int(p["max_rounds"]) if stop is not None else int(steps or p["default_rounds"])

    def train(labels: np.ndarray, objective: str, stop_labels: np.ndarray | None):
        params = _lgbm_params(head, len(x), seed, objective, contri)
        data = lgb.Dataset(x, labels, params={"max_bin": p["max_bin"], "verbose": -1}, free_raw_data=True)
        if stop is None:
            return lgb.train(params, data, num_boost_round=rounds)
        valid = lgb.Dataset(x_stop, stop_labels, reference=data)
        booster = lgb.train(params, data, num_boost_round=rounds, valid_sets=[valid],
                            callbacks=[lgb.early_stopping(int(p["early_stopping_rounds"]), verbose=False)])
        return booster

    if not head.task.multilabel:
        booster = train(y, "multiclass", stop[1] if stop is not None else None)
        head.boosters = [_trimmed(booster)]
        head.steps = head.boosters[0].current_iteration()
        return
    boosters, used = [], []
    for c in range(head.task.num_classes):
        if y[:, c].max() <= 0 or y[:, c].min() >= 1:  # nothing to separate: constant, no booster
            boosters.append(None)
            continue
        b = _trimmed(train(np.ascontiguousarray(y[:, c]), "binary",
                           np.ascontiguousarray(stop[1][:, c]) if stop is not None else None))
        boosters.append(b)
        used.append(b.current_iteration())
    head.boosters = boosters
    head.steps = int(round(np.mean(used))) if used else 0
    head.params = {**p, "constant_labels": [c for c, b in enumerate(boosters) if b is None],
                   "constant_values": [float(y[:, c].max()) if len(y) else 0.0
                                       for c, b in enumerate(boosters) if b is None]}


def _trimmed(booster):
    """The booster cut at its best iteration (early stopping), as a standalone model."""
    import lightgbm as lgb

    best = booster.best_iteration if booster.best_iteration and booster.best_iteration > 0 else None
    return lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
