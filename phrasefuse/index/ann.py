"""FAISS for the prototype index: which index, trained how, searched with which settings.

Vectors are L2-normalised, so inner product is cosine similarity (METRIC_INNER_PRODUCT).

The automatic choice (`plan_index`), as a function of the count and a memory budget
for the loaded index, first that fits:
  flat      exact search, up to EXACT_MAX prototypes (a batch of queries is one BLAS call);
  ivf-sq8   above that: (spherical) k-means cells; the probed cells are scanned as 8-bit
            codes (a quarter of the bytes: scanning is memory-bound), then the best
            REFINE_FACTOR * k candidates are re-ranked with the exact vectors (kept as well,
            1.25x the raw size): the recall of ivf-flat at about twice its speed (docs/benchmarks.md);
  ivf-flat  when that does not fit but the raw vectors do: exact scores inside the probed cells;
  ivf-pq    when they do not fit: the largest product-quantisation code that fits.
  hnsw      only when forced (--kind hnsw): fast single queries, but on 2 CPU cores its
            graph takes minutes per million 512-d vectors to build (docs/benchmarks.md); FAISS has
            no GPU version of it.
The search setting (nprobe, efSearch) is then tuned on sample queries, the smallest that
reaches the target recall@10 (+ TUNE_MARGIN) against exact search; recall@10 is reported on other,
held-out queries. When no setting reaches the target faster than exact search (e.g.
uniformly random vectors, which have no cluster structure), the automatic choice falls
back to exact search.

Devices (`faiss_device`): where FAISS reports a GPU (the `gpu` extra: faiss-gpu), k-means
training runs there (the IVF's `clustering_index` is a GPU flat index) and searches run on a GPU
copy of the index (`GpuSearcher`: `index_cpu_to_gpu`; ivf-sq8's exact re-ranking stays on the
CPU copy of the vectors). The index itself is always built and saved in the CPU format.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from phrasefuse.engine import progress as progress_bar
from phrasefuse.errors import BadInput
from phrasefuse.index import INDEX_KINDS

KINDS = INDEX_KINDS
EXACT_MAX = 50_000
RECALL_K = 10
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
MIN_POINTS_PER_CENTROID = 39  # below this FAISS's k-means warns (and trains poorly)
TRAIN_POINTS_PER_LIST = 64
TUNE_MARGIN = 0.005  # tune a little above the target: held-out queries then meet it too
REFINE_FACTOR = 4  # ivf-sq8: exact re-ranking of the best 4k candidates
SPEEDUP_TO_KEEP = 2.0  # an approximate index must be this much faster than exact to be chosen
ADD_CHUNK = 131_072
GPU_KINDS = ("flat", "ivf-sq8", "ivf-flat", "ivf-pq")  # what faiss.index_cpu_to_gpu clones (not HNSW)
GPU_MAX_SELECT = 2048  # FAISS GPU limit on k and nprobe (GPU_MAX_SELECTION_K)
GPU_PQ_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)  # GpuIndexIVFPQ code sizes (8-bit codes)


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


# ---------------------------------------------------------------- devices


def faiss_gpus() -> tuple[bool, int]:
    """(this FAISS build has GPU support, GPUs it sees). faiss-cpu: (False, 0)."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return False, 0
    return True, int(faiss.get_num_gpus())


