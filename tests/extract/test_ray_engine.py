"""`--engine ray`: the same stores as the local engine, on a local Ray of 2 CPUs.

One Ray instance for the module (starting Ray costs seconds); every job runs against it.
Each comparison: the same ids, the same errors, embeddings within 1e-4, and a second run
that embeds nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.engine import RayOptions
from phrasefuse.extract.jobs import extract_images, extract_texts
from phrasefuse.store import EmbeddingStore, embeddings_to_numpy
from phrasefuse.synthetic import generate_images
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 generated JPEGs plus rows that exercise embed-once and errors: 3 new ids on the bytes of
    earlier images, one missing file, one file that is not an image."""
    folder = tmp_path_factory.mktemp("ray-data")
    manifest = generate_images(folder, 40, seed=3, size=(64, 48))
    table = pq.read_table(manifest)
    (folder / "images" / "broken.jpg").write_text("not a JPEG")
    extra = pa.table({"id": ["dup-a", "dup-b", "dup-c", "missing", "broken"],
                      "image": [table["image"][i].as_py() for i in (0, 5, 5)] + ["images/none.jpg", "images/broken.jpg"],
                      "title": ["copy a", "copy b", None, "gone", ""]})
    pq.write_table(pa.concat_tables([table.select(["id", "image", "title"]), extra]), manifest)
    return manifest


def sorted_store(path) -> tuple[list[str], np.ndarray, pa.Table]:
    table = EmbeddingStore(path).read_table().sort_by("id")
    return table["id"].to_pylist(), embeddings_to_numpy(table["emb"]).astype(np.float32), table


def assert_same_store(local, ray_store) -> pa.Table:
    ids_a, emb_a, _ = sorted_store(local)
    ids_b, emb_b, table = sorted_store(ray_store)
    assert ids_a == ids_b
    np.testing.assert_allclose(emb_b, emb_a, atol=1e-4)
    errors_a = EmbeddingStore(local).errors().sort_by("id")
    errors_b = EmbeddingStore(ray_store).errors().sort_by("id")
    assert errors_a.equals(errors_b)
    assert EmbeddingStore(ray_store).meta["encoder"] == EmbeddingStore(local).meta["encoder"]
    return table


@pytest.fixture(scope="module")
def local_images(dataset, tiny_clip_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "img"
    extract_images(dataset, out, model=tiny_clip_spec, workers=0, progress=False)
    return out


def test_images_on_ray_equal_the_local_store_and_resume(ray_cluster, dataset, local_images, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    summary = extract_images(dataset, out, model=tiny_clip_spec, batch_size=8, shard_size=16, progress=False,
                             engine="ray", ray=RayOptions(actors=1))
    assert (summary.embedded, summary.reused, summary.failed) == (40, 3, 2)
    assert_same_store(local_images, out)
    # Written shard by shard by the driver; the copies of known bytes last, as on the local engine.
    assert [pq.read_metadata(p).num_rows for p in EmbeddingStore(out).shard_paths()] == [16, 16, 8, 3]
    again = extract_images(dataset, out, model=tiny_clip_spec, progress=False, engine="ray")
    assert (again.embedded, again.reused, again.present, again.failed) == (0, 0, 43, 2)


def test_texts_on_ray_through_the_cli_equal_the_local_store(ray_cluster, dataset, tiny_clip_spec, tmp_path):
    local = extract_texts(dataset, "title", tmp_path / "local", model=tiny_clip_spec, progress=False)
    # The real CLI, connected to the running cluster by its address; stdout is only the JSON summary.
    proc = run_cli("extract", "texts", dataset, "--col", "title", "--out", tmp_path / "ray", "--model", tiny_clip_spec,
                   "--batch-size", "4", "--engine", "ray", "--ray-address", ray_cluster, "--ray-actors", "1",
                   "--json", check=True)
    summary = argparse.Namespace(**json.loads(proc.stdout))
    # The JSON counts as the text line does: `failed` the broken rows, `no_text` apart, `errors` both.
    assert (summary.embedded, summary.reused, summary.errors, summary.no_text, summary.failed) == (
        local.embedded, local.reused, local.failed, local.no_text, local.failed - local.no_text)
    assert summary.embedded > 0 and summary.no_text >= 3  # the None, "" and dup-c None added, and generated ones
    assert_same_store(tmp_path / "local", tmp_path / "ray")
    again = extract_texts(dataset, "title", tmp_path / "ray", model=tiny_clip_spec, progress=False, engine="ray")
    assert again.embedded == 0 and again.present == summary.rows - summary.errors


def test_phrases_on_ray_equal_the_local_store(ray_cluster, dataset, local_images, tiny_clip_spec, tmp_path):
    from phrasefuse.index.build import build_index
    from phrasefuse.index.phrases import generate_phrases

    table = pq.read_table(dataset)
    ids = EmbeddingStore(local_images).ids_and_keys()["id"].to_pylist()
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": [f"phrase {i % 7}" for i in range(len(ids))], "image_id": ids}), pairs)
    build_index(pairs, local_images, tmp_path / "index")
    local = generate_phrases(tmp_path / "index", local_images, tmp_path / "local", k=3, text_model=tiny_clip_spec)
    ray_run = generate_phrases(tmp_path / "index", local_images, tmp_path / "ray", k=3, text_model=tiny_clip_spec,
                               batch_size=16, engine="ray")
    assert (ray_run.written, ray_run.failed, ray_run.phrases_embedded) == (local.written, 0, local.phrases_embedded)
    assert ray_run.written == len(ids) and table.num_rows == len(ids) + 2
    stored = assert_same_store(tmp_path / "local", tmp_path / "ray")
    assert stored["phrases"].equals(sorted_store(tmp_path / "local")[2]["phrases"])
    again = generate_phrases(tmp_path / "index", local_images, tmp_path / "ray", k=3, text_model=tiny_clip_spec,
                             engine="ray")
    assert again.written == 0 and again.present == len(ids)


def test_the_local_engine_imports_nothing_of_ray(dataset, tiny_clip_spec, tmp_path):
    code = ("import sys\nfrom phrasefuse.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nprint('ray' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, "extract", "texts", str(dataset), "--col", "title",
                           "--out", str(tmp_path / "t"), "--model", tiny_clip_spec], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "False"
    assert proc.stdout.startswith("extract texts (title): ")
