"""Pseudo-shots: query-corpus prototypes pseudo-labelled by matching label texts to query phrases.

A phrase index holds, per query phrase, a prototype in the image space (the mean of its query
images). The phrases and the label texts are embedded with one text encoder; each phrase goes
to its nearest label text, and each label takes the N phrases whose nearest label text beats the
second nearest by the widest margin: their prototypes become training rows of that label (N per
label, so the rows do not tilt the head toward the labels with many matching phrases). Those rows
never saw a labelled row, so adding them is scored like any other choice (select.choose on
validation or cross-validation within the shots): candidates off, then N = 1, 2, 4, 8; the
simplest within two paired standard errors of the best is kept (two, not one as for the text
trust: the best of four candidate sets is compared with none). With 1 shot per class nothing
can be scored and the pseudo-shots stay off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from phrasefuse.errors import BadInput
from phrasefuse.extract import DEFAULT_TEXT_MODEL
from phrasefuse.fuse.data import Blocks, Prepared, image_feature, rank_within_group
from phrasefuse.fuse.labeltext import label_texts, read_descriptions
from phrasefuse.store import describe_encoder, encoder_identity, l2_normalize

# Candidate pseudo-shots per label, fewest first: fewer, surer rows come first, so the rule
# prefers them when they score as well.
PER_LABEL = (1, 2, 4, 8)
RULE = ("per label, the prototypes of the N query phrases nearest to its label text with the widest margin over "
        "the second-nearest label; candidates off, then N = " + ", ".join(map(str, PER_LABEL)) + "; the simplest "
        "whose held-out top-1 is within two paired standard errors of the best is kept (held-out rows: val split or "
        "cross-validation within the shots; with 1 shot per class nothing is held out and they stay off)")


@dataclass
class PseudoShots:
    """Every phrase of an index with its nearest label and margin."""

    index: str
    vectors: np.ndarray  # (P, d) unit prototypes, image space
    labels: np.ndarray  # (P,) nearest label
    margins: np.ndarray  # (P,) cosine to the nearest label text minus the second nearest
    phrases: list[str]
    text_encoder: dict

    def taken(self, per_label: int) -> np.ndarray:
        """The `per_label` phrases of widest margin among those whose nearest label is each label."""
        order = np.lexsort((-self.margins, self.labels))
        rank = np.empty(len(order), np.int64)
        rank[order] = rank_within_group(self.labels[order])
        return np.flatnonzero(rank < per_label)

    def describe(self, per_label: int, vocab: Sequence[str]) -> dict:
        rows = self.taken(per_label)
        counts = np.bincount(self.labels[rows], minlength=len(vocab))
        return {"per_label": int(per_label), "rows": int(len(rows)), "min_margin": float(self.margins[rows].min()),
                "labels_covered": int((counts > 0).sum()),
                "examples": [f"{self.phrases[i]} -> {vocab[self.labels[i]]}"
                             for i in rows[np.argsort(-self.margins[rows])][:5]]}


def match_labels(phrase_emb: np.ndarray, label_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest label, margin over the second nearest) per phrase, by cosine."""
    cos = l2_normalize(phrase_emb) @ l2_normalize(label_emb).T
    if cos.shape[1] < 2:
        return np.zeros(len(cos), np.int64), np.zeros(len(cos), np.float32)
    top2 = -np.partition(-cos, 1, axis=1)[:, :2]
    return np.argmax(cos, axis=1).astype(np.int64), (top2[:, 0] - top2[:, 1]).astype(np.float32)


def load_pseudo_shots(index_path: str | os.PathLike, image_encoder: dict, label_texts: Sequence[str],
                      text_model: str) -> PseudoShots:
    """Read the index's prototypes and phrases, refuse an index of another image encoder, and
    match the phrases to `label_texts` with the text encoder `text_model`."""
    from phrasefuse.fuse.labeltext import embed_texts
    from phrasefuse.index.folder import PhraseIndex

    index = PhraseIndex(index_path)
    if encoder_identity(index.encoder) != encoder_identity(image_encoder):
        raise BadInput(f"--pseudo-shots {index_path}: its prototypes come from {describe_encoder(index.encoder)}, "
                       f"but the image feature is {describe_encoder(image_encoder)}; pass an index built from "
                       f"that encoder's image store")
    phrases = [str(p) for p in index.phrases.to_pylist()]
    vectors = read_prototypes(index)
    if len(vectors) != len(phrases):
        raise BadInput(f"{index.path}: {len(vectors)} prototypes but {len(phrases)} phrases; rebuild the index")
    phrase_emb, identity = embed_texts(phrases, text_model)
    label_emb, _ = embed_texts(list(label_texts), text_model)
    labels, margins = match_labels(phrase_emb, label_emb)
    return PseudoShots(str(index_path), l2_normalize(vectors).astype(np.float32), labels, margins, phrases, identity)


def read_prototypes(index) -> np.ndarray:
    """The prototype vectors a PhraseIndex holds, read back from FAISS (as stored: an ivf-pq's are approximate)."""
    faiss_index = index.faiss_index
    n = int(faiss_index.ntotal)
    try:
        import faiss

        ivf = faiss.try_extract_index_ivf(faiss_index)
        if ivf is not None:
            ivf.make_direct_map()
        return faiss_index.reconstruct_n(0, n)
    except RuntimeError as e:
        raise BadInput(f"{index.path}: its prototypes cannot be read back ({str(e).strip().splitlines()[-1][:120]}); "
                       f"rebuild it with --kind flat") from None


def with_pseudo_rows(blocks: Blocks, y: np.ndarray, img: int, pseudo: PseudoShots,
                     rows: np.ndarray) -> tuple[Blocks, np.ndarray, np.ndarray]:
    """`blocks` and `y` with the pseudo rows `rows` appended (image block only; other features
    absent), and the indices of the appended rows."""
    n, extra = len(blocks), len(rows)
    arrays = []
    for j, a in enumerate(blocks.arrays):
        tail = pseudo.vectors[rows] if j == img else np.zeros((extra, a.shape[1]), a.dtype)
        arrays.append(np.concatenate([a, tail.astype(a.dtype)]))
    present = np.zeros((extra, blocks.present.shape[1]), bool)
    present[:, img] = True
    return (Blocks(arrays, np.concatenate([blocks.present, present])), np.concatenate([y, pseudo.labels[rows]]),
            np.arange(n, n + extra))


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
