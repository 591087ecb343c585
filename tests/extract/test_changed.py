"""Embed-once is keyed by what an item is, not only by its id (b32): a photo replaced at the same
path (even with the same size and its mtime put back), a tar member or Parquet bytes rewritten, a
text changed under the same id are embedded again, and the store then holds only the new vector; a
touched but identical file is not embedded again; a store written before stamps is still read."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from phrasefuse.extract import jobs
from phrasefuse.extract.jobs import extract_images, extract_texts
from phrasefuse.manifests import Source
from phrasefuse.store import STAMP, EmbeddingStore, verify_store
from tests import inputs_data as data


def bmp(seed: int) -> bytes:
    return data.bmp(seed)


@pytest.fixture
def photos(tmp_path):
    return data.bmp_classes(tmp_path / "photos", per_class=3)


def vector(store, id_: str) -> np.ndarray:
    emb, present = EmbeddingStore(store).lookup([id_])
    assert present.all()
    return emb[0]


def extract(manifest, out, spec):
    return extract_images(manifest, out, model=spec, workers=0, batch_size=4, shard_size=4, progress=False)


def test_replaced_photo_same_size_mtime_put_back_is_embedded_again(photos, tiny_clip_spec, tmp_path):
    out = tmp_path / "store"
    extract(photos, out, tiny_clip_spec)
    old = vector(out, "red/0.bmp")
    target = photos / "red" / "0.bmp"
    before = target.stat()
    target.write_bytes(bmp(99))  # other pixels, the same number of bytes
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    again = extract(photos, out, tiny_clip_spec)
    assert (again.changed, again.embedded, again.present) == (1, 1, 5)
    assert "1 changed" in again.text()
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "x.bmp").write_bytes(bmp(99))
    extract(tmp_path / "fresh", tmp_path / "fresh-store", tiny_clip_spec)
    new = vector(out, "red/0.bmp")
    np.testing.assert_allclose(new, vector(tmp_path / "fresh-store", "x.bmp"), atol=1e-6)
    assert not np.allclose(new, old)
    store = EmbeddingStore(out)
    ids = store.ids_and_keys()["id"].to_pylist()
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6  # the old row is gone: one vector per id
    assert verify_store(store) == []
    # a third run: nothing changed, nothing read
    third = extract(photos, out, tiny_clip_spec)
    assert (third.changed, third.embedded, third.present) == (0, 0, 6)


def test_replaced_photo_of_another_size_and_a_swap(photos, tiny_clip_spec, tmp_path):
    """Two photos swapped: both changed, each gets the other's vector (copied: that content is known)."""
    out = tmp_path / "store"
    extract(photos, out, tiny_clip_spec)
    a, b = photos / "red" / "1.bmp", photos / "blue" / "2.bmp"
    va, vb = vector(out, "red/1.bmp"), vector(out, "blue/2.bmp")
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    (photos / "red" / "2.bmp").write_bytes(data.jpeg(5))  # another size
    again = extract(photos, out, tiny_clip_spec)
    assert again.changed == 3
    np.testing.assert_allclose(vector(out, "red/1.bmp"), vb, atol=1e-6)
    np.testing.assert_allclose(vector(out, "blue/2.bmp"), va, atol=1e-6)
    assert verify_store(EmbeddingStore(out)) == []


def test_touched_identical_file_is_hashed_once_not_embedded(photos, tiny_clip_spec, tmp_path, monkeypatch):
    out = tmp_path / "store"
    extract(photos, out, tiny_clip_spec)
    os.utime(photos / "blue" / "1.bmp")  # a new mtime, the same bytes
    again = extract(photos, out, tiny_clip_spec)
    assert (again.changed, again.embedded, again.present) == (0, 0, 6)

    def no_reading(*args, **kwargs):
        raise AssertionError("stamps are fresh: nothing should be read")

    monkeypatch.setattr(jobs, "_content_keys", no_reading)  # the stamp was refreshed by the second run
    assert extract(photos, out, tiny_clip_spec).present == 6


def test_store_without_stamps_is_read_and_gets_them(photos, tiny_clip_spec, tmp_path):
    """A store written before stamps existed: read as before; the next extract fills the stamps
    (reading each file once) and embeds nothing."""
    out = tmp_path / "store"
    extract(photos, out, tiny_clip_spec)
    store = EmbeddingStore(out)
    for shard in store.shard_paths():
        pq.write_table(pq.read_table(shard).drop_columns([STAMP]), shard)
    assert pc.all(pc.is_null(store.ids_keys_stamps()[STAMP])).as_py()
    again = extract(photos, out, tiny_clip_spec)
    assert (again.changed, again.embedded, again.present) == (0, 0, 6)
    assert pc.all(pc.is_valid(store.ids_keys_stamps()[STAMP])).as_py()


