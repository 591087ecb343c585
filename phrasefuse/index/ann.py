"""FAISS for the prototype index: which index, trained how, searched with which settings.

The index kinds and what differs between them (factory string, memory, search parameter, GPU copy)
are in kinds.py; where FAISS runs in devices.py; searching and tuning the search setting in
tuning.py. Here: the choice (`plan_index`), a function of the count and a memory budget for the
loaded index (the first automatic kind that fits); training on a sample, adding in chunks; then
the search setting tuned on sample queries, the smallest that reaches the target recall@10
(+ TUNE_MARGIN) against exact search, with recall@10 reported on other, held-out queries. When
no setting reaches the target faster than exact search (e.g. uniformly random vectors, which
have no cluster structure), the automatic choice falls back to exact search.

On a GPU (devices.py) k-means training runs there (the IVF's `clustering_index` is a GPU flat
index) and the tuning searches on a GPU copy; the index itself is always built and saved in the
CPU format.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from phrasefuse.engine import progress as progress_bar
from phrasefuse.errors import BadInput
from phrasefuse.index.devices import RECALL_K, gpu_resources, on_device, search_device
from phrasefuse.index.kinds import EXACT, KINDS, Plan
from phrasefuse.index.tuning import (TUNE_MARGIN, TuneStep, exact_top_k, recall_at_k, search, set_search_value,
                                     split_queries, tune)

TRAIN_POINTS_PER_LIST = 64
SPEEDUP_TO_KEEP = 2.0  # an approximate index must be this much faster than exact to be chosen
ADD_CHUNK = 131_072


# ---------------------------------------------------------------- threads, memory sizes


def faiss_threads() -> int:
    """Set FAISS's OpenMP threads to the cores this process may use (PHRASEFUSE_FAISS_THREADS
    overrides), so it neither oversubscribes a small machine nor idles a large one."""
    import faiss

    threads = int(os.environ.get("PHRASEFUSE_FAISS_THREADS") or len(os.sched_getaffinity(0)))
    faiss.omp_set_num_threads(max(1, threads))
    return threads


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory(text: str | None) -> int:
    """'4G', '512MiB', '1.5GB', '1000000' -> bytes; None -> half of this machine's RAM."""
    if text is None:
        return default_memory()
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise BadInput(f"--memory {text!r}: expected a size such as 4G, 512M or 2GiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise BadInput(f"--memory {text!r}: must be more than 0")
    return size


def default_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---------------------------------------------------------------- the plan


def plan_index(n: int, dim: int, memory: int, kind: str = "auto") -> Plan:
    """The index to build for n vectors of `dim` within `memory` bytes (kind 'auto' or one of KINDS).
    auto: the first automatic kind (in the order of KINDS) that allows n and fits; when none
    fits, the last one's smallest structure is refused below."""
    if kind not in ("auto", *KINDS):
        raise BadInput(f"--kind {kind}: expected auto or one of {', '.join(KINDS)}")
    budget = human_bytes(memory)
    if kind == "auto":
        previous_bytes = ""
        for candidate in (k for k in KINDS.values() if k.automatic):
            reason = candidate.auto_reason(n, budget, previous_bytes)
            plan = candidate.plan(n, dim, memory, reason or "")
            if reason is not None and plan.bytes <= memory:
                return plan
            previous_bytes = human_bytes(plan.bytes)
    else:
        plan = KINDS[kind].plan(n, dim, memory, f"forced (--kind {kind})")
    if plan.bytes > memory:
        raise BadInput(f"--memory {budget}: too small for {n:,} prototypes of dim {dim} "
                       f"({plan.factory} needs about {human_bytes(plan.bytes)}); raise --memory"
                       + ("" if kind == "auto" else " or choose another --kind"))
    return plan


# ---------------------------------------------------------------- build and search


def make_index(plan: Plan, seed: int = 0):
    """An empty index of the plan's kind and structure (untrained where the kind trains)."""
    import faiss

    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    plan.index_kind.configure(index, plan, seed)
    return index


def train_and_add(index, plan: Plan, vectors: np.ndarray, seed: int = 0, device: str = "cpu",
                  progress: bool | None = False) -> None:
    """Train on a random sample (k-means wants ~64 points per cell; PQ ~64 per code), then add all.
    On 'cuda' the k-means assignments run on the GPU; the trained index is the same CPU index.
    `progress` (engine.progress): the vectors added, ADD_CHUNK at a time (the bar shows while training)."""
    with progress_bar(len(vectors), f"index build: FAISS {plan.kind}", progress, unit="vectors") as advance:
        _train(index, plan, vectors, seed, device)
        reserve_flat_codes(index, len(vectors))
        for start in range(0, len(vectors), ADD_CHUNK):
            chunk = np.ascontiguousarray(vectors[start:start + ADD_CHUNK], dtype=np.float32)
            index.add(chunk)
            advance(len(chunk))


def reserve_flat_codes(index, n: int) -> None:
    """Give the index's exact vectors (a flat index, ivf-sq8's re-ranking copy, HNSW's storage) room for
    `n` rows before they are added a chunk at a time. Each add otherwise grows FAISS's code vector
    (a std::vector) by doubling, and the step past a power of two holds the old and the new buffer at
    once: at 1 M x 256 a spike of about 0.7 GB on top of the index. resize(0) keeps the capacity
    (std::vector never shrinks on resize), so the adds fill it in place."""
    import faiss

    index = faiss.downcast_index(index)
    for attr in ("refine_index", "storage"):
        if getattr(index, attr, None) is not None:
            index = faiss.downcast_index(getattr(index, attr))
    if isinstance(index, faiss.IndexFlatCodes) and index.ntotal == 0 and index.codes.is_owned:
        index.codes.resize(int(n) * index.code_size)
        index.codes.resize(0)


def _train(index, plan: Plan, vectors: np.ndarray, seed: int, device: str) -> None:
    """An untrained index (IVF, PQ) trained on its sample; a flat or HNSW one needs none."""
    if not index.is_trained:
        size = max(TRAIN_POINTS_PER_LIST * plan.nlist, TRAIN_POINTS_PER_LIST * 2 ** plan.pq_nbits if plan.pq_nbits else 0)
        sample = np.random.default_rng(seed).choice(len(vectors), size=min(len(vectors), size), replace=False)
        sample = np.ascontiguousarray(vectors[np.sort(sample)], dtype=np.float32)
        if device == "cuda" and plan.index_kind.clusters:
            import faiss

            train_with_clustering_index(index, sample, faiss.index_cpu_to_gpu(gpu_resources(), 0,
                                                                              faiss.IndexFlatIP(plan.dim)))
        else:
            index.train(sample)


def train_with_clustering_index(index, sample: np.ndarray, clustering) -> None:
    """Train an IVF index whose k-means assigns points with `clustering` (FAISS's hook for it; a GPU
    flat index on 'cuda'), so the CPU index is trained in place; unset afterwards, so the saved
    index points at nothing of the GPU."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    ivf.clustering_index = clustering
    try:
        index.train(sample)
    finally:
        ivf.clustering_index = None


@dataclass
class IndexReport:
    """What the build chose and measured (stored in meta.json)."""

    kind: str
    factory: str
    reason: str
    search_param: str | None
    search_value: int | None
    bytes: int
    memory_budget: int
    recall_at_10: float
    recall_queries: int
    queries_per_second: float | None = None  # on the tuning queries, this machine
    exact_queries_per_second: float | None = None
    target_recall: float = 0.95
    build_seconds: float = 0.0
    structure: dict = field(default_factory=dict)  # nlist, pq_m, pq_nbits, hnsw_m
    tuning: list[TuneStep] = field(default_factory=list)
    device: str = "cpu"  # where FAISS trained and searched while building (the saved index is CPU format)

    def as_dict(self) -> dict:
        return asdict(self)


def build_faiss_index(vectors: np.ndarray, queries: np.ndarray | None = None, *, kind: str = "auto",
                memory: int | None = None, target_recall: float = 0.95, seed: int = 0, device: str = "cpu",
                progress: bool | None = False):
    """Build, train and tune an index over `vectors` (unit rows). Returns (faiss index, IndexReport).

    `queries` (unit rows, like the ones the index will serve) tune the search setting on one
    half and measure recall@10 on the other, held-out half. `device` auto|cpu|cuda: where FAISS
    trains and searches while building (`search_device`); the returned index is a CPU index.
    `progress` (engine.progress): the vectors added to the index.
    """
    faiss_threads()
    start = time.perf_counter()
    if isinstance(vectors, np.ndarray):  # else rows read on demand (streaming.VectorFile): never all in memory
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    memory = default_memory() if memory is None else memory
    plan = plan_index(n, dim, memory, kind)
    device = search_device(plan.kind, device, pq=(plan.pq_m, plan.pq_nbits))
    if plan.index_kind.exact:
        return _exact_index(vectors, plan, memory, start, target_recall, device, progress=progress)

    tune_q, eval_q = split_queries(queries, plan.kind, seed)
    k = min(RECALL_K, n)
    # Ground truth by exact search a chunk of vectors at a time (no second copy of them all in memory).
    flat = KINDS[EXACT].plan(n, dim, memory, "")
    tune_exact, _, exact_seconds = exact_top_k(vectors, tune_q, k, device)
    exact_qps = len(tune_q) / max(exact_seconds, 1e-9)
    eval_exact, _, _ = exact_top_k(vectors, eval_q, k, device)

    index = make_index(plan, seed)
    train_and_add(index, plan, vectors, seed, device, progress)
    searcher = on_device(index, plan.kind, device)
    steps = tune(searcher, plan, vectors, tune_q, tune_exact, k, stop_below_qps=SPEEDUP_TO_KEEP * exact_qps
                 if kind == "auto" else 0.0, target_recall=target_recall)
    met = [s for s in steps if s.recall >= min(1.0, target_recall + TUNE_MARGIN)]
    chosen = met[0] if met else max(steps, key=lambda s: (round(s.recall, 3), -s.value))

    fast_enough = chosen.queries_per_second >= SPEEDUP_TO_KEEP * exact_qps
    if kind == "auto" and not (met and fast_enough) and flat.bytes <= memory:
        flat.reason = (f"exact fallback: {plan.factory} reached recall@10 {chosen.recall:.3f} at "
                       f"{chosen.queries_per_second:.0f} q/s (exact: {exact_qps:.0f} q/s); no setting met "
                       f"{target_recall} at {SPEEDUP_TO_KEEP:g}x exact speed")
        del index, searcher  # freed before the exact index is built
        return _exact_index(vectors, flat, memory, start, target_recall, device, steps, exact_qps, progress=progress)

    set_search_value(index, plan, chosen.value)  # the saved (CPU) index carries the setting
    set_search_value(searcher, plan, chosen.value)
    _, found = search(searcher, eval_q, k)
    report = _report(plan, memory, chosen.value, recall_at_k(vectors, eval_q, found, eval_exact), len(eval_q),
                     start, target_recall, device)
    report.tuning, report.exact_queries_per_second = steps, round(exact_qps, 1)
    report.queries_per_second = round(chosen.queries_per_second, 1)
    return index, report


def _exact_index(vectors: np.ndarray, plan: Plan, memory: int, start: float, target_recall: float, device: str,
                 steps: list[TuneStep] | None = None, exact_qps: float = 0.0, progress: bool | None = None):
    """(exact index over `vectors`, its IndexReport: recall 1 by construction); `steps` and `exact_qps`
    record the tuning of an approximate index this one replaces."""
    index = make_index(plan)
    train_and_add(index, plan, vectors, progress=progress)
    report = _report(plan, memory, None, 1.0, 0, start, target_recall, device)
    if steps is not None:
        report.tuning, report.exact_queries_per_second = steps, round(exact_qps, 1)
    return index, report


def _report(plan: Plan, memory: int, value: int | None, recall: float, n_queries: int, start: float,
            target: float, device: str = "cpu") -> IndexReport:
    structure = {k: v for k, v in (("nlist", plan.nlist), ("pq_m", plan.pq_m), ("pq_nbits", plan.pq_nbits),
                                   ("hnsw_m", plan.hnsw_m)) if v}
    return IndexReport(kind=plan.kind, factory=plan.factory, reason=plan.reason, search_param=plan.search_param,
                       search_value=value, bytes=plan.bytes, memory_budget=memory, recall_at_10=round(recall, 4),
                       recall_queries=n_queries, target_recall=target,
                       build_seconds=round(time.perf_counter() - start, 2), structure=structure, device=device)