def choose_device(requested: str, gpu_support: bool, gpus: int) -> str:
    """'cpu' or 'cuda' for FAISS, given --device (auto|cpu|cuda) and what FAISS reports.
    auto never fails (CPU without a GPU); cuda without one is a one-line BadInput (exit 2)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise BadInput(f"--device {requested}: expected auto, cpu or cuda")
    if requested == "cpu":
        return "cpu"
    if gpus > 0:
        return "cuda"
    if requested == "auto":
        return "cpu"
    if not gpu_support:
        raise BadInput("--device cuda: this FAISS is the CPU-only build (faiss-cpu); install the gpu extra "
                       "('make install GPU=1') or use --device auto")
    raise BadInput("--device cuda: FAISS sees no GPU; use --device cpu or --device auto")


def faiss_device(requested: str) -> str:
    """--device as FAISS will run it: 'cpu' or 'cuda' (see `choose_device`)."""
    return "cpu" if requested == "cpu" else choose_device(requested, *faiss_gpus())


def gpu_refusal(kind: str, search_value: int | None = None, k: int = RECALL_K, pq: tuple[int, int] = (0, 0)) -> str | None:
    """Why a `kind` index cannot be searched on a FAISS GPU with this setting (pq: ivf-pq's (m, nbits)),
    or None when it can."""
    if kind not in GPU_KINDS:
        return f"FAISS has no GPU version of a {kind} index"
    if kind == "ivf-pq" and (pq[0] not in GPU_PQ_BYTES or pq[1] != 8):
        return f"FAISS's GPU IVF-PQ takes 8-bit codes of {', '.join(map(str, GPU_PQ_BYTES))} bytes, not PQ{pq[0]}x{pq[1]}"
    width = k * (REFINE_FACTOR if kind == "ivf-sq8" else 1)
    if width > GPU_MAX_SELECT or (search_value or 0) > GPU_MAX_SELECT:
        return (f"FAISS GPU search is limited to {GPU_MAX_SELECT} candidates and probes "
                f"(here k={width}, nprobe={search_value})")
    return None


def search_device(kind: str, requested: str, search_value: int | None = None, k: int = RECALL_K,
                  pq: tuple[int, int] = (0, 0)) -> str:
    """Where to search a `kind` index for --device `requested`: auto falls back to the CPU for what
    the GPU cannot do; cuda refuses it (one line)."""
    device = faiss_device(requested)
    refusal = gpu_refusal(kind, search_value, k, pq) if device == "cuda" else None
    if refusal and requested == "cuda":
        raise BadInput(f"--device cuda: {refusal}; use --device cpu or --device auto")
    return "cpu" if refusal else device


@functools.lru_cache(maxsize=None)
def gpu_resources():
    """One set of FAISS GPU resources (streams, cuBLAS handle, temporary memory) per process."""
    import faiss

    return faiss.StandardGpuResources()


class GpuCopy:
    """A copy of a CPU index on GPU 0, for search only: the CPU index stays the one that is saved.
    ivf-sq8 (IndexRefineFlat) puts its IVF on the GPU and re-ranks with the CPU's exact vectors."""

    def __init__(self, index, kind: str):
        import faiss

        self.cpu, self.ntotal = index, index.ntotal  # keeps the CPU vectors alive (ivf-sq8 re-ranks with them)
        options = faiss.GpuClonerOptions()
        # float32 vectors on the device: the CPU's scores. For ivf-pq the flag means float16 lookup tables,
        # which large codes need (GPU shared memory); its codes are approximate anyway.
        options.useFloat16 = kind == "ivf-pq"
        if kind == "ivf-sq8":
            refine = faiss.downcast_index(index)
            self.base = faiss.index_cpu_to_gpu(gpu_resources(), 0, refine.base_index, options)
            self.index = faiss.IndexRefine(self.base, refine.refine_index)
            self.index.k_factor = refine.k_factor
        else:
            self.index = self.base = faiss.index_cpu_to_gpu(gpu_resources(), 0, index, options)

    def set_nprobe(self, value: int) -> None:
        self.base.nprobe = int(value)

    def search(self, queries: np.ndarray, k: int):
        return self.index.search(queries, k)


def on_device(index, kind: str, device: str):
    """`index` itself on 'cpu'; a `GpuCopy` of it on 'cuda'."""
    return GpuCopy(index, kind) if device == "cuda" else index


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Which index to build: kind and structure (not the search setting, which is tuned)."""

    kind: str
    dim: int
    nlist: int = 0  # ivf-*: k-means cells
    pq_m: int = 0  # ivf-pq: bytes per code (sub-quantizers)
    pq_nbits: int = 0  # ivf-pq: bits per sub-quantizer code
    hnsw_m: int = 0  # hnsw: links per node
    bytes: int = 0  # estimated size of the loaded index
    reason: str = ""

    @property
    def factory(self) -> str:
        """The FAISS index_factory string (also how meta.json and inspect name it)."""
        return {"flat": "Flat", "hnsw": f"HNSW{self.hnsw_m},Flat", "ivf-sq8": f"IVF{self.nlist},SQ8,RFlat",
                "ivf-flat": f"IVF{self.nlist},Flat", "ivf-pq": f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_nbits}"}[self.kind]

    @property
    def search_param(self) -> str | None:
        return {"flat": None, "hnsw": "efSearch"}.get(self.kind, "nprobe")

    def search_values(self) -> list[int]:
        """Settings to try, cheapest first, in steps of about 1.5x (1, 2, 3, 4, 6, 8, 12, 16, ...)."""
        steps = sorted({v for i in range(12) for v in (2**i, 3 * 2**i // 2)})
        if self.kind == "hnsw":
            return [v for v in steps if 16 <= v <= 2048]
        if self.kind.startswith("ivf"):
            return [v for v in steps if v < self.nlist] + [self.nlist]
        return []


def index_bytes(kind: str, n: int, dim: int, nlist: int = 0, pq_m: int = 0, pq_nbits: int = 8,
                hnsw_m: int = HNSW_M) -> int:
    """Estimated memory of the loaded index (vectors or codes, ids, centroids, graph links)."""
    if kind == "flat":
        return n * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + hnsw_m * 2 * 4 + 16)
    if kind == "ivf-sq8":
        return n * (dim * 4 + dim + 8) + nlist * dim * 4
    if kind == "ivf-flat":
        return n * (dim * 4 + 8) + nlist * dim * 4
    if kind == "ivf-pq":
        return n * (math.ceil(pq_m * pq_nbits / 8) + 8) + nlist * dim * 4 + dim * 2**pq_nbits * 4
    raise ValueError(kind)


def default_nlist(n: int) -> int:
    """About 2*sqrt(n) cells (a power of two), with enough points per cell to train k-means."""
    nlist = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
    cap = max(1, n // MIN_POINTS_PER_CENTROID)
    return max(1, min(nlist, 2 ** int(math.log2(cap))))


def pq_options(n: int, dim: int) -> list[tuple[int, int]]:
    """(m, nbits) candidates, largest code first: m sub-vectors of at least 2 dims (dim/2, then
    the powers of two dividing dim); nbits 8, fewer when n is too small to train 256 codes."""
    nbits = max(1, min(8, int(math.log2(max(2, n // MIN_POINTS_PER_CENTROID)))))
    powers = [2**i for i in range(int(math.log2(max(1, dim // 2))), -1, -1) if dim % 2**i == 0]
    return [(m, nbits) for m in dict.fromkeys([dim // 2, *powers]) if m >= 1]


def plan_index(n: int, dim: int, memory: int, kind: str = "auto") -> Plan:
    """The index to build for n vectors of `dim` within `memory` bytes (kind 'auto' or one of KINDS)."""
    if kind not in ("auto", *KINDS):
        raise BadInput(f"--kind {kind}: expected auto or one of {', '.join(KINDS)}")
    nlist = default_nlist(n)
    budget = human_bytes(memory)

    def make(k: str, reason: str, **extra) -> Plan:
        p = Plan(k, dim, reason=reason, **extra)
        p.bytes = index_bytes(k, n, dim, nlist=p.nlist, pq_m=p.pq_m, pq_nbits=p.pq_nbits or 8,
                              hnsw_m=p.hnsw_m or HNSW_M)
        return p

    def pq_plan(reason: str) -> Plan:
        for m, nbits in pq_options(n, dim):
            p = make("ivf-pq", reason, nlist=nlist, pq_m=m, pq_nbits=nbits)
            if p.bytes <= memory:
                return p
        return p  # the smallest; the caller refuses it as over budget

    if kind == "auto":
        flat = make("flat", f"exact: {n:,} prototypes <= {EXACT_MAX:,}")
        if n <= EXACT_MAX and flat.bytes <= memory:
            return flat
        sq8 = make("ivf-sq8", f"{n:,} prototypes > {EXACT_MAX:,}; raw vectors + 8-bit codes fit --memory {budget}",
                   nlist=nlist)
        if sq8.bytes <= memory:
            return sq8
        ivf = make("ivf-flat", f"raw vectors + 8-bit codes exceed --memory {budget}; raw vectors fit", nlist=nlist)
        if ivf.bytes <= memory:
            return ivf
        plan = pq_plan(f"raw vectors ({human_bytes(ivf.bytes)}) exceed --memory {budget}: product quantisation")
    elif kind == "flat":
        plan = make("flat", "forced (--kind flat)")
    elif kind == "hnsw":
        plan = make("hnsw", "forced (--kind hnsw)", hnsw_m=HNSW_M)
    elif kind in ("ivf-flat", "ivf-sq8"):
        plan = make(kind, f"forced (--kind {kind})", nlist=nlist)
    else:
        plan = pq_plan("forced (--kind ivf-pq)")
    if plan.bytes > memory:
        raise BadInput(f"--memory {budget}: too small for {n:,} prototypes of dim {dim} "
                       f"({plan.factory} needs about {human_bytes(plan.bytes)}); raise --memory"
                       + ("" if kind == "auto" else " or choose another --kind"))
    return plan


# ---------------------------------------------------------------- build and search


def make_index(plan: Plan, seed: int = 0):
    import faiss

    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if plan.kind == "ivf-sq8":
        faiss.downcast_index(index).k_factor = REFINE_FACTOR
    if plan.kind.startswith("ivf"):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        ivf.cp.spherical = True  # unit vectors, inner product: unit centroids
        if plan.kind == "ivf-pq":
            ivfpq = faiss.downcast_index(index)
            ivfpq.pq.cp.seed = seed
            ivfpq.do_polysemous_training = False  # on by default; 10x the training time, unused here
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
        if device == "cuda" and plan.kind.startswith("ivf"):
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
    """Exact top-k by inner product over `vectors` (an array, or rows read on demand), ADD_CHUNK
    rows at a time: (scores, rows, seconds spent searching). Only one chunk is in memory."""
    n, dim = vectors.shape
    k = max(1, min(int(k), n))
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_rows = np.full((len(queries), k), -1, np.int64)
    seconds = 0.0
    for start in range(0, n, ADD_CHUNK):
        chunk = make_index(Plan("flat", dim))
        chunk.add(np.ascontiguousarray(vectors[start:start + ADD_CHUNK], dtype=np.float32))
        searcher = on_device(chunk, "flat", device)
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
    if plan.kind == "flat":
        return _exact_index(vectors, plan, memory, start, target_recall, device, progress=progress)

    tune_q, eval_q = _split_queries(queries, plan.kind, seed)
    k = min(RECALL_K, n)
    # Ground truth by exact search a chunk of vectors at a time (no second copy of them all in memory).
    flat = Plan("flat", dim, bytes=index_bytes("flat", n, dim))
    tune_exact, _, exact_seconds = exact_top_k(vectors, tune_q, k, device)
    exact_qps = len(tune_q) / max(exact_seconds, 1e-9)
    eval_exact, _, _ = exact_top_k(vectors, eval_q, k, device)

    index = make_index(plan, seed)
    train_and_add(index, plan, vectors, seed, device, progress)
    searcher = on_device(index, plan.kind, device)
    steps = _tune(searcher, plan, vectors, tune_q, tune_exact, k, stop_below_qps=SPEEDUP_TO_KEEP * exact_qps
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


def _split_queries(queries: np.ndarray | None, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tuning half, held-out half) of the sample queries, shuffled by `seed`."""
    if queries is None or len(queries) < 2:
        raise BadInput(f"--kind {kind}: an approximate index needs at least 2 sample queries (image "
                       f"embeddings) to tune its search and measure recall; use --kind flat")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    order = np.random.default_rng(seed).permutation(len(queries))
    return queries[order[: len(order) // 2]], queries[order[len(order) // 2:]]


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


def _tune(index, plan: Plan, vectors: np.ndarray, tune_q: np.ndarray, tune_exact: np.ndarray, k: int, *,
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


def _report(plan: Plan, memory: int, value: int | None, recall: float, n_queries: int, start: float,
            target: float, device: str = "cpu") -> IndexReport:
    structure = {k: v for k, v in (("nlist", plan.nlist), ("pq_m", plan.pq_m), ("pq_nbits", plan.pq_nbits),
                                   ("hnsw_m", plan.hnsw_m)) if v}
    return IndexReport(kind=plan.kind, factory=plan.factory, reason=plan.reason, search_param=plan.search_param,
                       search_value=value, bytes=plan.bytes, memory_budget=memory, recall_at_10=round(recall, 4),
                       recall_queries=n_queries, target_recall=target,
                       build_seconds=round(time.perf_counter() - start, 2), structure=structure, device=device)