def test_rewritten_tar_member_is_embedded_again(tiny_clip_spec, tmp_path):
    shards = data.tar_shards(tmp_path / "tars", shards=1, per_shard=3, corrupt=None)
    out = tmp_path / "store"
    extract(str(shards / "00000.tar"), out, tiny_clip_spec)
    old = vector(out, "000000001")
    with tarfile.open(shards / "00000.tar", "w") as tar:  # the same keys, sample 1 another photo
        for i in range(3):
            data.add_member(tar, f"00000{i:04d}.jpg", data.jpeg(77) if i == 1 else data.tar_jpeg(0, i))
    again = extract(str(shards / "00000.tar"), out, tiny_clip_spec)
    assert (again.changed, again.embedded, again.present) == (1, 1, 2)
    assert not np.allclose(vector(out, "000000001"), old)


def test_rewritten_parquet_bytes_are_embedded_again(tiny_clip_spec, tmp_path):
    path = data.bytes_parquet(tmp_path / "b.parquet", n=3)
    out = tmp_path / "store"
    source = Source(str(path), id_col="key", image_col="jpg")
    extract_images(source, out, model=tiny_clip_spec, workers=0, progress=False)
    old = vector(out, "p2")
    table = pq.read_table(path)
    jpg = table["jpg"].to_pylist()
    jpg[2] = data.jpeg(4242)
    pq.write_table(table.set_column(1, "jpg", pa.array(jpg, pa.binary())), path)
    again = extract_images(source, out, model=tiny_clip_spec, workers=0, progress=False)
    assert (again.changed, again.embedded, again.present) == (1, 1, 2)
    assert not np.allclose(vector(out, "p2"), old)


def test_changed_text_is_embedded_again(tiny_clip_spec, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,caption\na,a red square\nb,a blue circle\nc,a green star\n")
    out = tmp_path / "texts"
    extract_texts(manifest, "caption", out, model=tiny_clip_spec, progress=False)
    manifest.write_text("id,caption\na,a red square\nb,a yellow moon\nc,\n")
    again = extract_texts(manifest, "caption", out, model=tiny_clip_spec, progress=False)
    assert (again.changed, again.embedded, again.present, again.no_text) == (2, 1, 1, 1)
    other = tmp_path / "o.csv"
    other.write_text("id,caption\nz,a yellow moon\n")
    extract_texts(other, "caption", tmp_path / "o", model=tiny_clip_spec, progress=False)
    np.testing.assert_allclose(vector(out, "b"), vector(tmp_path / "o", "z"), atol=1e-6)
    assert not EmbeddingStore(out).lookup(["c"])[1].any()  # an emptied text keeps no old vector


def test_run_reruns_its_extract_stage_for_a_replaced_photo(photos, tiny_clip_spec, tmp_path):
    """`run` skips an extract stage whose inputs did not change: a replaced photo (same size, mtime
    put back) under the same folder is a change of its inputs."""
    from phrasefuse.run.config import load_config
    from phrasefuse.run.pipeline import Layout, RunState, extract_stages, plan_settings

    config_path = tmp_path / "run.toml"
    config_path.write_text(f'work = "work"\n[data]\nmanifest = "{photos}"\n[encoders]\nimage = "{tiny_clip_spec}"\n'
                           f'workers = 0\n[[heads]]\nname = "h"\nkind = "linear"\nfeatures = ["image"]\n')
    config = load_config(config_path)

    def extract_stage():
        layout, state = Layout(config.work), RunState(config.work)
        settings = plan_settings(config)
        return next(r for r in extract_stages(config, layout, state, settings, False) if r.stage == "extract image")

    assert extract_stage().status == "ran"
    assert extract_stage().status == "skipped"
    target = photos / "blue" / "2.bmp"
    before = target.stat()
    target.write_bytes(bmp(1234))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    rerun = extract_stage()
    assert rerun.status == "ran" and rerun.summary["changed"] == 1


def test_job_stopped_after_dropping_a_changed_row_resumes(photos, tiny_clip_spec, tmp_path, monkeypatch):
    """The old row goes first, whole shard or nothing: a job stopped right after leaves the id absent
    (never the old vector, never two), and the next run embeds it."""
    from phrasefuse import faultpoints

    out = tmp_path / "store"
    extract(photos, out, tiny_clip_spec)
    (photos / "red" / "2.bmp").write_bytes(bmp(4321))
    monkeypatch.setattr(faultpoints, "_PLAN", {"shard-revised": (1, "fail")})
    monkeypatch.setattr(faultpoints, "_reached", {})
    with pytest.raises(RuntimeError, match="shard-revised"):
        extract(photos, out, tiny_clip_spec)
    store = EmbeddingStore(out)
    assert "red/2.bmp" not in store.ids_and_keys()["id"].to_pylist() and verify_store(store) == []
    monkeypatch.setattr(faultpoints, "_PLAN", {})
    again = extract(photos, out, tiny_clip_spec)
    assert (again.embedded, again.present, again.changed) == (1, 5, 0)
