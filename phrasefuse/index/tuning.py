"""Searching an index, and tuning its search setting (nprobe, efSearch) for recall.

The setting is tuned on sample queries: the smallest that reaches the target recall@10
(+ TUNE_MARGIN) against exact search; recall@10 is then reported on other, held-out queries
(ann.build_faiss_index). Exact search, the ground truth, runs a chunk of vectors at a time, so
the vectors need not all be in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from phrasefuse.errors import BadInput
from phrasefuse.index.devices import GPU_MAX_SELECT, GpuCopy, on_device
from phrasefuse.index.kinds import EXACT, Plan

TUNE_MARGIN = 0.005  # tune a little above the target: held-out queries then meet it too
EXACT_CHUNK = 131_072  # rows exact search holds at a time


def set_search_value(index, plan: Plan, value: int | None) -> None:
    import faiss

    if plan.search_param and value:
        if isinstance(index, GpuCopy):
            index.set_nprobe(value)  # the only GPU search setting (no GPU HNSW)
        else:
            faiss.ParameterSpace().set_index_parameter(index, plan.search_param, int(value))


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (n, k) float32, rows (n, k) int64; -1 where fewer than k were found)."""
    k = max(1, min(int(k), index.ntotal))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact top-k by inner product: (scores, rows, seconds of the search itself)."""
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    start = time.perf_counter()
    scores, rows = search(flat, queries, k)
    return scores, rows, time.perf_counter() - start


def exact_top_k(vectors, queries: np.ndarray, k: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, float]:
    """Exact top-k by inner product over `vectors` (an array, or rows read on demand), EXACT_CHUNK
    rows at a time: (scores, rows, seconds spent searching). Only one chunk is in memory."""
    import faiss

    n, dim = vectors.shape
    k = max(1, min(int(k), n))
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_rows = np.full((len(queries), k), -1, np.int64)
    seconds = 0.0
    for start in range(0, n, EXACT_CHUNK):
        chunk = faiss.IndexFlatIP(dim)
        chunk.add(np.ascontiguousarray(vectors[start:start + EXACT_CHUNK], dtype=np.float32))
        searcher = on_device(chunk, EXACT, device)
        t0 = time.perf_counter()
        scores, rows = search(searcher, queries, k)
        seconds += time.perf_counter() - t0
        scores = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([best_rows, np.where(rows >= 0, rows + start, -1)], axis=1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_rows = np.take_along_axis(scores, top, 1), np.take_along_axis(rows, top, 1)
    return best_scores, best_rows, seconds


def recall_at_k(vectors: np.ndarray, queries: np.ndarray, found: np.ndarray, exact_scores: np.ndarray) -> float:
    """Share of the true top-k found, tie-aware: a found row counts when its exact score is at
    least the k-th best exact score (so equal-scoring duplicates are not misses)."""
    k = exact_scores.shape[1]
    found = found[:, :k]
    valid = found >= 0
    scores = np.einsum("qd,qkd->qk", queries.astype(np.float32), vectors[np.where(valid, found, 0)].astype(np.float32))
    hits = valid & (scores >= exact_scores[:, -1:] - 1e-5)
    return float(hits.sum() / exact_scores.size)


@dataclass
class TuneStep:
    value: int
    recall: float
    queries_per_second: float


def split_queries(queries: np.ndarray | None, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tuning half, held-out half) of the sample queries, shuffled by `seed`."""
    if queries is None or len(queries) < 2:
        raise BadInput(f"--kind {kind}: an approximate index needs at least 2 sample queries (image "
                       f"embeddings) to tune its search and measure recall; use --kind {EXACT}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    order = np.random.default_rng(seed).permutation(len(queries))
    return queries[order[: len(order) // 2]], queries[order[len(order) // 2:]]


def tune(index, plan: Plan, vectors: np.ndarray, tune_q: np.ndarray, tune_exact: np.ndarray, k: int, *,
         stop_below_qps: float, target_recall: float) -> list[TuneStep]:
    """Try the plan's search settings, cheapest first, until one reaches the target recall@10
    (+ TUNE_MARGIN) on `tune_q`, or one is slower than `stop_below_qps` (more probing only gets slower)."""
    steps: list[TuneStep] = []
    values = plan.search_values()
    if isinstance(index, GpuCopy):
        values = [v for v in values if v <= GPU_MAX_SELECT]
    for value in values:
        set_search_value(index, plan, value)
        t0 = time.perf_counter()
        _, found = search(index, tune_q, k)
        seconds = time.perf_counter() - t0
        steps.append(TuneStep(value, recall_at_k(vectors, tune_q, found, tune_exact), len(tune_q) / max(seconds, 1e-9)))
        if steps[-1].recall >= min(1.0, target_recall + TUNE_MARGIN):
            break
        if steps[-1].queries_per_second < stop_below_qps:
            break
    return steps
