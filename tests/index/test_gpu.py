"""FAISS on the GPU (marked gpu; skipped where FAISS sees none; bench/gpu.sh runs them): GPU search
equals CPU search within the recall the build reports, a GPU-built index is a CPU index that loads
and answers on the CPU, and `phrases` on the GPU writes what it writes on the CPU."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from phrasefuse.index.ann import build_faiss_index
from phrasefuse.index.devices import GpuCopy, faiss_gpus
from phrasefuse.index.kinds import Plan
from phrasefuse.index.tuning import exact_search, search, set_search_value
from phrasefuse.index.folder import PhraseIndex
from phrasefuse.store import EmbeddingStore, embeddings_to_numpy, l2_normalize
from tests.conftest import run_cli
from tests.index.conftest import read_meta

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(faiss_gpus()[1] == 0, reason="FAISS sees no GPU (gpu extra: faiss-gpu)")]


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around n // 50 random centres: the structure an IVF index is for."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((max(1, n // 50), dim)).astype(np.float32))
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return l2_normalize(x.astype(np.float32))


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


@pytest.fixture(scope="module")
def data():
    vectors, queries = clustered(20_000, 64, 0), clustered(2_000, 64, 1)
    return vectors, queries, exact_search(vectors, queries, 10)


def test_gpu_flat_search_is_the_exact_search(data):
    vectors, queries, (exact_scores, exact_rows, _) = data
    index, report = build_faiss_index(vectors, kind="flat", device="cpu")
    scores, rows = search(GpuCopy(index, "flat"), queries, 10)
    assert overlap(rows, exact_rows) >= 0.999  # only float ties may swap
    np.testing.assert_allclose(scores, exact_scores, atol=1e-4)


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-sq8", "ivf-pq"])
def test_gpu_search_equals_cpu_search_within_the_reported_recall(kind, data):
    vectors, queries, (_, exact_rows, _) = data
    index, report = build_faiss_index(vectors, queries[:1000], kind=kind, device="cpu")
    gpu = GpuCopy(index, kind)
    set_search_value(gpu, Plan(kind, 64), report.search_value)
    _, cpu_rows = search(index, queries[1000:], 10)
    _, gpu_rows = search(gpu, queries[1000:], 10)
    tolerance = 1 - report.recall_at_10 + 0.02
    assert overlap(gpu_rows, cpu_rows) >= 1 - tolerance, kind
    assert overlap(gpu_rows, exact_rows[1000:]) >= report.recall_at_10 - 0.02, kind


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-sq8"])
def test_gpu_built_index_is_a_cpu_index_that_answers_on_the_cpu(kind, data, tmp_path):
    vectors, queries, (_, exact_rows, _) = data
    index, report = build_faiss_index(vectors, queries[:1000], kind=kind, device="cuda")
    assert report.device == "cuda" and report.recall_at_10 >= 0.9
    path = tmp_path / "index.faiss"
    faiss.write_index(index, str(path))  # a GPU index could not be written: this one is the CPU's
    loaded = faiss.read_index(str(path))
    assert not type(faiss.downcast_index(loaded)).__name__.startswith("Gpu")
    _, rows = search(loaded, queries[1000:], 10)
    assert overlap(rows, exact_rows[1000:]) >= report.recall_at_10 - 0.02


def test_cli_build_on_gpu_then_lookup_and_phrases_on_cpu_and_gpu(random_store, random_pairs, tmp_path):
    index = tmp_path / "index"
    run_cli("index", "build", "--pairs", random_pairs, "--images", random_store, "--out", index,
            "--kind", "ivf-flat", "--device", "cuda", check=True)
    meta = read_meta(index)
    assert meta["index"]["device"] == "cuda"
    emb = embeddings_to_numpy(EmbeddingStore(random_store).read_table(["emb"])["emb"])[:500]
    _, cpu_rows = PhraseIndex(index, device="cpu").search(emb, 10)
    on_gpu = PhraseIndex(index, device="cuda")
    _, gpu_rows = on_gpu.search(emb, 10)
    assert isinstance(on_gpu.searcher(10), GpuCopy)
    assert overlap(gpu_rows, cpu_rows) >= meta["recall_at_10"] - 0.02

    stores = {}
    for device in ("cpu", "cuda"):
        stores[device] = tmp_path / f"phrases-{device}"
        run_cli("phrases", "--index", index, "--images", random_store, "--out", stores[device], "-k", "3",
                "--device", device, check=True)
    cpu_table, gpu_table = (EmbeddingStore(stores[d]).read_table(["id", "phrases"]).sort_by("id") for d in ("cpu", "cuda"))
    assert cpu_table["id"].to_pylist() == gpu_table["id"].to_pylist()
    same = np.mean([set(a) == set(b) for a, b in zip(cpu_table["phrases"].to_pylist(), gpu_table["phrases"].to_pylist())])
    assert same >= meta["recall_at_10"] - 0.05
