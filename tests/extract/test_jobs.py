"""The extract jobs on generated data: bad rows, embed-once, refusals.
(Kills, Ctrl-C, locks, full disks and corrupt shards: tests/faults/.)"""

import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.extract.jobs import extract_images, extract_texts
from phrasefuse.store import EmbeddingStore, verify_store
from phrasefuse.synthetic import generate_images
from tests.conftest import TINY_CLIP_CONFIG, invoke_cli, run_cli


def bomb_png(path, w=20000, h=20000):
    """A tiny file that declares 400 M pixels (beyond Pillow's decompression-bomb limit)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def dataset_with_bad_rows(tmp_path_factory):
    """200 rows: 190 good JPEGs and 10 bad ones (missing, empty, truncated, not an image, bomb, no path)."""
    folder = tmp_path_factory.mktemp("bad")
    manifest = generate_images(folder, 200, seed=1, size=(80, 64))
    table = pq.read_table(manifest)
    images = table["image"].to_pylist()
    bad = {}
    for i in (3, 17):
        bad[i] = "file not found"
        images[i] = f"images/missing-{i}.jpg"
    for i in (25, 40):
        (folder / images[i]).write_bytes(b"")
        bad[i] = "empty file"
    for i in (55, 60):
        data = (folder / images[i]).read_bytes()
        (folder / images[i]).write_bytes(data[: len(data) // 3])
        bad[i] = "truncated or corrupt"
    for i in (77, 99):
        (folder / images[i]).write_text("this is not a JPEG")
        bad[i] = "not an image"
    bomb_png(folder / "images" / "bomb.png")
    images[120] = "images/bomb.png"
    bad[120] = "image too large"
    images[150] = None
    bad[150] = "no image path"
    table = table.set_column(table.column_names.index("image"), "image", pa.array(images, pa.string()))
    pq.write_table(table, manifest)
    return manifest, {table["id"][i].as_py(): reason for i, reason in bad.items()}


def store_ids(path):
    return EmbeddingStore(path).ids_and_keys()["id"].to_pylist()


def test_bad_rows_go_to_errors_and_good_ids_are_stored_once(dataset_with_bad_rows, tiny_clip_spec, tmp_path):
    manifest, bad = dataset_with_bad_rows
    out = tmp_path / "img"
    summary = extract_images(manifest, out, model=tiny_clip_spec, batch_size=16, workers=2, shard_size=50,
                             progress=False)
    assert (summary.embedded, summary.failed, summary.present) == (190, 10, 0)
    ids = store_ids(out)
    good = set(pq.read_table(manifest)["id"].to_pylist()) - set(bad)
    assert len(ids) == len(set(ids)) == 190 and set(ids) == good
    errors = dict(zip(*EmbeddingStore(out).errors().to_pydict().values()))
    assert set(errors) == set(bad)
    for ident, reason in bad.items():
        assert reason in errors[ident], (ident, errors[ident])
    assert verify_store(EmbeddingStore(out)) == []
    assert not list(out.glob(".*.phrasefuse-*.tmp-*"))

    # A second run embeds nothing; the bad rows are retried and fail again.
    again = extract_images(manifest, out, model=tiny_clip_spec, workers=0, shard_size=50, progress=False)
    assert (again.embedded, again.reused, again.present, again.failed) == (0, 0, 190, 10)
    assert sorted(store_ids(out)) == sorted(ids)


def test_same_bytes_under_new_ids_are_copied_not_embedded(shapes_dataset, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    extract_images(shapes_dataset, out, model=tiny_clip_spec, workers=0, progress=False)
    table = pq.read_table(shapes_dataset)
    # A second manifest: the same files under other ids, plus one image twice in itself.
    renamed = table.set_column(0, "id", pa.array([f"copy-{i}" for i in table["id"].to_pylist()]))
    renamed = pa.concat_tables([renamed, renamed.slice(0, 1).set_column(0, "id", pa.array(["copy-again"]))])
    second = shapes_dataset.parent / "renamed.parquet"
    pq.write_table(renamed, second)
    summary = extract_images(second, out, model=tiny_clip_spec, workers=0, progress=False)
    assert (summary.embedded, summary.reused) == (0, table.num_rows + 1)
    store = EmbeddingStore(out)
    original, _ = store.lookup(table["id"])
    copied, present = store.lookup(renamed["id"].slice(0, table.num_rows))
    assert present.all()
    np.testing.assert_array_equal(original, copied)


def test_duplicate_images_within_one_run_run_the_model_once(tmp_path, tiny_clip_spec):
    manifest = generate_images(tmp_path, 6, size=(64, 48))
    table = pq.read_table(manifest)
    dup = table.set_column(1, "image", pa.array([table["image"][0].as_py()] * 6))
    pq.write_table(dup, manifest)
    summary = extract_images(manifest, tmp_path / "img", model=tiny_clip_spec, workers=0, progress=False)
    assert (summary.embedded, summary.reused) == (1, 5)
    emb, present = EmbeddingStore(tmp_path / "img").lookup(table["id"])
    assert present.all() and np.allclose(emb, emb[0])


def test_store_of_another_encoder_is_refused(shapes_dataset, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    extract_images(shapes_dataset, out, model=tiny_clip_spec, workers=0, limit=5, progress=False)
    other = tmp_path / "other-tiny-clip.json"  # another tiny CLIP: another dim, other weights
    other.write_text(json.dumps({**TINY_CLIP_CONFIG, "embed_dim": 16}))
    proc = invoke_cli("extract", "images", shapes_dataset, "--out", out, "--workers", "0",
                      "--model", f"open_clip:{other}@")
    assert proc.returncode == 2, proc.stderr
    assert "holds embeddings of" in proc.stderr and str(out) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert EmbeddingStore(out).num_rows() == 5


def test_texts_missing_empty_lists_and_distinct_texts(tmp_path, tiny_clip_spec):
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"id": "a", "title": "red circle", "tags": ["red", "circle"]},
        {"id": "b", "title": "  red circle ", "tags": []},
        {"id": "c", "title": None, "tags": ["blue"]},
        {"id": "d", "title": "", "tags": None},
        {"id": "e", "title": "blue square", "tags": ["blue"]},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = extract_texts(manifest, "title", tmp_path / "title", model=tiny_clip_spec, progress=False)
    assert (summary.embedded, summary.reused, summary.failed) == (2, 1, 2)  # "red circle" once for a and b
    store = EmbeddingStore(tmp_path / "title")
    emb, present = store.lookup(["a", "b", "c", "d", "e"])
    assert present.tolist() == [True, True, False, False, True]
    np.testing.assert_array_equal(emb[0], emb[1])
    assert dict(zip(*store.errors().to_pydict().values())) == {"c": "missing text", "d": "empty text"}
    assert store.meta["source"]["column"] == "title" and store.meta["modality"] == "text"

    tags = extract_texts(manifest, "tags", tmp_path / "tags", model=tiny_clip_spec, progress=False)
    assert (tags.embedded, tags.reused, tags.failed) == (2, 1, 2)  # "red, circle"; "blue" for c and e; b, d none

    # Writing another column into the title store is refused.
    with pytest.raises(BadInput, match="holds embeddings of column 'title'"):
        extract_texts(manifest, "tags", tmp_path / "title", model=tiny_clip_spec, progress=False)
    with pytest.raises(BadInput, match="no column 'caption'"):
        extract_texts(manifest, "caption", tmp_path / "x", model=tiny_clip_spec, progress=False)


def test_texts_cli_with_builtin_encoder_and_inspect(shapes_dataset, tmp_path):
    out = tmp_path / "title"
    proc = run_cli("extract", "texts", shapes_dataset, "--col", "title", "--out", out, check=True)
    assert "embedded" in proc.stdout
    # The resume and `inspect` through cli.main in this process (both run as processes elsewhere).
    again = invoke_cli("extract", "texts", shapes_dataset, "--col", "title", "--out", out, "--json", check=True)
    summary = json.loads(again.stdout)
    assert summary["embedded"] == 0 and summary["present"] > 0
    report = json.loads(invoke_cli("inspect", out, "--verify", "--json", check=True).stdout)
    assert report["dim"] == 384 and report["rows"] == summary["present"] and report["problems"] == []


def test_store_reads_into_one_numpy_view(shapes_dataset, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    extract_images(shapes_dataset, out, model=tiny_clip_spec, workers=0, shard_size=25, progress=False)
    store = EmbeddingStore(out)
    ids, emb = store.embeddings()
    assert emb.shape == (60, 32) and emb.dtype == np.float32 and not emb.flags.owndata  # a view of Arrow memory
    assert len(store.shard_paths()) == 3
    got, present = store.lookup(["nope", ids[5]])
    assert present.tolist() == [False, True]
    np.testing.assert_array_equal(got[0], 0)
    np.testing.assert_array_equal(got[1], emb[5])


def test_negative_workers_are_refused_before_any_work(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.jpg")
    (tmp_path / "m.csv").write_text("id,image\na,a.jpg\n")
    proc = invoke_cli("extract", "images", tmp_path / "m.csv", "--out", tmp_path / "st", "--workers", "-1")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "phrasefuse: error: --workers -1: must be 0 or more (0 decodes in the main process)"]
    assert not (tmp_path / "st").exists()
