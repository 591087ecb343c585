"""`phrasefuse fuse train`: fit a head on cached embeddings, never knowingly worse than image-only.

1. Join the feature stores to the manifest on `id` (data.py); labels and vocabulary from
   the train split.
2. `fit_and_choose`: the image-only head and the fused head are both fitted; the trust of
   each text feature is tuned on validation (a scale from {0, .25, .5, 1} for linear and
   lgbm, on at most `tune_rows` training rows; learned gates + modality dropout for mlp).
   The fused head is kept only when it beats image-only on validation by more than one
   paired standard error (select.choose); otherwise the image-only head is saved, and the
   report says so.
3. Optional label prior (`--label-prior STORE`) with its weight tuned on validation, and
   multi-label decision thresholds (global, or per label tuned on validation).
4. Metrics on val and test for the saved head, the fused one and image-only; the head
   folder is written whole (artifact.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from phrasefuse.errors import BadInput
from phrasefuse.extract import DEFAULT_TEXT_MODEL
from phrasefuse.fuse import HEAD_KINDS
from phrasefuse.fuse.artifact import feature_record, format_metrics, save_head
from phrasefuse.fuse.data import (Blocks, Feature, Labels, build_vocab, encode_labels, image_feature,
                                  is_multilabel, label_column, label_values, load_blocks, require_rows,
                                  resolve_features, split_rows)
from phrasefuse.fuse.heads import Align, FittedHead, Task, head_params
from phrasefuse.fuse.labeltext import (PRIOR_WEIGHTS, apply_prior, calibrate_prior, cosine_scores, embed_for_store,
                                       embed_texts, label_texts, read_descriptions)
from phrasefuse.fuse.metrics import multiclass_metrics, multilabel_metrics, summary
from phrasefuse.fuse.pseudo import PER_LABEL as PSEUDO_PER_LABEL
from phrasefuse.fuse.pseudo import RULE as PSEUDO_RULE
from phrasefuse.fuse.pseudo import PseudoShots, load_pseudo_shots, with_pseudo_rows
from phrasefuse.fuse.select import (Scheme, Trial, Tuner, choose, holdout,
                                    stratified_subsample, tune_trust)
from phrasefuse.manifests import Manifest, read_manifest

DEFAULT_THRESHOLD = 0.3  # the tagging study's global threshold
TEXT_RULE = ("candidates ordered simplest first (image-only, then growing text trust); the simplest whose validation "
             "top-1 (or per-image AP) is within one paired standard error of the best is saved")


# ---------------------------------------------------------------- data


@dataclass
class Prepared:
    """A manifest joined with its feature stores: every row, every split."""

    manifest: Manifest
    features: list[Feature]
    roles: list[str]  # "image" for the image feature, "text" for the others
    blocks: Blocks
    labels: Labels
    rows: dict[str, np.ndarray]
    label_col: str

    @property
    def task(self) -> Task:
        return Task(self.labels.vocab, self.labels.multilabel)


def prepare(manifest_path: str | os.PathLike, feature_args: Sequence[str], label_col: str | None = None,
            multilabel: bool = False, need: Sequence[str] = ("train", "val")) -> Prepared:
    manifest = read_manifest(manifest_path)
    col = label_column(manifest, label_col)
    multi = is_multilabel(manifest, col, multilabel)
    rows = split_rows(manifest)
    require_rows(rows, need, manifest.source)
    values = label_values(manifest, col, multi, np.ones(len(manifest), bool))
    train = np.zeros(len(manifest), bool)
    train[rows["train"]] = True
    vocab = build_vocab(values, train, multi)
    if len(vocab) < (1 if multi else 2):
        raise BadInput(f"{manifest.source}: the train split has {len(vocab)} distinct value(s) in column '{col}'; "
                       f"a classifier needs at least two labels")
    labels = encode_labels(values, vocab, multi)
    features = resolve_features(feature_args)
    blocks = load_blocks(features, manifest.ids, manifest.source)
    for j, f in enumerate(features):
        if not blocks.present[rows["train"], j].any():
            raise BadInput(f"{f.path}: covers none of the {len(rows['train'])} train rows of {manifest.source}; "
                           f"extract it for this manifest")
    img = image_feature(features)
    roles = ["image" if j == img else "text" for j in range(len(features))]
    return Prepared(manifest, features, roles, blocks, labels, rows, col)


MIN_VAL_ROWS_PER_LABEL = 5  # below this, a validation choice rests on a handful of rows: said out loud


def _labels_of(labels: Labels, rows: np.ndarray) -> np.ndarray:
    """Rows per label among `rows` (multi-class: the known labels; multi-label: positives)."""
    y = labels.y[rows]
    if labels.multilabel:
        return (y > 0.5).sum(axis=0).astype(np.int64)
    return np.bincount(y[y >= 0], minlength=labels.num_classes)


def _examples(vocab: Sequence[str], counts: np.ndarray, which: np.ndarray) -> str:
    shown = ", ".join(f"'{vocab[c]}': {int(counts[c])}" for c in np.flatnonzero(which)[:3])
    return shown + (", ..." if which.sum() > 3 else "")


def data_warnings(labels: Labels, rows: dict[str, np.ndarray], splits: Sequence[str] = ("val", "test"),
                  check_val: bool = True) -> list[str]:
    """One line per statistical caveat of the splits: labels unseen in train (counted as
    errors), and a val split with fewer than MIN_VAL_ROWS_PER_LABEL rows of some label."""
    out = []
    for split in splits:
        n_unknown = int((labels.unknown[rows[split]] > 0).sum()) if len(rows[split]) else 0
        if n_unknown:
            out.append(f"{n_unknown} of {len(rows[split])} {split} rows carry a label the train split lacks; the "
                       f"head cannot predict it, so those rows count as errors")
    if check_val and len(rows["val"]):
        counts = _labels_of(labels, rows["val"])
        few = counts < MIN_VAL_ROWS_PER_LABEL
        if few.any():
            out.append(f"the val split has fewer than {MIN_VAL_ROWS_PER_LABEL} rows of {int(few.sum())} of "
                       f"{labels.num_classes} labels ({_examples(labels.vocab, counts, few)}): choices made on it "
                       f"(text trust, label prior weight, early stopping) rest on few rows")
    return out


def shots_warning(labels: Labels, train_rows: np.ndarray, k: int) -> str | None:
    """A line when some label has fewer than K train rows (--shots K then gives fewer)."""
    counts = _labels_of(labels, train_rows)
    short = counts < k
    if not short.any():
        return None
    return (f"--shots {k}: {int(short.sum())} of {labels.num_classes} labels have fewer than {k} train rows "
            f"({_examples(labels.vocab, counts, short)}); they get all they have, and the table reports the real "
            f"mean shots per label")


# ---------------------------------------------------------------- fit and choose


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
    if kind == "mlp":  # trust is learned (gates, modality dropout)
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


# ---------------------------------------------------------------- decisions


def evaluate_probs(probs: np.ndarray, labels: Labels, threshold=DEFAULT_THRESHOLD, max_labels=None) -> dict:
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


def choose_prior_weight(probs: np.ndarray | None, cos: np.ndarray, y: np.ndarray) -> tuple[float, dict]:
    """The label prior's weight on held-out rows (labeltext.calibrate_prior), and the record
    behind it: the fit, the rule, and each candidate weight's held-out top-1 and log-likelihood."""
    fit = calibrate_prior(probs, cos, y)
    record = fit.as_dict()
    known = y >= 0
    if probs is not None and known.any():
        candidates = sorted({*PRIOR_WEIGHTS, fit.fitted})
        p, c, yk = probs[known], cos[known], y[known]
        record["grid"] = [{"weight": float(w), "val_top1": float(np.mean(np.argmax(apply_prior(p, c, w), 1) == yk)),
                           "val_log_likelihood": float(np.mean(np.log(np.clip(
                               apply_prior(p, c, w)[np.arange(len(yk)), yk], 1e-12, None))))}
                          for w in candidates]
    else:
        record["grid"] = []
    return fit.weight, record


