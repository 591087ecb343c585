"""`extract images --replicas`: single-threaded model replicas in spawned processes (issue 16).

The replicas only map batches; this process's StoreWriter writes, so the store must equal the
single-process path's: the same ids, errors and counts, vectors within float tolerance. Stopping
them (Ctrl-C, SIGTERM, SIGKILL): tests/faults/test_interrupt_replicas.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.extract import jobs
from phrasefuse.extract.jobs import extract_images, planned_replicas
from phrasefuse.store import EmbeddingStore, verify_store
from tests.extract.test_jobs import dataset_with_bad_rows  # noqa: F401 - the fixture

COUNTS = ("embedded", "reused", "present", "failed")


def counts(summary) -> tuple:
    return tuple(getattr(summary, name) for name in COUNTS)


def with_copies(manifest, name: str, rows: int):
    """`manifest` plus its first `rows` rows again under new ids (the same bytes: embedded once)."""
    table = pq.read_table(manifest)
    copies = table.slice(0, rows)
    copies = copies.set_column(0, "id", pa.array([f"copy-{i}" for i in copies["id"].to_pylist()]))
    path = manifest.parent / name
    pq.write_table(pa.concat_tables([table, copies]), path)
    return path


def store_vectors(path) -> dict:
    ids, emb = EmbeddingStore(path).embeddings()
    return dict(zip(list(ids), np.asarray(emb)))


def store_errors(path) -> dict:
    return dict(zip(*EmbeddingStore(path).errors().select(["id", "reason"]).to_pydict().values()))


def test_replicas_store_equals_the_single_process_store(dataset_with_bad_rows, tiny_clip_spec,  # noqa: F811
                                                        tmp_path):
    manifest, bad = dataset_with_bad_rows
    manifest = with_copies(manifest, "with-copies.parquet", 12)
    one = extract_images(manifest, tmp_path / "one", model=tiny_clip_spec, batch_size=16, workers=0,
                         shard_size=50, device="cpu", progress=False, replicas=1)
    two = extract_images(manifest, tmp_path / "two", model=tiny_clip_spec, batch_size=16, workers=0,
                         shard_size=50, device="cpu", progress=False, replicas=2)
    assert counts(two) == counts(one) == (190, 11, 0, 11)  # one of the 12 copied rows is a bad one
    single, replicas = store_vectors(tmp_path / "one"), store_vectors(tmp_path / "two")
    assert sorted(replicas) == sorted(single) and len(single) == 201
    np.testing.assert_allclose(np.stack([replicas[i] for i in single]), np.stack(list(single.values())),
                               atol=1e-5)
    errors = store_errors(tmp_path / "one")
    assert store_errors(tmp_path / "two") == errors and set(bad) <= set(errors) and len(errors) == 11
    assert verify_store(EmbeddingStore(tmp_path / "two")) == []


def test_replicas_resume_and_skip_content_already_in_the_store(dataset_with_bad_rows, tiny_clip_spec,  # noqa: F811
                                                               tmp_path):
    manifest, _ = dataset_with_bad_rows
    out = tmp_path / "img"
    args = dict(model=tiny_clip_spec, batch_size=16, shard_size=50, device="cpu", progress=False, replicas=2)
    first = extract_images(manifest, out, limit=100, **args)
    resumed = extract_images(manifest, out, **args)
    assert resumed.present == first.embedded and first.embedded + resumed.embedded == 190
    # Every row's bytes again under new ids: the replicas get the store's keys, hash and skip them.
    table = pq.read_table(manifest)
    renamed = table.set_column(0, "id", pa.array([f"new-{i}" for i in table["id"].to_pylist()]))
    pq.write_table(renamed, manifest.parent / "renamed-for-replicas.parquet")  # image paths: beside the manifest
    copied = extract_images(manifest.parent / "renamed-for-replicas.parquet", out, **args)
    assert counts(copied) == (0, 190, 0, 10)
    vectors = store_vectors(out)
    assert all(np.array_equal(vectors[f"new-{i}"], vectors[i]) for i in table["id"].to_pylist() if i in vectors)


def test_auto_replicas_only_for_a_cpu_model_on_several_cores_and_enough_rows(monkeypatch):
    import phrasefuse.engine as engine

    monkeypatch.setattr(engine, "cpu_cores", lambda: 4)
    monkeypatch.setattr(jobs, "_on_cuda", lambda device: device == "cuda")
    many = jobs.AUTO_REPLICA_ROWS
    assert planned_replicas("auto", "cpu", "local", many) == 4
    assert planned_replicas("auto", "auto", "local", many) == 4  # no CUDA visible
    assert planned_replicas("auto", "cpu", "local", many - 1) == 1
    assert planned_replicas("auto", "cuda", "local", many) == 1  # the CUDA path is unchanged
    assert planned_replicas("auto", "cpu", "ray", many) == 1
    assert planned_replicas("3", "cpu", "local", 5) == 3  # asked for: whatever the size
    monkeypatch.setattr(jobs, "available_memory", lambda: 2 * jobs.AUTO_REPLICA_MEMORY + 1)
    assert planned_replicas("auto", "cpu", "local", many) == 2  # two fit in memory: two of two threads
    monkeypatch.setattr(jobs, "available_memory", lambda: jobs.AUTO_REPLICA_MEMORY - 1)
    assert planned_replicas("auto", "cpu", "local", many) == 1
    monkeypatch.setattr(jobs, "available_memory", lambda: 1 << 50)
    monkeypatch.setattr(engine, "cpu_cores", lambda: 1)
    assert planned_replicas("auto", "cpu", "local", many) == 1
    for bad, device, engine_name in (("0", "cpu", "local"), ("two", "cpu", "local"), ("2", "cuda", "local"),
                                     ("2", "cpu", "ray")):
        with pytest.raises(BadInput, match="--replicas"):
            planned_replicas(bad, device, engine_name, many)


def test_auto_keeps_the_single_process_path_for_a_tiny_model(shapes_dataset, tiny_clip_spec, tmp_path, monkeypatch):
    """Enough rows for auto to start replicas, but the model is below AUTO_REPLICA_PARAMETERS:
    they are stopped and the job runs as it always did (the DataLoader path)."""
    from phrasefuse.extract import mappers

    monkeypatch.setattr(jobs, "AUTO_REPLICA_ROWS", 10)
    monkeypatch.setattr(mappers, "embed_images_replicas", None)  # would fail if called
    summary = extract_images(shapes_dataset, tmp_path / "img", model=tiny_clip_spec, workers=0, device="cpu",
                             progress=False, replicas="auto")
    assert summary.embedded == pq.read_metadata(shapes_dataset).num_rows
