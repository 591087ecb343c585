"""Where FAISS runs (--device auto|cpu|cuda), and the GPU copy of an index that searches there.

Where FAISS reports a GPU (the `gpu` extra: faiss-gpu), k-means training runs there (the IVF's
`clustering_index` is a GPU flat index, ann.py) and searches run on a GPU copy of the index
(`GpuCopy`: the kind's `to_gpu`; ivf-sq8's exact re-ranking stays on the CPU copy of the vectors).
The index itself is always built and saved in the CPU format. What a GPU cannot do (a kind FAISS
has no GPU version of, too many candidates or probes) is searched on the CPU with `auto` and
refused in one line with `cuda`.
"""

from __future__ import annotations

import functools

import numpy as np

from phrasefuse.errors import BadInput
from phrasefuse.index.kinds import KINDS

RECALL_K = 10
GPU_MAX_SELECT = 2048  # FAISS GPU limit on k and nprobe (GPU_MAX_SELECTION_K)


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
    """Why a `kind` index cannot be searched on a FAISS GPU with this setting (pq: a PQ code's (m, nbits)),
    or None when it can."""
    index_kind = KINDS.get(kind)
    if index_kind is None:
        return f"FAISS has no GPU version of a {kind} index"
    refusal = index_kind.gpu_refusal(pq)
    if refusal:
        return refusal
    width = k * index_kind.gpu_candidates
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
        # float32 vectors on the device by default: the CPU's scores (a kind may change the options).
        self.base, self.index = KINDS[kind].to_gpu(index, gpu_resources(), faiss.GpuClonerOptions())

    def set_nprobe(self, value: int) -> None:
        self.base.nprobe = int(value)

    def search(self, queries: np.ndarray, k: int):
        return self.index.search(queries, k)


def on_device(index, kind: str, device: str):
    """`index` itself on 'cpu'; a `GpuCopy` of it on 'cuda'."""
    return GpuCopy(index, kind) if device == "cuda" else index
