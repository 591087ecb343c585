"""The FAISS index kinds: one small class per kind, registered in `KINDS` (name -> kind).

A kind says everything that differs between indexes: its FAISS factory string, the memory of the
loaded index (for the --memory budget), its search parameter and the values tuning tries, the
settings FAISS does not take from the factory string, whether the automatic choice may pick it
and why, and what a GPU copy of it takes. Everything else (ann.py: plan, train, build; tuning.py:
the search setting; devices.py: GPU copies; folder.py: the saved index) asks the kind, never its
name (tests/test_registries.py).

Vectors are L2-normalised, so inner product is cosine similarity (METRIC_INNER_PRODUCT).

The automatic choice tries the kinds with `automatic = True` in the order of `KINDS`, first that
fits --memory (ann.plan_index):
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

A new kind: subclass `IndexKind` (or the kind it resembles) here and `register` it; `--kind`, a
config's phrases.kind, the automatic choice (when `automatic`) and the GPU path then take it.
Nothing heavy is imported at module level (the CLI reads `KINDS` for --help).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from phrasefuse.errors import BadInput

EXACT_MAX = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
MIN_POINTS_PER_CENTROID = 39  # below this FAISS's k-means warns (and trains poorly)
REFINE_FACTOR = 4  # ivf-sq8: exact re-ranking of the best 4k candidates
GPU_PQ_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)  # GpuIndexIVFPQ code sizes (8-bit codes)


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
    def index_kind(self) -> IndexKind:
        return kind_named(self.kind)

    @property
    def factory(self) -> str:
        """The FAISS index_factory string (also how meta.json and inspect name it)."""
        return self.index_kind.factory(self)

    @property
    def search_param(self) -> str | None:
        return self.index_kind.search_param

    def search_values(self) -> list[int]:
        """Settings to try, cheapest first (see `IndexKind.search_values`)."""
        return self.index_kind.search_values(self)


def search_steps(low: int, high: int) -> list[int]:
    """Steps of about 1.5x (1, 2, 3, 4, 6, 8, 12, 16, ...) from `low` to `high`, both included when steps."""
    return [v for v in sorted({v for i in range(12) for v in (2**i, 3 * 2**i // 2)}) if low <= v <= high]


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


class IndexKind:
    """One FAISS index kind. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    search_param: ClassVar[str | None] = None  # the FAISS parameter tuning sets (None: nothing to tune)
    exact: ClassVar[bool] = False  # exact search: recall 1 by construction, no tuning queries needed
    automatic: ClassVar[bool] = True  # the automatic choice may pick it (in the order of KINDS)
    clusters: ClassVar[bool] = False  # trained by k-means (IVF): on a GPU, through a GPU clustering index
    gpu: ClassVar[bool] = True  # faiss.index_cpu_to_gpu clones it
    gpu_candidates: ClassVar[int] = 1  # candidates a GPU search returns per result asked (re-ranking asks more)

    def plan(self, n: int, dim: int, memory: int, reason: str) -> Plan:
        """The structure for n vectors of `dim` (the largest that fits `memory` where there is a choice)."""
        return self.sized(Plan(self.name, dim, reason=reason), n)

    def sized(self, plan: Plan, n: int) -> Plan:
        plan.bytes = self.memory(plan, n)
        return plan

    def factory(self, plan: Plan) -> str:
        raise NotImplementedError

    def memory(self, plan: Plan, n: int) -> int:
        """Estimated memory of the loaded index (vectors or codes, ids, centroids, graph links)."""
        raise NotImplementedError

    def search_values(self, plan: Plan) -> list[int]:
        """The search settings tuning tries, cheapest first."""
        return []

    def configure(self, index, plan: Plan, seed: int) -> None:
        """Settings the factory string does not carry, on a new (untrained) index."""

    def auto_reason(self, n: int, budget: str, previous_bytes: str) -> str | None:
        """Why the automatic choice picks this kind (None: it may not, whatever the memory). `budget`:
        --memory; `previous_bytes`: the size of the kind tried before it, which did not fit."""
        return f"{self.name} fits --memory {budget}"

    def gpu_refusal(self, pq: tuple[int, int]) -> str | None:
        """Why FAISS cannot search this index on a GPU whatever the setting (None: it can); `pq`:
        the (m, nbits) of a product-quantisation code."""
        return None if self.gpu else f"FAISS has no GPU version of a {self.name} index"

    def to_gpu(self, index, resources, options):
        """(GPU index whose search setting is set, GPU index that searches): a copy on GPU 0."""
        import faiss

        copy = faiss.index_cpu_to_gpu(resources, 0, index, options)
        return copy, copy


