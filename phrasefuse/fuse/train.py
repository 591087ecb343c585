"""`phrasefuse fuse train`: fit a head on cached embeddings, never knowingly worse than image-only.

1. Join the feature stores to the manifest on `id` (data.py); labels and vocabulary from
   the train split. Validation (`select.training_schemes`, shared with `fuse ablate`) is the val
   split; without one, cross-validation within the training rows; with `--shots K`, K rows per
   class drawn as `fuse ablate --shots K` draws them for the seed, cross-validated within them.
2. `select.fit_and_choose`: the image-only head and the fused head are both fitted; the trust of
   each text feature is tuned on validation (a scale from {0, .25, .5, 1} for linear and
   lgbm, on at most `tune_rows` training rows; learned gates + modality dropout for mlp).
   The fused head is kept only when it beats image-only on validation by more than one
   paired standard error (select.choose); otherwise the image-only head is saved, and the
   report says so.
3. Optional label prior (`--label-prior NAME|STORE`) with its weight tuned on validation, and
   multi-label decision thresholds (global, or per label tuned on validation).
4. Metrics on val and test for the saved head, the fused one and image-only; the head
   folder is written whole (artifact.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from phrasefuse.errors import BadInput
from phrasefuse.extract import DEFAULT_TEXT_MODEL
from phrasefuse.fuse.artifact import feature_record, format_metrics, save_head
from phrasefuse.fuse.data import Feature, Prepared, data_warnings, prepare, shots_warning
from phrasefuse.fuse.heads import HEADS, Align, FittedHead, head_params
from phrasefuse.fuse.labeltext import (apply_prior, choose_prior_weight, embed_texts, label_prior_scores, label_texts,
                                       read_descriptions)
from phrasefuse.fuse.metrics import DEFAULT_THRESHOLD, evaluate_probs, summary, tune_thresholds
from phrasefuse.fuse.pseudo import pseudo_shots_for
from phrasefuse.fuse.select import TEXT_RULE, Outcome, Scheme, choose_label_prior, fit_and_choose, training_schemes


@dataclass
class TrainReport:
    out: str
    kind: str
    task: str
    labels: int
    rows: dict
    features: list[dict]
    saved: str
    reason: str
    metrics: dict
    selection: dict
    seconds: float
    fitted: FittedHead | None = None  # the saved head, in memory (not part of the report)
    warnings: list[str] = field(default_factory=list)
    prior: dict | None = None  # the label prior's store, weight and the scores it was chosen on

    def as_dict(self) -> dict:
        return {"head": self.out, "kind": self.kind, "task": self.task, "labels": self.labels, "rows": self.rows,
                "features": self.features, "saved": self.saved, "reason": self.reason, "metrics": self.metrics,
                "selection": self.selection, "prior": self.prior, "warnings": self.warnings,
                "seconds": round(self.seconds, 2)}

    def text(self) -> str:
        rows = " / ".join(f"{n} {k}" for k, n in self.rows.items())
        feats = ", ".join(f"{f['name']} ({f['role']}, {100 * f['coverage']:.0f}% present)" for f in self.features)
        used = self.selection.get("training_rows", self.rows.get("train"))
        rows += f" ({used} train rows used)" if used != self.rows.get("train") else ""
        lines = [f"fuse train: {self.kind} head, {self.task}, {self.labels} labels, rows {rows}",
                 f"  features: {feats}"]
        for split in ("val", "test"):
            for name, m in (self.metrics.get(split) or {}).items():
                if m:
                    lines.append(f"  {split:<4} {name:<13} {format_metrics(m)}")
        # One plain line per part of the saved head; the rules behind each choice (likelihood ratios,
        # shuffled priors, candidate scores) are in meta.json and --json, not here.
        lines.append(f"  saved: {self.saved_parts()}")
        lines.append(f"    why: {self.reason}" if self.saved == "single" else
                     f"    why: {self.saved} head kept: {self.reason}")
        lines.append(f"  chosen by: {self.selection['chosen_by']}")
        if self.prior:
            lines.append(f"  {self.prior_summary()}")
        pseudo = self.selection.get("pseudo_shots")
        if pseudo:
            lines.append(f"  pseudo-shots: {pseudo['rows']} rows from {pseudo['index']}"
                         + (f" ({pseudo['per_label']} per label)" if pseudo["per_label"] else " (left out)")
                         + f": {pseudo['reason']}")
        lines.append(f"  -> {self.out} ({self.seconds:.1f} s)")
        return "\n".join(lines)

    def saved_features(self) -> list[dict]:
        """The features the saved head reads: the image feature alone when image-only was kept (select:
        `[img]`), else every image feature and each text feature it trusts (trust 0 left it out)."""
        if self.saved == "image-only":
            return [next(f for f in self.features if f["role"] == "image")]
        return [f for f in self.features if f["role"] == "image" or (f.get("trust") or 0) > 0]

    def saved_parts(self) -> str:
        """Every part of the saved head (features, label prior and its weight, pseudo-shots), said as
        `inspect` says it from meta.json (artifact.saved_parts)."""
        from phrasefuse.fuse.artifact import saved_parts

        return saved_parts({"features": self.saved_features(), "prior": self.prior, "selection": self.selection})

    def prior_summary(self) -> str:
        """One plain line: the label prior kept or left out, and what it did to held-out top-1."""
        p = self.prior
        head = f"label prior: {p['store']['name']} ({p['texts']}), weight {p['weight']:.3g}"
        val = self.metrics.get("val") or {}
        with_it, without = (val.get("saved") or {}).get("top1"), (val.get("without_prior") or {}).get("top1")
        if not p["weight"]:
            return head + (f" (left out): it did not clearly help on {p['rows']} held-out rows" if p.get("rows")
                           else " (left out)")
        if with_it is None or without is None:
            return head + ", kept"
        verb = "raised" if with_it > without else "lowered" if with_it < without else "left"
        return head + (f", kept: it {verb} val top-1 from {100 * without:.1f} to {100 * with_it:.1f}"
                       if verb != "left" else f", kept: val top-1 unchanged ({100 * with_it:.1f})")


def train_head(manifest: str | os.PathLike, feature_args: Sequence[str], out: str | os.PathLike, *, kind: str,
               seed: int = 0, label_col: str | None = None, multilabel: bool = False,
               threshold: float = DEFAULT_THRESHOLD, per_label_thresholds: bool = False,
               max_labels: int | None = None, label_descriptions: str | None = None,
               align_descriptions: float = 0.0, text_model: str = DEFAULT_TEXT_MODEL,
               label_prior: str | None = None, tune_rows: int | None = None,
               params: dict | None = None, pseudo_shots: str | None = None,
               shots: int | None = None) -> TrainReport:
    """Fit, choose and save a head (module docstring); the report of what was saved and why.
    `shots`: train on K rows per class drawn with `seed` exactly as `fuse ablate --shots K` draws them
    (its row for that seed is this head's test score)."""
    start = time.perf_counter()
    _check_options(kind, threshold, max_labels, align_descriptions, tune_rows, shots)
    prep = prepare(manifest, feature_args, label_col, multilabel, need=("train",))
    task, labels, rows = prep.task, prep.labels, prep.rows
    # with --shots the val split chooses nothing (as in ablate): its caveats do not apply
    warnings = data_warnings(labels, rows, check_val=shots is None)
    warnings += [w for w in [shots_warning(labels, rows["train"], shots) if shots else None] if w]
    descriptions = read_descriptions(label_descriptions) if label_descriptions else None
    align, align_meta = _alignment(task.vocab, descriptions, label_descriptions, align_descriptions, text_model)
    pseudo = pseudo_shots_for(prep, pseudo_shots, label_descriptions, text_model) if pseudo_shots else None
    hp = head_params(kind, {**(params or {}), "tune_rows": tune_rows})
    scheme, tuning = training_schemes(rows["train"], rows["val"], labels.y, task.multilabel, hp.get("tune_rows"),
                                      seed, shots)
    # resolved (and refused) before any head is fitted
    prior_input = label_prior_scores(prep, label_prior, label_descriptions) if label_prior else None
    outcome = fit_and_choose(kind, prep.blocks, labels.y, task, prep.roles, hp, seed, scheme, tuning, align, pseudo)
    prior = _label_prior(prep, outcome, *prior_input, descriptions) if prior_input else None
    thr, decision = _decision(lambda: _held_out_probs(prep, outcome, prior), task.multilabel, threshold,
                              per_label_thresholds, max_labels)
    metrics = _metrics(prep, outcome, prior, thr, max_labels)
    feature_meta, considered = _feature_records(prep, outcome)
    selection = _selection(prep, outcome, scheme, tuning, considered, shots, seed)
    tensors, files = outcome.saved.state()
    if prior:
        tensors["prior.labels"] = prior.labels
    meta = {"kind": kind, "task": "multilabel" if task.multilabel else "multiclass", "labels": task.vocab,
            "label_col": prep.label_col, "features": feature_meta, "architecture": outcome.saved.architecture(),
            "hyperparameters": hp, "seed": seed, "decision": decision, "prior": prior.meta if prior else None,
            "alignment": align_meta, "selection": selection, "metrics": metrics, "manifest": str(manifest),
            "rows": {k: int(len(v)) for k, v in rows.items()}, "shots": shots, "warnings": warnings,
            "train_seconds": round(time.perf_counter() - start, 2)}
    save_head(out, meta, tensors, files)
    return TrainReport(str(out), kind, meta["task"], len(task.vocab), meta["rows"],
                       [{k: f[k] for k in ("name", "role", "trust", "coverage")} for f in considered],
                       outcome.choice, outcome.reason, metrics, selection, time.perf_counter() - start,
                       outcome.saved, warnings, meta["prior"])


# ---------------------------------------------------------------- the steps


def _alignment(vocab: Sequence[str], descriptions: dict[str, str] | None, label_descriptions: str | None,
               weight: float, text_model: str) -> tuple[Align | None, dict | None]:
    """The label texts the mlp's image projection is pulled toward (--align-descriptions), and
    their record; (None, None) without alignment."""
    if weight <= 0:
        return None, None
    emb, identity = embed_texts(label_texts(vocab, descriptions, label_descriptions), text_model)
    return Align(emb, float(weight)), {"weight": float(weight),
                                       "texts": "descriptions" if descriptions else "label names",
                                       "descriptions": str(label_descriptions) if label_descriptions else None,
                                       "text_encoder": identity}


@dataclass
class _Prior:
    """The label prior on top of the saved head."""

    meta: dict  # its store, texts, weight and the scores the weight was chosen on
    labels: np.ndarray  # (C, d) label text embeddings, saved with the head
    cos: np.ndarray  # (n, C) prior scores of every manifest row

    def on(self, probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return apply_prior(probs, self.cos[rows], self.meta["weight"])


def _label_prior(prep: Prepared, outcome: Outcome, cos: np.ndarray, label_emb: np.ndarray, feature: Feature,
                 descriptions: dict[str, str] | None) -> _Prior:
    """The label prior of `feature` (--label-prior), its weight chosen on the rows that chose the head:
    the saved head's probabilities on the val split, else (no val split, or --shots) the out-of-fold
    probabilities, or (1 example per class) the prior alone on the training rows: as `fuse ablate`."""
    if outcome.tuner is not None and outcome.tuner.scheme.holdout:  # the saved head itself, on the val split
        val, train = prep.rows["val"], prep.rows["train"]
        weight, record = choose_prior_weight(_probs(outcome.saved, outcome.saved_blocks, prep, "val"), cos[val],
                                             prep.labels.y[val], trained=(cos[train], prep.labels.y[train]))
    else:
        weight, record = choose_label_prior(outcome, cos, prep.labels.y)
    meta = {"store": feature_record(feature), "texts": "descriptions" if descriptions else "label names", **record,
            "weight": weight}
    return _Prior(meta, label_emb.astype(np.float32), cos)


def _selection(prep: Prepared, outcome: Outcome, scheme: Scheme, tuning: Scheme | None, considered: list[dict],
               shots: int | None, seed: int) -> dict:
    """meta.json's `selection`: what was saved and why, and which rows chose it (`chosen_by`)."""
    tuning_log = [{"feature": prep.features[e["block"]].name, **{k: v for k, v in e.items() if k != "block"}}
                  for e in outcome.tuning]
    if shots is not None:
        chosen_by = (f"{shots} labelled rows per class drawn with seed {seed} (as `fuse ablate --shots {shots}`), "
                     f"{scheme.describe()}; the val split is not used")
    elif scheme.holdout:
        chosen_by = "the val split"
    else:
        chosen_by = f"{scheme.describe()}, as `fuse ablate --shots` cross-validates"
    return {"saved": outcome.choice, "reason": outcome.reason, "scheme": outcome.scheme, "chosen_by": chosen_by,
            "rule": TEXT_RULE, "training_rows": int(len(scheme.pool)),
            "tuning_rows": int(len(tuning.pool) if tuning else len(scheme.pool)),
            "validation": outcome.validation, "trust_tuning": tuning_log, "features_considered": considered,
            "pseudo_shots": outcome.pseudo}


def _probs(head: FittedHead, which: list[int], prep: Prepared, split: str) -> np.ndarray:
    return head.predict(prep.blocks.take(prep.rows[split]).select(which))


def _saved_probs(prep: Prepared, outcome: Outcome, prior: _Prior | None, split: str) -> np.ndarray:
    """The saved head's probabilities on `split`, with its label prior."""
    probs = _probs(outcome.saved, outcome.saved_blocks, prep, split)
    return prior.on(probs, prep.rows[split]) if prior else probs


def _held_out_probs(prep: Prepared, outcome: Outcome, prior: _Prior | None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of the rows that chose the saved head: the val split, else out of fold."""
    if outcome.tuner is not None and outcome.tuner.scheme.holdout:
        return _saved_probs(prep, outcome, prior, "val"), prep.labels.y[prep.rows["val"]]
    trial = outcome.held_out()
    if trial is None:
        raise BadInput("--per-label-thresholds: tuned on held-out rows, and 1 example per label holds none out; "
                       "drop it (the global --threshold applies) or add rows")
    probs = prior.on(trial.probs, trial.rows) if prior else trial.probs
    return probs, prep.labels.y[trial.rows]


def _decision(held_out: Callable[[], tuple[np.ndarray, np.ndarray]], multilabel: bool, threshold: float,
              per_label: bool, max_labels: int | None) -> tuple[float | np.ndarray, dict | None]:
    """Multi-label: the decision threshold(s) (per label: tuned on held-out rows) and their record."""
    if not multilabel:
        return threshold, None
    thr = tune_thresholds(*held_out(), threshold) if per_label else threshold
    return thr, {"threshold": threshold, "per_label": thr.tolist() if np.ndim(thr) else None,
                 "max_labels": max_labels}


def _metrics(prep: Prepared, outcome: Outcome, prior: _Prior | None, thr: float | np.ndarray,
             max_labels: int | None) -> dict[str, dict]:
    """Per split (val, test): the saved head's metrics, and those it was chosen against."""
    metrics: dict[str, dict] = {}
    for split in ("val", "test"):
        if len(prep.rows[split]) == 0:
            metrics[split] = {}
            continue
        labels = prep.labels.take(prep.rows[split])

        def scored(probs: np.ndarray) -> dict:
            return summary(evaluate_probs(probs, labels, thr, max_labels))

        entry = {"saved": scored(_saved_probs(prep, outcome, prior, split))}
        if prior:  # the saved head without its label prior
            entry["without_prior"] = scored(_probs(outcome.saved, outcome.saved_blocks, prep, split))
        if outcome.fused is not None:
            entry["fused"] = scored(_probs(outcome.fused, outcome.fused_blocks, prep, split))
        if outcome.image_only is not None:
            entry["image_only"] = scored(_probs(outcome.image_only, outcome.image_blocks, prep, split))
        metrics[split] = entry
    return metrics


def _feature_records(prep: Prepared, outcome: Outcome) -> tuple[list[dict], list[dict]]:
    """(the saved head's features, as meta.json records them; every feature considered, with its trust)."""
    train_rows = prep.rows["train"]
    trust = outcome.saved.trust()
    saved = [{**feature_record(prep.features[j]), "role": prep.roles[j], "trust": trust[pos],
              "coverage": float(prep.blocks.present[train_rows, j].mean())}
             for pos, j in enumerate(outcome.saved_blocks)]
    considered = [{"name": f.name, "role": prep.roles[j],
                   "trust": (outcome.fused.trust()[outcome.fused_blocks.index(j)]
                             if outcome.fused is not None and j in outcome.fused_blocks
                             else trust[outcome.saved_blocks.index(j)] if j in outcome.saved_blocks else 0.0),
                   "coverage": float(prep.blocks.present[train_rows, j].mean())}
                  for j, f in enumerate(prep.features)]
    return saved, considered


def _check_options(kind: str, threshold: float, max_labels: int | None, align: float,
                   tune_rows: int | None, shots: int | None = None) -> None:
    if kind not in HEADS:
        raise BadInput(f"--head {kind}: expected one of {', '.join(HEADS)}")
    if shots is not None and shots < 1:
        raise BadInput(f"--shots {shots}: must be at least 1 labelled row per class")
    if not 0 < threshold < 1:
        raise BadInput(f"--threshold {threshold}: must be between 0 and 1")
    if max_labels is not None and max_labels < 1:
        raise BadInput(f"--max-labels {max_labels}: must be at least 1")
    if align < 0:
        raise BadInput(f"--align-descriptions {align}: must be 0 or more")
    if align > 0 and not HEADS[kind].aligns_descriptions:
        aligning = " or ".join(f"--head {k}" for k, c in HEADS.items() if c.aligns_descriptions)
        raise BadInput(f"--align-descriptions: aligns the mlp head's image projection; use {aligning}")
    if tune_rows is not None and tune_rows < 10:
        raise BadInput(f"--tune-rows {tune_rows}: must be at least 10")
