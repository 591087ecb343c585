"""Prototypes: per phrase, the re-normalised (weighted) mean of its images' embeddings.

One vectorised pass of segment sums: pairs sorted by phrase, gathered a chunk at a
time (memory: one chunk x dim, not pairs x dim) and summed with `np.add.reduceat`.
The mean's denominator does not change its direction, so the prototype is the
L2-normalised weighted sum.
"""

from __future__ import annotations

import numpy as np

from phrasefuse.store import l2_normalize

CHUNK_PAIRS = 65_536


def segment_sums(segment: np.ndarray, rows: np.ndarray, embeddings: np.ndarray, n_segments: int,
                 weights: np.ndarray | None = None, chunk: int = CHUNK_PAIRS,
                 out: np.ndarray | None = None) -> np.ndarray:
    """(n_segments, dim) float32: row s = sum over pairs p with segment[p] == s of
    weights[p] * embeddings[rows[p]]. Segments without pairs are zero rows. With `out` (float32,
    (n_segments, dim)) the sums are added into it and it is returned: no second array of sums."""
    segment = np.asarray(segment, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(segment, kind="stable")
    segment, rows = segment[order], rows[order]
    weights = None if weights is None else np.asarray(weights, dtype=np.float32)[order]
    sums = np.zeros((n_segments, embeddings.shape[1]), dtype=np.float32) if out is None else out
    for start in range(0, len(segment), chunk):
        seg = segment[start:start + chunk]
        block = np.asarray(embeddings[rows[start:start + chunk]], dtype=np.float32)
        if weights is not None:
            block *= weights[start:start + chunk, None]
        # Sorted: each segment is one contiguous run in the chunk, so its run start is unique.
        starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
        sums[seg[starts]] += np.add.reduceat(block, starts, axis=0)
    return sums


def scaled_per_segment(weights: np.ndarray, segment: np.ndarray, n_segments: int) -> np.ndarray:
    """Each weight over the largest of its segment (float64 in, float32-safe out). The prototype is
    a normalised weighted sum, so its direction does not change; but positive weights as small as
    1e-300 no longer round to 0 in float32 and cancel their phrase."""
    weights = np.asarray(weights, dtype=np.float64)
    segment = np.asarray(segment, dtype=np.int64)
    largest = np.zeros(n_segments)
    np.maximum.at(largest, segment, weights)
    return weights / np.where(largest > 0, largest, 1.0)[segment]


def prototypes(segment: np.ndarray, rows: np.ndarray, embeddings: np.ndarray, n_segments: int,
               weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prototypes (n_segments, dim) float32 unit rows, ok (n_segments,) bool).

    `embeddings` are L2-normalised first (a float16 store comes back unit-norm in float32).
    ok is False for a segment with no pairs, or whose images cancel out (zero sum)."""
    if weights is not None:
        weights = scaled_per_segment(weights, segment, n_segments)
    sums = segment_sums(segment, rows, l2_normalize(embeddings), n_segments, weights)
    ok = np.linalg.norm(sums, axis=1) > 1e-6
    return l2_normalize(sums), ok
