"""Label text: label names or descriptions, embedded once with a text encoder.

Two uses:
  alignment   (mlp `--align-descriptions W`) frozen description embeddings that the image
              projection is pulled toward (InfoNCE);
  label prior cos(text feature of an image, label text embedding) is a score per class that
              needs no labelled image: `fuse zeroshot` evaluates it alone, `fuse train
              --label-prior STORE` adds it, weighted (weight tuned on validation), to the
              head's log-probabilities. The label texts must be embedded by the same encoder
              as the store's vectors (checked on the encoder identity).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.errors import BadInput
from phrasefuse.manifests import read_table
from phrasefuse.manifests.tables import where
from phrasefuse.fuse.data import Feature, Prepared, load_blocks, resolve_features
from phrasefuse.store import EmbeddingStore, describe_encoder, l2_normalize

PRIOR_WEIGHTS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


def read_descriptions(path: str | os.PathLike) -> dict[str, str]:
    """A label-descriptions table (`label`, `description`) as {label: description}."""
    table = read_table(path, what="label descriptions table")
    for col in ("label", "description"):
        if col not in table.column_names:
            cols = ", ".join(c for c in table.column_names if not c.startswith("_"))
            raise BadInput(f"{path}: no '{col}' column (columns: {cols}); a label-descriptions table has "
                           f"'label' and 'description'")
    labels = pc.utf8_trim_whitespace(pc.cast(table["label"], pa.string())).combine_chunks()
    texts = pc.utf8_trim_whitespace(pc.cast(table["description"], pa.string())).combine_chunks()
    for name, col in (("label", labels), ("description", texts)):
        empty = pc.fill_null(pc.equal(pc.utf8_length(col), 0), True).to_numpy(zero_copy_only=False)
        if empty.any():
            raise BadInput(f"{where(table, int(np.argmax(empty)))}: column '{name}' is empty; fill it or drop the row")
    values = labels.to_pylist()
    seen: dict[str, int] = {}
    for i, label in enumerate(values):
        if label in seen:
            raise BadInput(f"{where(table, i)}: label '{label}' is described twice (first at "
                           f"{where(table, seen[label])}); keep one description per label")
        seen[label] = i
    return dict(zip(values, texts.to_pylist()))


# A label name said several ways; their embeddings are averaged (name_prompts, embed_texts).
NAME_TEMPLATES = ("{}", "a photo of a {}", "a {}", "a picture of a {}")
LabelText = Union[str, Sequence[str]]  # one text, or several whose embeddings are averaged


def label_words(name: str) -> str:
    """A label name as words: `car_side` -> `car side`, `FacesEasy` -> `faces easy`."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(name))
    return " ".join(re.sub(r"[_\-./]+", " ", spaced).split()).lower() or str(name)


def name_prompts(name: str) -> list[str]:
    """The label name in words, in each of NAME_TEMPLATES."""
    return [t.format(label_words(name)) for t in NAME_TEMPLATES]


def label_texts(vocab: Sequence[str], descriptions: dict[str, str] | None, source: str | None = None,
                prompts: bool = False) -> list[LabelText]:
    """The text embedded for each label: its description, or its name without a table (with
    `prompts`: the name in words in several templates, embeddings averaged by embed_texts)."""
    if descriptions is None:
        return [name_prompts(v) for v in vocab] if prompts else [str(v) for v in vocab]
    missing = [v for v in vocab if v not in descriptions]
    if missing:
        raise BadInput(f"{source}: no description for label '{missing[0]}' ({len(missing)} of {len(vocab)} labels "
                       f"lack one); add a row (label, description) for each label")
    return [descriptions[v] for v in vocab]


@functools.lru_cache(maxsize=2)
def _text_encoder(spec: str, device: str = "auto"):
    """Loaded once per process (a sentence-transformers model takes seconds to load)."""
    from phrasefuse.extract.encoders import load_text_encoder

    return load_text_encoder(spec, device)


def embed_texts(texts: Sequence[LabelText], spec: str) -> tuple[np.ndarray, dict]:
    """(unit vectors of `texts` with the encoder `spec`, its identity)."""
    encoder = _text_encoder(spec)
    return encode_label_texts(encoder, texts), encoder.identity


