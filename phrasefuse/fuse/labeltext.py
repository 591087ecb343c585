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

# The prior's sharpness: a fine log grid from almost flat to almost one-hot (cosines lie in [-1, 1]).
CALIBRATION_WEIGHTS = tuple(float(w) for w in np.r_[0.0, np.geomspace(0.1, 1000.0, 81)])
CLEAR_SE = 2.0  # "clearly positive": the held-out gain must exceed this many standard errors


@dataclass
class PriorFit:
    """The label prior calibrated on labelled rows it never trained on (the prior trains on nothing).

    weight  the weight kept: the maximum-likelihood sharpness of softmax(weight * cos), or 0
    gain    mean leave-one-out log-likelihood gain over the uniform guess, nats per row (each
            row scored with the weight fitted on the other rows), and its standard error
    """

    weight: float
    fitted: float
    gain: float
    se: float
    rows: int
    top1: float
    rule: str

    def as_dict(self) -> dict:
        return {"weight": self.weight, "fitted_weight": self.fitted, "heldout_gain_nats": self.gain,
                "heldout_gain_se": self.se, "rows": self.rows, "prior_top1": self.top1, "rule": self.rule}


def prior_log_likelihood(cos: np.ndarray, y: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """(len(weights), n): log softmax(w * cos)[y] of each row under each weight."""
    w = np.asarray(weights, np.float64)[:, None, None]
    z = w * cos[None].astype(np.float64)
    z -= z.max(axis=2, keepdims=True)
    return z[:, np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=2))


def calibrate_prior(cos: np.ndarray, y: np.ndarray, n_se: float = CLEAR_SE) -> PriorFit:
    """The prior's weight by likelihood on the labelled rows `y` (rows of an unseen label, -1,
    are left out), kept only when its leave-one-out gain over the uniform guess is clearly
    positive: more than `n_se` standard errors above 0. Otherwise weight 0 (image-only)."""
    known = y >= 0
    cos, y = cos[known], y[known]
    n, n_classes = len(y), cos.shape[1] if cos.ndim == 2 else 0
    if n < 2 or n_classes < 2:
        return PriorFit(0.0, 0.0, 0.0, 0.0, n, float("nan"), "fewer than 2 labelled rows: prior left out")
    ll = prior_log_likelihood(cos, y, CALIBRATION_WEIGHTS)
    total = ll.sum(axis=1)
    fitted = CALIBRATION_WEIGHTS[int(np.argmax(total))]
    loo = ll[np.argmax(total[:, None] - ll, axis=0), np.arange(n)]  # weight fitted without row i, scored on i
    gain = loo + np.log(n_classes)
    mean, se = float(gain.mean()), float(gain.std(ddof=1) / np.sqrt(n))
    top1 = float(np.mean(np.argmax(cos, axis=1) == y))
    kept = mean - n_se * se > 0 and fitted > 0
    rule = (f"weight by likelihood on {n} labelled rows the prior never trained on; kept only if its held-out "
            f"gain over uniform ({mean:+.3f} nats/row, standard error {se:.3f}) exceeds {n_se:g} standard errors")
    return PriorFit(float(fitted) if kept else 0.0, float(fitted), mean, se, n, top1, rule)