def pseudo_shots_for(prep: Prepared, index: str | os.PathLike, label_descriptions: str | None,
                     text_model: str = DEFAULT_TEXT_MODEL) -> PseudoShots:
    """The pseudo-shots of phrase `index` for this manifest's labels (names or descriptions),
    refused when the index's prototypes are not of the image feature's encoder."""
    img = image_feature(prep.features)
    if img is None:
        raise BadInput(f"--pseudo-shots {index}: adds image-space rows; pass an image feature")
    if prep.task.multilabel:
        raise BadInput("--pseudo-shots: works for single-label heads; drop it or --multilabel")
    descriptions = read_descriptions(label_descriptions) if label_descriptions else None
    return load_pseudo_shots(index, prep.features[img].store.meta["encoder"],
                             label_texts(prep.task.vocab, descriptions, label_descriptions), text_model)


# ---------------------------------------------------------------- the command


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
        lines = [f"fuse train: {self.kind} head, {self.task}, {self.labels} labels, rows {rows}",
                 f"  features: {feats}"]
        for split in ("val", "test"):
            for name, m in (self.metrics.get(split) or {}).items():
                if m:
                    lines.append(f"  {split:<4} {name:<13} {format_metrics(m)}")
        trust = ", ".join(f"{f['name']} {f['trust']:.2f}" for f in self.features if f.get("trust") is not None
                          and f["role"] != "image")
        lines.append(f"  saved: {self.saved} ({self.reason})" + (f"; text trust: {trust}" if trust else ""))
        if self.prior:
            scores = ", ".join(f"{g['weight']:.3g}: {100 * g['val_top1']:.1f}" for g in self.prior["grid"])
            lines.append(f"  label prior: {self.prior['store']['name']} ({self.prior['texts']}), weight "
                         f"{self.prior['weight']:.3g}" + (" (left out)" if self.prior["weight"] == 0 else "") +
                         f"; val top-1 by weight: {scores}")
            lines.append(f"    rule: {self.prior['rule']}")
        pseudo = self.selection.get("pseudo_shots")
        if pseudo:
            lines.append(f"  pseudo-shots: {pseudo['rows']} rows from {pseudo['index']}"
                         + (f" ({pseudo['per_label']} per label)" if pseudo["per_label"] else " (left out)")
                         + f": {pseudo['reason']}")
        lines.append(f"  -> {self.out} ({self.seconds:.1f} s)")
        return "\n".join(lines)


