"""Streaming `index build` (index/streaming.py): the same phrases and prototypes as the in-memory
reference (pairs.read_pairs + prototypes.prototypes), whatever the --memory and so the number of
query partitions, on the local engine and on a tiny local Ray; and the build's progress (issue 14)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse import engine
from phrasefuse.engine import RayOptions
from phrasefuse.index.build import build_index
from phrasefuse.index.folder import PhraseIndex
from phrasefuse.index.pairs import read_pairs
from phrasefuse.index.prototypes import prototypes
from phrasefuse.index.streaming import StoreLayout, VectorFile, partition_size, stream_prototypes
from phrasefuse.store import EmbeddingStore, StoreWriter, new_meta
from tests.index.conftest import random_encoder

DIM = 16
N_IMAGES = 700
TINY_MEMORY = 32 * 1024  # > the flat index (~300 x 16 x 4 bytes); forces many query partitions


@pytest.fixture(scope="module")
def sharded_store(tmp_path_factory):
    """700 float16 vectors in shards of 97 rows (the last one short)."""
    emb = np.random.default_rng(5).standard_normal((N_IMAGES, DIM)).astype(np.float16)
    path = tmp_path_factory.mktemp("stream") / "img"
    ids = [f"i{j:04d}" for j in range(N_IMAGES)]
    meta = new_meta(modality="image", encoder=random_encoder(DIM), dtype="float16",
                    source={"manifest": "generated", "column": "image"})
    with StoreWriter.open(path, meta, shard_size=97) as writer:
        writer.add(ids, ids, emb)
    return path


@pytest.fixture(scope="module")
def messy_pairs(tmp_path_factory):
    """4,000 weighted rows over ~300 phrases, with what cleaning counts: repeated pairs (the first
    weight wins), ids not in the store, weight 0, empty phrases, rows without an image_id."""
    rng = np.random.default_rng(6)
    n = 4000
    phrase = rng.integers(0, 300, n)
    query = [f"  Query {p}" if p % 3 else f"query   {p} " for p in phrase]
    image = [f"i{j:04d}" for j in rng.integers(0, N_IMAGES, n)]
    weight = rng.uniform(0, 5, n).round(1)  # some 0.0
    for j in range(0, n, 53):
        image[j] = f"absent-{j % 7}"
    for j in range(1, n, 97):
        query[j] = "   "
    for j in range(2, n, 89):
        image[j] = ""
    query[3] = "lonely phrase"  # only with no image: no prototype
    image[3] = ""
    rows = pa.table({"query": query, "image_id": image, "weight": weight})
    path = tmp_path_factory.mktemp("stream") / "pairs.parquet"
    pq.write_table(pa.concat_tables([rows, rows.slice(0, 500)]), path, row_group_size=700)
    return path


def reference(pairs, store_path, min_images):
    """Today's in-memory build: (phrases with a prototype, prototypes, counts, images per phrase)."""
    ids, emb = EmbeddingStore(store_path).embeddings()
    data = read_pairs(pairs, pa.array(ids, pa.string()))
    counts = data.images_per_phrase()
    kept = counts >= min_images
    remap = np.cumsum(kept) - 1
    keep = kept[data.phrase]
    protos, ok = prototypes(remap[data.phrase[keep]], data.image_row[keep], emb, int(kept.sum()), data.weight[keep])
    kept_idx = np.flatnonzero(kept)[ok]
    return data.phrases.take(pa.array(kept_idx)).to_pylist(), protos[ok], data.counts.as_dict(), counts


@pytest.mark.parametrize("memory", [2**30, TINY_MEMORY, 600])
@pytest.mark.parametrize("min_images", [1, 4])
def test_streamed_prototypes_equal_the_in_memory_ones(sharded_store, messy_pairs, tmp_path, memory, min_images):
    names, protos, counts, images = reference(messy_pairs, sharded_store, min_images)
    layout = StoreLayout.of(EmbeddingStore(sharded_store))
    got = stream_prototypes(messy_pairs, layout, tmp_path, memory=memory, min_images=min_images)
    assert got.partitions == 1 if memory == 2**30 else got.partitions > 3
    assert got.phrases.take(pa.array(got.kept)).to_pylist() == names
    vectors = np.fromfile(got.vectors_path, np.float32).reshape(-1, DIM)
    np.testing.assert_allclose(vectors, protos, atol=1e-5)
    assert got.counts.as_dict() == counts
    np.testing.assert_array_equal(got.images_per_phrase, images)
    assert not list(tmp_path.glob("pairs-*.bin"))  # spill files go as their partition is done


def test_more_partitions_as_memory_shrinks():
    sizes = [partition_size(1_000_000, 20_000_000, 256, m) for m in (2**40, 2 * 2**30, 2**28)]
    assert sizes[0] == 1_000_000 and sizes[0] > sizes[1] > sizes[2]
    # within the budget: one partition's sums and its share of the pairs each fit a quarter of it
    assert sizes[1] * 256 * 4 <= 2 * 2**30 / 4