def encode_label_texts(encoder, texts: Sequence[LabelText]) -> np.ndarray:
    """Unit vectors of `texts`; an entry that is a list of texts (a label's templates) gives the
    re-normalised mean of their vectors."""
    groups = [[t] if isinstance(t, str) else list(t) for t in texts]
    if all(len(g) == 1 for g in groups):
        return encoder.encode([g[0] for g in groups])
    return mean_per_group(encoder.encode([t for g in groups for t in g]), [len(g) for g in groups])


def mean_per_group(vectors: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """(len(sizes), d): the re-normalised mean of each consecutive group of unit `vectors`."""
    group = np.repeat(np.arange(len(sizes)), sizes)
    sums = np.zeros((len(sizes), vectors.shape[1]), np.float64)
    np.add.at(sums, group, l2_normalize(vectors).astype(np.float64))
    return l2_normalize(sums).astype(np.float32)


def embed_for_store(texts: Sequence[LabelText], store: EmbeddingStore) -> tuple[np.ndarray, dict]:
    """Embed label texts with the encoder that made `store` (from its meta.json), checked to be the same model."""
    from phrasefuse.extract.encoders import family_of
    from phrasefuse.extract.recorded import load_recorded_encoder

    encoder = store.meta["encoder"]
    family = family_of(encoder.get("family"))
    if store.meta.get("modality") == "image" and not (family and family.shares_image_text_space):
        raise BadInput(f"{store.path}: holds image vectors of {describe_encoder(encoder)}, which has no text "
                       f"tower; pass a text or phrases store")
    loaded = load_recorded_encoder(store.meta, "text", folder=store.path, kind="store", what="label texts: ",
                                   load=_text_encoder, fix="label texts must be embedded by the same encoder: "
                                   "restore those weights, or re-create the store with 'phrasefuse'")
    return encode_label_texts(loaded, texts), loaded.identity


def cosine_scores(text: np.ndarray, present: np.ndarray, label_emb: np.ndarray) -> np.ndarray:
    """(n, C) cosine between each row's text vector and each label text; 0 for rows without text."""
    scores = l2_normalize(text) @ l2_normalize(label_emb).T
    scores[~present] = 0.0
    return scores.astype(np.float32)


def apply_prior(probs: np.ndarray, cos: np.ndarray, weight: float) -> np.ndarray:
    """softmax(log p + weight * cos): the head's probabilities re-weighted by the label prior."""
    if weight == 0:
        return probs
    logits = np.log(np.clip(probs, 1e-12, None)) + weight * cos
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- calibrating the prior on labelled rows

# The prior's weight: a fine log grid from almost flat to almost one-hot (cosines lie in [-1, 1]).
CALIBRATION_WEIGHTS = tuple(float(w) for w in np.r_[0.0, np.geomspace(0.1, 1000.0, 29)])
# "Clearly positive": the likelihood ratio of the weight against weight 0 must beat that of
# every one of PERMUTATIONS priors shuffled across the rows (a permutation test at 1/20 = 5%:
# exact at any number of rows, where the chi-square approximation is not), and the
# chi-square(1) 95% quantile.
PERMUTATIONS = 19
LR_CRITICAL = 3.841


@dataclass
class PriorFit:
    """The label prior's weight, fitted by likelihood on held-out rows: rows that neither the
    prior (it trains on nothing) nor the head whose probabilities it multiplies trained on.

    fitted  the maximum-likelihood w / a of softmax(a * log p + w * cos) on those rows, i.e. the
            weight on the head's own log-probabilities (apply_prior)
    lr      the likelihood-ratio statistic 2 * (log L(a, w) - max_a log L(a, 0))
    top1    top-1 change on those rows with the fitted weight
    weight  the weight kept: `fitted` when the test passes (calibrate_prior), else 0
    """

    weight: float
    fitted: float
    lr: float
    top1: float
    rows: int
    rule: str

    def as_dict(self) -> dict:
        return {"weight": self.weight, "fitted_weight": self.fitted, "likelihood_ratio": self.lr,
                "top1_change": self.top1, "rows": self.rows, "rule": self.rule}


# The head's own sharpness, fitted beside the prior's weight: a miscalibrated (e.g. overconfident)
# head would otherwise let any extra term, even noise, "improve" the likelihood by blurring it.
HEAD_SHARPNESS = tuple(float(a) for a in np.geomspace(0.05, 4.0, 11))


def product_log_likelihood(log_base: np.ndarray, cos: np.ndarray, y: np.ndarray, sharpness: Sequence[float],
                           weights: Sequence[float]) -> np.ndarray:
    """(len(sharpness), len(weights)): total log softmax(a * log_base + w * cos)[y]."""
    rows = np.arange(len(y))
    out = np.empty((len(sharpness), len(weights)))
    for i, a in enumerate(sharpness):  # ~11 x 30 whole-array steps
        for g, w in enumerate(weights):
            z = a * log_base + w * cos
            z -= z.max(axis=1, keepdims=True)
            out[i, g] = float((z[rows, y] - np.log(np.exp(z).sum(axis=1))).sum())
    return out


def calibrate_prior(probs: np.ndarray | None, cos: np.ndarray, y: np.ndarray) -> PriorFit:
    """The label prior's weight on held-out labelled rows `y` (rows of an unseen label, -1, are
    left out), given the head's probabilities `probs` for them (out-of-fold or validation).

    `probs` None: there is no held-out head (1 labelled example per class); `cos` and `y` are then
    the shots themselves, which the prior never trained on (calibrate_prior_on_shots). Otherwise
    softmax(a * log probs + w * cos) is fitted by likelihood (a: the head's sharpness, fitted with
    and without the prior), and w / a is kept only when a likelihood-ratio test of w against w = 0
    is significant at 5% and top-1 on those rows does not drop by more than one standard error."""
    if probs is None:
        return calibrate_prior_on_shots(cos, y)
    known = y >= 0
    cos, y = cos[known].astype(np.float64), y[known]
    log_base = np.log(np.clip(probs[known].astype(np.float64), 1e-12, None))
    n = len(y)
    if n < 2:
        return PriorFit(0.0, 0.0, 0.0, 0.0, n, "fewer than 2 held-out rows: prior left out")
    fitted, lr = _fit_weight(log_base, cos, y)
    critical = _permutation_critical(lambda c: _fit_weight(log_base, c, y)[1], cos, lr)
    change = (np.argmax(log_base + fitted * cos, axis=1) == y).astype(float) - \
        (np.argmax(log_base, axis=1) == y).astype(float)
    top1, se = float(change.mean()), float(change.std(ddof=1) / np.sqrt(n))
    kept = fitted > 0 and lr > critical and top1 >= -se
    rule = (f"weight by likelihood of the head's held-out probabilities (their sharpness fitted too) times the prior "
            f"on {n} rows neither trained on; kept only if its likelihood ratio against weight 0 beats those of "
            f"{PERMUTATIONS} priors shuffled across the rows and the chi-square 5% level (2 dlogL = {lr:.2f} vs "
            f"{critical:.2f}) and top-1 on those rows does not drop by more than one standard error "
            f"({100 * top1:+.1f} pt, se {100 * se:.1f})")
    return PriorFit(float(fitted) if kept else 0.0, float(fitted), lr, top1, n, rule)


def calibrate_prior_on_shots(cos: np.ndarray, y: np.ndarray) -> PriorFit:
    """The label prior's weight from the labelled shots alone, for when no head can be scored on
    a held-out row (1 shot per class). The prior never trained on the shots, so its own
    temperature b (softmax(b * cos)) is fitted on them by likelihood and kept, as the weight on
    the head's log-probabilities, only when its likelihood ratio against b = 0 (uniform) beats
    those of PERMUTATIONS priors shuffled across the shots and the chi-square 5% level. The head's
    probabilities are taken as they are: a head fitted to one example per class is overconfident,
    so the prior's weight errs small (docs/method.md: CIFAR-10 and weak-prior checks)."""
    fit = _prior_alone(cos, y)
    if fit is None:
        return PriorFit(0.0, 0.0, 0.0, 0.0, int((y >= 0).sum()), NO_SHOTS_GIVEN)
    fitted, lr, critical, top1, n = fit
    rule = (f"no head can be scored on a held-out example (1 per class), but the prior never trained on the shots: "
            f"its temperature fitted by likelihood on the {n} shots (prior alone, top-1 {100 * top1:.1f}%, chance "
            f"{100 / cos.shape[1]:.1f}%), added to the head's log-probabilities as they are; kept only if its "
            f"likelihood ratio against a uniform prior beats those of {PERMUTATIONS} priors shuffled across the shots "
            f"and the chi-square 5% level (2 dlogL = {lr:.2f} vs {critical:.2f})")
    return PriorFit(fitted if lr > critical else 0.0, fitted, lr, top1, n, rule)


# Rows the prior alone is fitted on when the held-out rows are inconclusive: enough for the
# permutation test to be decisive, few enough that 20 fits stay cheap at any training-set size.
PRIOR_ALONE_MAX_ROWS = 2000


def calibrate_prior_on_training_rows(held_out: PriorFit, probs: np.ndarray, cos: np.ndarray, y: np.ndarray,
                                     train_cos: np.ndarray, train_y: np.ndarray) -> PriorFit:
    """The second look, when the held-out rows (`probs`, `cos`, `y`) were inconclusive (`held_out`
    kept no weight): held-out rows are few (1 per class per fold at 5 shots), the head's training
    rows are all the labelled rows, and the prior never trained on those either. Its temperature
    is fitted on them as at 1 shot (calibrate_prior_on_shots: likelihood, permutation test) and
    kept unless the held-out rows show a cost: top-1 there dropping at all with it (the prior was
    not shown to help this head, so no loss is traded for it)."""
    if held_out.weight > 0 or probs is None:
        return held_out
    take = _at_most(len(train_y), PRIOR_ALONE_MAX_ROWS)
    fit = _prior_alone(train_cos[take], train_y[take])
    if fit is None or fit[1] <= fit[2]:
        detail = "" if fit is None else f" (2 dlogL = {fit[1]:.2f} vs {fit[2]:.2f})"
        return PriorFit(0.0, held_out.fitted, held_out.lr, held_out.top1, held_out.rows, held_out.rule +
                        f"; the prior alone on the head's training rows did not pass its own test either{detail}")
    fitted, lr, critical, alone_top1, n = fit
    known = y >= 0
    log_base = np.log(np.clip(probs[known].astype(np.float64), 1e-12, None))
    change = (np.argmax(log_base + fitted * cos[known], axis=1) == y[known]).astype(float) - \
        (np.argmax(log_base, axis=1) == y[known]).astype(float)
    top1 = float(change.mean()) if len(change) else 0.0
    se = float(change.std(ddof=1) / np.sqrt(len(change))) if len(change) > 1 else 0.0
    kept = top1 >= 0
    rule = (f"{held_out.rule}; inconclusive there, so the prior alone (it never trained on the head's training rows "
            f"either) had its temperature fitted by likelihood on {n} of them (prior alone, top-1 "
            f"{100 * alone_top1:.1f}%; 2 dlogL = {lr:.2f} vs {critical:.2f} for {PERMUTATIONS} shuffled priors and "
            f"the chi-square 5% level), added to the head's log-probabilities, kept unless top-1 on the held-out "
            f"rows drops with it ({100 * top1:+.1f} pt, se {100 * se:.1f})")
    return PriorFit(fitted if kept else 0.0, fitted, lr, top1, n, rule)


def _prior_alone(cos: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float, int] | None:
    """(b, likelihood ratio, its permutation-test critical value, top-1, rows) of the prior
    softmax(b * cos) fitted by likelihood on labelled rows it never trained on; None with fewer
    than 2 rows or classes."""
    known = y >= 0
    cos, y = cos[known].astype(np.float64), y[known]
    if len(y) < 2 or cos.shape[1] < 2:
        return None
    fitted, lr = _fit_temperature(cos, y)
    critical = _permutation_critical(lambda c: _fit_temperature(c, y)[1], cos, lr)
    return float(fitted), lr, critical, float(np.mean(np.argmax(cos, axis=1) == y)), len(y)


def _at_most(n: int, limit: int) -> np.ndarray:
    """Row positions: all n, or `limit` of them drawn without replacement (fixed seed), in order."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, limit, replace=False))


def _permutation_critical(statistic, cos: np.ndarray, observed: float) -> float:
    """The largest of the chi-square(1) 5% level and `statistic` of PERMUTATIONS row shuffles of
    `cos`; stops at the first shuffle that does as well as `observed` (the test has failed)."""
    critical = LR_CRITICAL
    rng = np.random.default_rng(0)
    for _ in range(PERMUTATIONS if observed > LR_CRITICAL else 0):
        critical = max(critical, statistic(cos[rng.permutation(len(cos))]))
        if critical >= observed:
            break
    return critical


def _fit_temperature(cos: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(b at the likelihood maximum of softmax(b * cos), likelihood-ratio statistic against b = 0)."""
    total = product_log_likelihood(np.zeros_like(cos), cos, y, (1.0,), CALIBRATION_WEIGHTS)[0]
    g = int(np.argmax(total))
    return CALIBRATION_WEIGHTS[g], float(2 * (total[g] - total[0]))


def _fit_weight(log_base: np.ndarray, cos: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(w / a at the likelihood maximum, likelihood-ratio statistic against w = 0)."""
    total = product_log_likelihood(log_base, cos, y, HEAD_SHARPNESS, CALIBRATION_WEIGHTS)
    i, g = np.unravel_index(int(np.argmax(total)), total.shape)
    return CALIBRATION_WEIGHTS[g] / HEAD_SHARPNESS[i], float(2 * (total[i, g] - total[:, 0].max()))


NO_SHOTS_GIVEN = ("1 labelled example per class and no shots given to fit the prior on (fewer than 2 rows): no head "
                  "can be scored on a held-out example, so nothing shows that the prior helps it; prior left out")


# ---------------------------------------------------------------- the label prior of a head


def prior_scores(store: EmbeddingStore, vectors: np.ndarray, present: np.ndarray, vocab: Sequence[str],
                 descriptions: dict[str, str] | None, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The label prior's scores: (n, C) cosine of each row's vector of `store` to each label's
    text (its description, or its name) embedded by the store's encoder; and those label
    embeddings (C, d), which a head saves to score new rows."""
    label_emb, _ = embed_for_store(label_texts(vocab, descriptions, source, prompts=True), store)
    return cosine_scores(vectors, present, label_emb), label_emb


def choose_prior_weight(probs: np.ndarray | None, cos: np.ndarray, y: np.ndarray,
                        trained: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, dict]:
    """The label prior's weight on held-out rows (calibrate_prior; when they are inconclusive and
    `trained` gives the scores and labels of the head's training rows,
    calibrate_prior_on_training_rows), and the record behind it: the fit, the rule, and each
    candidate weight's held-out top-1 and log-likelihood."""
    fit = calibrate_prior(probs, cos, y)
    if trained is not None:
        fit = calibrate_prior_on_training_rows(fit, probs, cos, y, *trained)
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


def label_prior_scores(prep: Prepared, value: str,
                       label_descriptions: str | None) -> tuple[np.ndarray, np.ndarray, Feature]:
    """The label prior of `value` (--label-prior, in `fuse train` and `fuse ablate` alike): a feature
    name among prep's features, or a store path (one of the features, or another store joined to the
    manifest): ((n, C) scores, (C, d) label text embeddings, the feature)."""
    if prep.task.multilabel:
        raise BadInput("--label-prior: works for single-label heads; drop it or --multilabel")
    names = [f.name for f in prep.features]
    if value in names:
        j = names.index(value)
    elif os.path.isdir(value):
        feature = resolve_features([value])[0]
        same = [j for j, f in enumerate(prep.features) if f.path.resolve() == feature.path.resolve()]
        j = same[0] if same else None
    else:
        raise BadInput(f"--label-prior {value}: neither one of the features ({', '.join(names)}) nor an embedding "
                       f"store folder; pass a feature name or a store path")
    if j is not None:
        feature, vectors, present = prep.features[j], prep.blocks.arrays[j], prep.blocks.present[:, j]
    else:
        loaded = load_blocks([feature], prep.manifest.ids, prep.manifest.source)
        vectors, present = loaded.arrays[0], loaded.present[:, 0]
    descriptions = read_descriptions(label_descriptions) if label_descriptions else None
    cos, label_emb = prior_scores(feature.store, vectors, present, prep.task.vocab, descriptions, label_descriptions)
    return cos, label_emb, feature
