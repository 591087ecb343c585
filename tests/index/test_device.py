"""Where FAISS runs (--device auto|cpu|cuda) and how big the batches are, on any machine: the choice
as pure functions of what FAISS reports and of the device's memory (given figures, no GPU needed),
`auto` on this machine, and `cuda` refused with one line where FAISS sees no GPU."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.index.ann import build_faiss_index, make_index, train_with_clustering_index
from phrasefuse.index.devices import (GPU_MAX_SELECT, choose_device, faiss_device, faiss_gpus, gpu_refusal,
                                      search_device)
from phrasefuse.index.kinds import Plan
from phrasefuse.index.tuning import search
from phrasefuse.index.folder import PhraseIndex
from phrasefuse.index.phrases import (DEFAULT_BATCH, DEFAULT_TEXT_BATCH, GPU_SEARCH_BATCH_MAX, GPU_TEXT_BATCH_MAX,
                                      batch_sizes)
from phrasefuse.store import l2_normalize
from tests.conftest import run_cli
from tests.index.conftest import read_meta

GIB = 2**30
FAISS_SEES_A_GPU = faiss_gpus()[1] > 0


@pytest.mark.parametrize("requested, support, gpus, expected", [
    ("auto", False, 0, "cpu"), ("auto", True, 0, "cpu"), ("auto", True, 1, "cuda"), ("auto", True, 8, "cuda"),
    ("cpu", True, 1, "cpu"), ("cpu", False, 0, "cpu"), ("cuda", True, 1, "cuda"),
])
def test_choose_device(requested, support, gpus, expected):
    assert choose_device(requested, support, gpus) == expected


@pytest.mark.parametrize("support, gpus, says", [
    (False, 0, "CPU-only build (faiss-cpu); install the gpu extra ('make install GPU=1')"),
    (True, 0, "FAISS sees no GPU; use --device cpu or --device auto"),
])
def test_cuda_without_a_gpu_is_one_line(support, gpus, says):
    with pytest.raises(BadInput) as e:
        choose_device("cuda", support, gpus)
    assert says in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("--device cuda: ")


def test_unknown_device_is_refused():
    with pytest.raises(BadInput, match="--device tpu: expected auto, cpu or cuda"):
        choose_device("tpu", True, 1)


def test_what_the_gpu_cannot_search():
    assert gpu_refusal("hnsw") == "FAISS has no GPU version of a hnsw index"
    for kind in ("flat", "ivf-flat", "ivf-sq8", "ivf-pq"):
        assert gpu_refusal(kind, 64, 10, (32, 8)) is None, kind
    assert "nprobe=4096" in gpu_refusal("ivf-flat", 2 * GPU_MAX_SELECT, 10)
    assert gpu_refusal("ivf-flat", 8, 600) is None  # 600 candidates fit
    assert "k=2400" in gpu_refusal("ivf-sq8", 8, 600)  # re-ranking asks the GPU for 4x k
    assert gpu_refusal("ivf-pq", 8, 10, (64, 8)) is None
    assert "not PQ256x8" in gpu_refusal("ivf-pq", 8, 10, (256, 8))  # 512-d: dim/2 bytes, too large for the GPU
    assert "not PQ16x6" in gpu_refusal("ivf-pq", 8, 10, (16, 6))


def test_auto_never_fails_here_and_follows_faiss():
    assert faiss_device("auto") == ("cuda" if FAISS_SEES_A_GPU else "cpu")
    assert faiss_device("cpu") == "cpu"
    assert search_device("hnsw", "auto") == "cpu"  # no GPU HNSW: auto searches it on the CPU


@pytest.mark.skipif(not FAISS_SEES_A_GPU, reason="the refusal needs a GPU FAISS with a GPU")
def test_cuda_refuses_what_the_gpu_cannot_search():
    with pytest.raises(BadInput, match="--device cuda: FAISS has no GPU version of a hnsw index"):
        search_device("hnsw", "cuda")


def test_batch_sizes_on_cpu_stay_the_measured_defaults():
    for memory in (0, GIB, 80 * GIB):
        assert batch_sizes("cpu", "cpu", memory, 512) == (DEFAULT_BATCH, DEFAULT_TEXT_BATCH)


def test_batch_sizes_follow_gpu_memory():
    small, medium, large = (batch_sizes("cuda", "cuda", m * GIB, 512) for m in (1, 8, 80))
    assert small == (DEFAULT_BATCH, DEFAULT_TEXT_BATCH)  # 1 GiB: the CPU's sizes (nothing smaller needed)
    assert medium == (65_536, 2048)  # 8 GiB: 2% for queries of 2 KiB, 25% for texts of 1 MiB, powers of two
    assert large == (GPU_SEARCH_BATCH_MAX, GPU_TEXT_BATCH_MAX)  # an 80 GiB device: the caps
    sizes = [batch_sizes("cuda", "cuda", m * GIB // 4, 512) for m in range(0, 400)]
    assert sizes == sorted(sizes)  # never smaller on a larger device
    assert batch_sizes("cuda", "cuda", 8 * GIB, 2048)[0] == 16_384  # wider vectors, fewer per batch
    assert batch_sizes("cuda", "cpu", 80 * GIB, 512) == (GPU_SEARCH_BATCH_MAX, DEFAULT_TEXT_BATCH)  # each its own device


def test_auto_build_saves_a_cpu_index_and_says_where_it_ran(random_store, random_pairs, tmp_path):
    out = tmp_path / "index"
    run_cli("index", "build", "--pairs", random_pairs, "--images", random_store, "--out", out,
            "--kind", "ivf-flat", "--device", "auto", check=True)
    meta = read_meta(out)
    assert meta["index"]["device"] == faiss_device("auto")
    index = faiss.read_index(str(out / "index.faiss"))
    assert type(faiss.downcast_index(index)).__name__ == "IndexIVFFlat"  # the CPU class, whatever the device
    emb = l2_normalize(np.random.default_rng(3).standard_normal((50, 32)).astype(np.float32))
    cpu_scores, cpu_rows = PhraseIndex(out, device="cpu").search(emb, 10)
    auto_scores, auto_rows = PhraseIndex(out, device="auto").search(emb, 10)
    same = np.mean([len(set(a) & set(c)) / 10 for a, c in zip(auto_rows, cpu_rows)])
    assert same >= meta["recall_at_10"] - 0.05  # equal on a CPU; within the reported recall on a GPU


def test_build_index_on_cpu_device_records_cpu():
    vectors = l2_normalize(np.random.default_rng(4).standard_normal((3000, 16)).astype(np.float32))
    index, report = build_faiss_index(vectors, vectors[:200], kind="ivf-flat", device="cpu")
    assert report.device == "cpu" and report.kind == "ivf-flat"
    _, rows = search(index, vectors[:5], 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]  # each vector finds itself


@pytest.mark.skipif(FAISS_SEES_A_GPU, reason="FAISS sees a GPU here: --device cuda is valid")
def test_cuda_without_a_gpu_exits_2_with_one_line_and_writes_nothing(random_store, random_pairs, shapes_index,
                                                                      shapes_dataset, tmp_path):
    image = next(shapes_dataset.parent.rglob("*.jpg"))
    for args, out in [
        (("index", "build", "--pairs", random_pairs, "--images", random_store, "--out", tmp_path / "i"), tmp_path / "i"),
        (("phrases", "--index", shapes_index, "--images", random_store, "--out", tmp_path / "p"), tmp_path / "p"),
        (("index", "lookup", shapes_index, image), None),
    ]:
        proc = run_cli(*args, "--device", "cuda")
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("phrasefuse: error: --device cuda: "), proc.stderr
        assert "--device auto" in lines[0] and proc.stdout == ""
        assert out is None or not out.exists()


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-sq8", "ivf-pq"])
def test_training_through_a_clustering_index_is_the_same_training(kind):
    """The hook the GPU path trains through (there, a GPU flat index): with a CPU flat index it must
    give the very centroids of plain training, and leave the index pointing at nothing."""
    vectors = l2_normalize(np.random.default_rng(5).standard_normal((4000, 16)).astype(np.float32))
    plan = Plan(kind, 16, nlist=16, pq_m=8 if kind == "ivf-pq" else 0, pq_nbits=4 if kind == "ivf-pq" else 0)
    plain, hooked = make_index(plan, seed=0), make_index(plan, seed=0)
    plain.train(vectors)
    train_with_clustering_index(hooked, vectors, faiss.IndexFlatIP(16))
    centroids = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 16) for i in (plain, hooked)]
    np.testing.assert_allclose(centroids[0], centroids[1], atol=1e-5)
    assert hooked.is_trained and faiss.extract_index_ivf(hooked).clustering_index is None
    wrong = make_index(plan, seed=0)
    with pytest.raises(RuntimeError):  # the hook is what assigns: one of another dimension fails
        train_with_clustering_index(wrong, vectors, faiss.IndexFlatIP(8))
    assert faiss.extract_index_ivf(wrong).clustering_index is None


def test_phrases_batch_sizes_follow_the_device_unless_given(shapes_index, shapes_img_store, tmp_path):
    from phrasefuse.index.phrases import generate_phrases

    on_cpu = generate_phrases(shapes_index, shapes_img_store, tmp_path / "cpu", device="cpu")
    assert (on_cpu.search_device, on_cpu.batch_size, on_cpu.text_batch_size) == ("cpu", DEFAULT_BATCH, DEFAULT_TEXT_BATCH)
    given = generate_phrases(shapes_index, shapes_img_store, tmp_path / "given", device="auto", batch_size=7,
                             text_batch_size=3)
    assert (given.search_device, given.batch_size, given.text_batch_size) == (faiss_device("auto"), 7, 3)
    assert given.written == on_cpu.written == 60 and given.phrases_embedded == on_cpu.phrases_embedded