class Flat(IndexKind):
    name = "flat"
    exact = True

    def factory(self, plan: Plan) -> str:
        return "Flat"

    def memory(self, plan: Plan, n: int) -> int:
        return n * plan.dim * 4

    def auto_reason(self, n: int, budget: str, previous_bytes: str) -> str | None:
        return f"exact: {n:,} prototypes <= {EXACT_MAX:,}" if n <= EXACT_MAX else None


class Hnsw(IndexKind):
    name = "hnsw"
    search_param = "efSearch"
    automatic = False
    gpu = False

    def plan(self, n: int, dim: int, memory: int, reason: str) -> Plan:
        return self.sized(Plan(self.name, dim, hnsw_m=HNSW_M, reason=reason), n)

    def factory(self, plan: Plan) -> str:
        return f"HNSW{plan.hnsw_m},Flat"

    def memory(self, plan: Plan, n: int) -> int:
        return n * (plan.dim * 4 + (plan.hnsw_m or HNSW_M) * 2 * 4 + 16)

    def search_values(self, plan: Plan) -> list[int]:
        return search_steps(16, 2048)

    def configure(self, index, plan: Plan, seed: int) -> None:
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION


class Ivf(IndexKind):
    """Inverted lists over k-means cells; what is stored in a cell is the subclass's."""

    search_param = "nprobe"
    clusters = True

    def plan(self, n: int, dim: int, memory: int, reason: str) -> Plan:
        return self.sized(Plan(self.name, dim, nlist=default_nlist(n), reason=reason), n)

    def search_values(self, plan: Plan) -> list[int]:
        return search_steps(1, plan.nlist - 1) + [plan.nlist]

    def configure(self, index, plan: Plan, seed: int) -> None:
        import faiss

        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        ivf.cp.spherical = True  # unit vectors, inner product: unit centroids


class IvfSq8(Ivf):
    name = "ivf-sq8"
    gpu_candidates = REFINE_FACTOR  # the GPU returns 4k candidates for the CPU to re-rank

    def factory(self, plan: Plan) -> str:
        return f"IVF{plan.nlist},SQ8,RFlat"

    def memory(self, plan: Plan, n: int) -> int:
        return n * (plan.dim * 4 + plan.dim + 8) + plan.nlist * plan.dim * 4

    def configure(self, index, plan: Plan, seed: int) -> None:
        import faiss

        faiss.downcast_index(index).k_factor = REFINE_FACTOR
        super().configure(index, plan, seed)

    def auto_reason(self, n: int, budget: str, previous_bytes: str) -> str | None:
        return f"{n:,} prototypes > {EXACT_MAX:,}; raw vectors + 8-bit codes fit --memory {budget}"

    def to_gpu(self, index, resources, options):
        """The IVF on the GPU; the re-ranking (IndexRefine) with the CPU's exact vectors."""
        import faiss

        refine = faiss.downcast_index(index)
        base = faiss.index_cpu_to_gpu(resources, 0, refine.base_index, options)
        searcher = faiss.IndexRefine(base, refine.refine_index)
        searcher.k_factor = refine.k_factor
        return base, searcher