def train_head(manifest: str | os.PathLike, feature_args: Sequence[str], out: str | os.PathLike, *, kind: str,
               seed: int = 0, label_col: str | None = None, multilabel: bool = False,
               threshold: float = DEFAULT_THRESHOLD, per_label_thresholds: bool = False,
               max_labels: int | None = None, label_descriptions: str | None = None,
               align_descriptions: float = 0.0, text_model: str = DEFAULT_TEXT_MODEL,
               label_prior: str | None = None, tune_rows: int | None = None,
               params: dict | None = None, pseudo_shots: str | None = None) -> TrainReport:
    start = time.perf_counter()
    _check_options(kind, threshold, max_labels, align_descriptions, tune_rows)
    prep = prepare(manifest, feature_args, label_col, multilabel)
    task, labels, rows = prep.task, prep.labels, prep.rows
    warnings = data_warnings(labels, rows)
    if label_prior and task.multilabel:
        raise BadInput("--label-prior: works for single-label heads; drop it or --multilabel")
    descriptions = read_descriptions(label_descriptions) if label_descriptions else None
    align, align_meta = None, None
    if align_descriptions > 0:
        texts = label_texts(task.vocab, descriptions, label_descriptions)
        emb, identity = embed_texts(texts, text_model)
        align = Align(emb, float(align_descriptions))
        align_meta = {"weight": float(align_descriptions), "texts": "descriptions" if descriptions else "label names",
                      "descriptions": str(label_descriptions) if label_descriptions else None,
                      "text_encoder": identity}
    pseudo = pseudo_shots_for(prep, pseudo_shots, label_descriptions, text_model) if pseudo_shots else None
    hp = head_params(kind, {**(params or {}), "tune_rows": tune_rows})
    train_rows = rows["train"]
    tune = stratified_subsample(train_rows, labels.y, task.multilabel, int(hp.get("tune_rows") or len(train_rows)),
                                seed)
    outcome = fit_and_choose(kind, prep.blocks, labels.y, task, prep.roles, hp, seed, holdout(train_rows, rows["val"]),
                             holdout(tune, rows["val"]) if len(tune) < len(train_rows) else None, align, pseudo)

    def probs_of(head: FittedHead, which: list[int], split: str) -> np.ndarray:
        return head.predict(prep.blocks.take(rows[split]).select(which))

    # Label prior on top of the saved head, weight tuned on validation.
    prior_meta, prior_tensors, cos = None, {}, None
    if label_prior:
        prior_feature = resolve_features([label_prior])[0]
        texts = label_texts(task.vocab, descriptions, label_descriptions)
        label_emb, _ = embed_for_store(texts, prior_feature.store)
        pb = load_blocks([prior_feature], prep.manifest.ids, prep.manifest.source)
        cos = cosine_scores(pb.arrays[0], pb.present[:, 0], label_emb)
        weight, record = choose_prior_weight(probs_of(outcome.saved, outcome.saved_blocks, "val"),
                                             cos[rows["val"]], labels.y[rows["val"]])
        prior_meta = {"store": feature_record(prior_feature),
                      "texts": "descriptions" if descriptions else "label names", **record, "weight": weight}
        prior_tensors = {"prior.labels": label_emb.astype(np.float32)}

    def saved_probs(split: str) -> np.ndarray:
        p = probs_of(outcome.saved, outcome.saved_blocks, split)
        return apply_prior(p, cos[rows[split]], prior_meta["weight"]) if prior_meta else p

    decision = None
    thr: float | np.ndarray = threshold
    if task.multilabel:
        if per_label_thresholds:
            thr = tune_thresholds(saved_probs("val"), labels.y[rows["val"]], threshold)
        decision = {"threshold": threshold, "per_label": thr.tolist() if np.ndim(thr) else None,
                    "max_labels": max_labels}

    metrics: dict[str, dict] = {}
    for split in ("val", "test"):
        if len(rows[split]) == 0:
            metrics[split] = {}
            continue
        split_labels = labels.take(rows[split])
        entry = {"saved": summary(evaluate_probs(saved_probs(split), split_labels, thr, max_labels))}
        if prior_meta:  # the saved head without its label prior
            entry["without_prior"] = summary(evaluate_probs(probs_of(outcome.saved, outcome.saved_blocks, split),
                                                            split_labels, thr, max_labels))
        if outcome.fused is not None:
            entry["fused"] = summary(evaluate_probs(probs_of(outcome.fused, outcome.fused_blocks, split),
                                                    split_labels, thr, max_labels))
        if outcome.image_only is not None:
            entry["image_only"] = summary(evaluate_probs(probs_of(outcome.image_only, outcome.image_blocks, split),
                                                         split_labels, thr, max_labels))
        metrics[split] = entry

    trust = outcome.saved.trust()
    feature_meta = []
    for pos, j in enumerate(outcome.saved_blocks):
        f = prep.features[j]
        feature_meta.append({**feature_record(f), "role": prep.roles[j], "trust": trust[pos],
                             "coverage": float(prep.blocks.present[train_rows, j].mean())})
    tuning_log = [{"feature": prep.features[e["block"]].name, **{k: v for k, v in e.items() if k != "block"}}
                  for e in outcome.tuning]
    considered = [{"name": f.name, "role": prep.roles[j],
                   "trust": (outcome.fused.trust()[outcome.fused_blocks.index(j)]
                             if outcome.fused is not None and j in outcome.fused_blocks
                             else trust[outcome.saved_blocks.index(j)] if j in outcome.saved_blocks else 0.0),
                   "coverage": float(prep.blocks.present[train_rows, j].mean())}
                  for j, f in enumerate(prep.features)]
    selection = {"saved": outcome.choice, "reason": outcome.reason, "scheme": outcome.scheme, "rule": TEXT_RULE,
                 "tuning_rows": int(len(tune)), "validation": outcome.validation, "trust_tuning": tuning_log,
                 "features_considered": considered, "pseudo_shots": outcome.pseudo}
    tensors, files = outcome.saved.state()
    tensors.update(prior_tensors)
    seconds = time.perf_counter() - start
    meta = {"kind": kind, "task": "multilabel" if task.multilabel else "multiclass", "labels": task.vocab,
            "label_col": prep.label_col, "features": feature_meta, "architecture": outcome.saved.architecture(),
            "hyperparameters": hp, "seed": seed, "decision": decision, "prior": prior_meta, "alignment": align_meta,
            "selection": selection, "metrics": metrics, "manifest": str(manifest),
            "rows": {k: int(len(v)) for k, v in rows.items()}, "warnings": warnings,
            "train_seconds": round(seconds, 2)}
    save_head(out, meta, tensors, files)
    return TrainReport(str(out), kind, meta["task"], len(task.vocab), meta["rows"],
                       [{k: f[k] for k in ("name", "role", "trust", "coverage")} for f in considered],
                       outcome.choice, outcome.reason, metrics, selection, time.perf_counter() - start,
                       outcome.saved, warnings, prior_meta)


def _check_options(kind: str, threshold: float, max_labels: int | None, align: float,
                   tune_rows: int | None) -> None:
    if kind not in HEAD_KINDS:
        raise BadInput(f"--head {kind}: expected one of {', '.join(HEAD_KINDS)}")
    if not 0 < threshold < 1:
        raise BadInput(f"--threshold {threshold}: must be between 0 and 1")
    if max_labels is not None and max_labels < 1:
        raise BadInput(f"--max-labels {max_labels}: must be at least 1")
    if align < 0:
        raise BadInput(f"--align-descriptions {align}: must be 0 or more")
    if align > 0 and kind != "mlp":
        raise BadInput("--align-descriptions: aligns the mlp head's image projection; use --head mlp")
    if tune_rows is not None and tune_rows < 10:
        raise BadInput(f"--tune-rows {tune_rows}: must be at least 10")