def read_index(path):
    index = PhraseIndex(path)
    faiss_index = index.faiss_index
    return index.table, faiss_index.reconstruct_n(0, faiss_index.ntotal), json.loads((path / "meta.json").read_text())


@pytest.fixture(scope="module")
def whole_build(sharded_store, messy_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "whole"
    build_index(messy_pairs, sharded_store, out, memory=2**30, kind="flat")
    return read_index(out)


def last_progress_line(err: str, label: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{label}: ")]
    assert lines, f"no progress line {label!r} in:\n{err}"
    return lines[-1]


def assert_build_progress(err: str, summary, shard_passes: int) -> None:
    """Each step of the build reached its total: pairs coded, store shards summed (every shard of
    every query partition), vectors added to FAISS."""
    pairs, phrases = summary.pairs["pairs_read"], summary.counts["phrases"]
    for label, total in (("coding pairs", pairs), ("prototype sums", shard_passes), ("FAISS flat", phrases)):
        line = last_progress_line(err, f"index build: {label}")
        assert line.startswith(f"index build: {label}: {total}/{total} (100%), "), line
    assert " shards/s, ETA " in last_progress_line(err, "index build: prototype sums")


def shard_passes(summary, store) -> int:
    """Query partitions (the build's note) x store shards."""
    note = next(n for n in summary.notes if "query partitions" in n)
    return int(re.search(r"in (\d+) query partitions", note).group(1)) * len(EmbeddingStore(store).shard_paths())


def test_index_build_in_many_passes_equals_one_pass(sharded_store, messy_pairs, tmp_path, whole_build,
                                                    monkeypatch, capsys):
    monkeypatch.setattr(engine, "LOG_EVERY", 0.0)  # no terminal: a progress line at every step, no clock raced
    summary = build_index(messy_pairs, sharded_store, tmp_path / "passes", memory=TINY_MEMORY, kind="flat",
                          progress=None)
    table, vectors, meta = read_index(tmp_path / "passes")
    want_table, want_vectors, want_meta = whole_build
    assert table.equals(want_table)
    np.testing.assert_allclose(vectors, want_vectors, atol=1e-5)
    assert meta["counts"] == want_meta["counts"] and meta["pairs"] == want_meta["pairs"]
    assert any("query partitions" in note for note in summary.notes)
    assert_build_progress(capsys.readouterr().err, summary, shard_passes(summary, sharded_store))


def test_index_build_progress_lines_and_none_with_json(sharded_store, messy_pairs, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from phrasefuse.cli import app

    monkeypatch.setattr(engine, "LOG_EVERY", 0.0)
    args = ["index", "build", "--pairs", str(messy_pairs), "--images", str(sharded_store), "--kind", "flat",
            "--memory", str(TINY_MEMORY)]
    text = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "text")])
    assert text.exit_code == 0, text.output
    assert "index build: prototype sums: " in text.stderr and "index build: FAISS flat: " in text.stderr
    as_json = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "json"), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert as_json.stderr == "" and json.loads(as_json.stdout)["counts"]["phrases"] > 0


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_ray_engine_builds_the_same_index(ray_cluster, sharded_store, messy_pairs, tmp_path, whole_build,
                                         monkeypatch, capsys):
    monkeypatch.setattr(engine, "LOG_EVERY", 0.0)
    summary = build_index(messy_pairs, sharded_store, tmp_path / "ray", memory=TINY_MEMORY, kind="flat",
                          engine="ray", ray=RayOptions(address=ray_cluster), progress=None)
    assert_build_progress(capsys.readouterr().err, summary, shard_passes(summary, sharded_store))  # Ray tasks counted
    table, vectors, meta = read_index(tmp_path / "ray")
    want_table, want_vectors, want_meta = whole_build
    assert table.equals(want_table)
    np.testing.assert_allclose(vectors, want_vectors, atol=1e-5)
    assert meta["counts"] == want_meta["counts"]


def test_vector_file_rows_equal_the_array(tmp_path):
    """VectorFile (read with pread, never mapped) returns what indexing the array would."""
    rng = np.random.default_rng(4)
    array = rng.standard_normal((1000, 7)).astype(np.float32)
    array.tofile(tmp_path / "v.f32")
    rows = VectorFile(tmp_path / "v.f32", 1000, 7)
    found = rng.integers(0, 1000, (50, 10))  # the tuning's (queries, k) rows
    sample = np.sort(rng.choice(1000, 300, replace=False))  # the training sample: runs of rows
    for key in (slice(None), slice(10, 500), slice(990, 2000), slice(5, 3), slice(None, None, 7), slice(-5, None),
                found, sample, np.array([-1, 0, 0]), np.zeros(0, np.int64)):
        np.testing.assert_array_equal(rows[key], array[key])
    np.testing.assert_array_equal(np.asarray(rows), array)
    with pytest.raises(IndexError):
        rows[np.array([1000])]