class IvfFlat(Ivf):
    name = "ivf-flat"

    def factory(self, plan: Plan) -> str:
        return f"IVF{plan.nlist},Flat"

    def memory(self, plan: Plan, n: int) -> int:
        return n * (plan.dim * 4 + 8) + plan.nlist * plan.dim * 4

    def auto_reason(self, n: int, budget: str, previous_bytes: str) -> str | None:
        return f"raw vectors + 8-bit codes exceed --memory {budget}; raw vectors fit"


class IvfPq(Ivf):
    name = "ivf-pq"

    def plan(self, n: int, dim: int, memory: int, reason: str) -> Plan:
        """The largest code that fits `memory` (else the smallest; the caller refuses it as over budget)."""
        for m, nbits in pq_options(n, dim):
            plan = self.sized(Plan(self.name, dim, nlist=default_nlist(n), pq_m=m, pq_nbits=nbits, reason=reason), n)
            if plan.bytes <= memory:
                break
        return plan

    def factory(self, plan: Plan) -> str:
        return f"IVF{plan.nlist},PQ{plan.pq_m}x{plan.pq_nbits}"

    def memory(self, plan: Plan, n: int) -> int:
        nbits = plan.pq_nbits or 8
        return n * (math.ceil(plan.pq_m * nbits / 8) + 8) + plan.nlist * plan.dim * 4 + plan.dim * 2**nbits * 4

    def configure(self, index, plan: Plan, seed: int) -> None:
        import faiss

        super().configure(index, plan, seed)
        ivfpq = faiss.downcast_index(index)
        ivfpq.pq.cp.seed = seed
        ivfpq.do_polysemous_training = False  # on by default; 10x the training time, unused here

    def auto_reason(self, n: int, budget: str, previous_bytes: str) -> str | None:
        return f"raw vectors ({previous_bytes}) exceed --memory {budget}: product quantisation"

    def gpu_refusal(self, pq: tuple[int, int]) -> str | None:
        if pq[0] not in GPU_PQ_BYTES or pq[1] != 8:
            return f"FAISS's GPU IVF-PQ takes 8-bit codes of {', '.join(map(str, GPU_PQ_BYTES))} bytes, not PQ{pq[0]}x{pq[1]}"
        return None

    def to_gpu(self, index, resources, options):
        # For ivf-pq the flag means float16 lookup tables, which large codes need (GPU shared memory);
        # its codes are approximate anyway (the other kinds keep float32 vectors: the CPU's scores).
        options.useFloat16 = True
        return super().to_gpu(index, resources, options)


# The registry: --kind's choices (after "auto") in this order, which is also the automatic choice's.
KINDS: dict[str, IndexKind] = {}

# The kind exact search, ground truth and the automatic choice's fallback use.
EXACT = "flat"


def register(kind: IndexKind) -> IndexKind:
    """Add `kind` to KINDS under its name (a new name; the automatic choice tries it after those before it)."""
    if not kind.name or kind.name == "auto" or kind.name in KINDS:
        raise ValueError(f"index kind {kind.name!r}: needs a new name other than 'auto'")
    KINDS[kind.name] = kind
    return kind


for _kind in (Flat(), Hnsw(), IvfSq8(), IvfFlat(), IvfPq()):
    register(_kind)


def kind_named(name: str) -> IndexKind:
    """The registered kind `name` (an index's meta.json may name one this process has not registered)."""
    kind = KINDS.get(name)
    if kind is None:
        raise BadInput(f"index kind {name!r} is not registered here (known: {', '.join(KINDS)}); "
                       f"rebuild the index with one of them")
    return kind


def index_bytes(kind: str, n: int, dim: int, nlist: int = 0, pq_m: int = 0, pq_nbits: int = 8,
                hnsw_m: int = HNSW_M) -> int:
    """Estimated memory of a loaded `kind` index of n vectors of `dim` with this structure."""
    return KINDS[kind].memory(Plan(kind, dim, nlist=nlist, pq_m=pq_m, pq_nbits=pq_nbits, hnsw_m=hnsw_m), n)
