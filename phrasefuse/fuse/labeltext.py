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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.errors import BadInput
from phrasefuse.manifests import read_table
from phrasefuse.manifests.tables import where
from phrasefuse.store import EmbeddingStore, describe_encoder, encoder_identity, l2_normalize

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


def label_texts(vocab: Sequence[str], descriptions: dict[str, str] | None, source: str | None = None) -> list[str]:
    """The text embedded for each label: its description, or its name without a table."""
    if descriptions is None:
        return [str(v) for v in vocab]
    missing = [v for v in vocab if v not in descriptions]
    if missing:
        raise BadInput(f"{source}: no description for label '{missing[0]}' ({len(missing)} of {len(vocab)} labels "
                       f"lack one); add a row (label, description) for each label")
    return [descriptions[v] for v in vocab]


@functools.lru_cache(maxsize=2)
def _text_encoder(spec: str):
    """Loaded once per process (a sentence-transformers model takes seconds to load)."""
    from phrasefuse.extract.encoders import load_text_encoder

    return load_text_encoder(spec, "auto")


def embed_texts(texts: Sequence[str], spec: str, expect: dict | None = None, what: str = "") -> tuple[np.ndarray, dict]:
    """Unit vectors of `texts` with the encoder `spec`; refuses an encoder whose identity
    differs from `expect` (the store the vectors will be compared with)."""
    encoder = _text_encoder(spec)
    if expect is not None and encoder_identity(encoder.identity) != encoder_identity(expect):
        raise BadInput(f"{what}: its vectors come from {describe_encoder(expect)}, but '{spec}' loads "
                       f"{describe_encoder(encoder.identity)}; label texts must be embedded by the same encoder")
    return encoder.encode(list(texts)), encoder.identity


def embed_for_store(texts: Sequence[str], store: EmbeddingStore) -> tuple[np.ndarray, dict]:
    """Embed label texts with the encoder that made `store` (from its meta.json)."""
    encoder = store.meta["encoder"]
    if store.meta.get("modality") == "image" and encoder.get("family") != "open_clip":
        raise BadInput(f"{store.path}: holds image vectors of {describe_encoder(encoder)}, which has no text "
                       f"tower; pass a text or phrases store")
    spec = encoder.get("spec")
    if not spec:
        raise BadInput(f"{store.meta_path}: no encoder spec recorded; re-create the store with 'phrasefuse'")
    return embed_texts(texts, spec, expect=encoder, what=str(store.path))


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
CALIBRATION_WEIGHTS = tuple(float(w) for w in np.r_[0.0, np.geomspace(0.1, 1000.0, 81)])
CLEAR_SE = 2.0  # "clearly positive": the held-out gain must exceed this many standard errors


@dataclass
class PriorFit:
    """The label prior's weight, fitted by likelihood on labelled rows that neither the prior nor
    the probabilities it multiplies were trained on, and the evidence for keeping it.

    fitted  the maximum-likelihood weight of softmax(log p + w * cos) on those rows
    gain    mean leave-one-out log-likelihood gain over weight 0 (each row scored with the
            weight fitted on the other rows), nats per row, and its standard error
    top1    mean top-1 change on those rows with the fitted weight (may not be negative)
    weight  the weight kept: `fitted` when the gain is clearly positive, else 0
    """

    weight: float
    fitted: float
    gain: float
    se: float
    top1: float
    rows: int
    base: str
    rule: str

    def as_dict(self) -> dict:
        return {"weight": self.weight, "fitted_weight": self.fitted, "heldout_gain_nats": self.gain,
                "heldout_gain_se": self.se, "top1_change": self.top1, "rows": self.rows, "against": self.base,
                "rule": self.rule}


def product_log_likelihood(log_base: np.ndarray, cos: np.ndarray, y: np.ndarray,
                           weights: Sequence[float]) -> np.ndarray:
    """(len(weights), n): log softmax(log_base + w * cos)[y] of each row under each weight."""
    rows = np.arange(len(y))
    out = np.empty((len(weights), len(y)))
    for g, w in enumerate(weights):  # a loop over ~80 weights; each step is whole-array
        z = log_base + w * cos.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        out[g] = z[rows, y] - np.log(np.exp(z).sum(axis=1))
    return out


def calibrate_prior(cos: np.ndarray, y: np.ndarray, probs: np.ndarray | None = None,
                    n_se: float = CLEAR_SE) -> PriorFit:
    """The label prior's weight on labelled rows `y` (rows of an unseen label, -1, left out).

    `probs`: the head's probabilities for those rows, from a head that did not train on them
    (out-of-fold or validation); None when there is none (1 shot per class): the prior is then
    weighed against the uniform guess. The weight is the likelihood fit of softmax(log probs +
    w * cos); it is kept only when its leave-one-out gain over weight 0 exceeds `n_se` standard
    errors and it does not lower top-1 on these rows; otherwise 0 (the prior is left out)."""
    known = y >= 0
    cos, y = cos[known].astype(np.float64), y[known]
    n, n_classes = len(y), cos.shape[1]
    against = "the uniform guess (no held-out head probabilities)" if probs is None else "the head alone"
    log_base = np.zeros_like(cos) if probs is None else np.log(np.clip(probs[known].astype(np.float64), 1e-12, None))
    if n < 2 or n_classes < 2:
        return PriorFit(0.0, 0.0, 0.0, 0.0, 0.0, n, against, "fewer than 2 labelled rows: prior left out")
    ll = product_log_likelihood(log_base, cos, y, CALIBRATION_WEIGHTS)
    total = ll.sum(axis=1)
    fitted = CALIBRATION_WEIGHTS[int(np.argmax(total))]
    loo = ll[np.argmax(total[:, None] - ll, axis=0), np.arange(n)]  # weight fitted without row i, scored on i
    gain = loo - ll[0]
    mean, se = float(gain.mean()), float(gain.std(ddof=1) / np.sqrt(n))
    before = np.argmax(log_base + 1e-9 * cos, axis=1) == y if probs is not None else np.full(n, 1.0 / n_classes)
    after = np.argmax(log_base + fitted * cos, axis=1) == y
    top1 = float(np.mean(after) - np.mean(before))
    kept = fitted > 0 and mean - n_se * se > 0 and top1 >= 0
    rule = (f"weight by likelihood on {n} labelled rows neither it nor the head trained on, against {against}; "
            f"kept only if its held-out gain ({mean:+.3f} nats/row, standard error {se:.3f}) exceeds {n_se:g} "
            f"standard errors and top-1 on those rows does not drop ({100 * top1:+.1f} pt)")
    return PriorFit(float(fitted) if kept else 0.0, float(fitted), mean, se, top1, n, against, rule)
