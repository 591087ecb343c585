"""`extract images` / `extract texts` on every input kind (issue 14): the same content keys
(sha256 of the bytes) and vectors as the files, errors.parquet for a corrupt member, resume."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from phrasefuse.extract.jobs import extract_images, extract_texts
from phrasefuse.manifests import Source
from phrasefuse.store import EmbeddingStore
from tests import inputs_data as data
from tests.conftest import run_cli


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return data.tar_shards(tmp_path_factory.mktemp("tars") / "shards", shards=3, per_shard=4)


def keys_of(store) -> dict[str, str]:
    t = EmbeddingStore(store).ids_and_keys()
    return dict(zip(t["id"].to_pylist(), t["key"].to_pylist()))


def test_tars_embed_members_like_files_and_record_the_corrupt_one(shards, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    summary = extract_images(str(shards / "{00000..00002}.tar"), out, model=tiny_clip_spec, workers=1,
                             batch_size=3, shard_size=4, progress=False)
    assert (summary.rows, summary.embedded, summary.failed) == (12, 11, 1)
    keys = keys_of(out)
    assert keys["000020002"] == sha(data.tar_jpeg(2, 2))  # content key = sha256 of the member's bytes
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert errors == [{"id": "000010003", "reason": "not an image (unknown format)"}]
    # the same bytes as a file give the same vector
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.jpg").write_bytes(data.tar_jpeg(2, 2))
    extract_images(tmp_path / "f", tmp_path / "files", model=tiny_clip_spec, workers=0, progress=False)
    from_file = EmbeddingStore(tmp_path / "files").lookup(np.array(["a.jpg"]))[0]
    from_tar = EmbeddingStore(out).lookup(np.array(["000020002"]))[0]
    np.testing.assert_allclose(from_tar, from_file, atol=1e-6)
    # the second run: nothing embedded, the corrupt member retried (and failing again)
    again = extract_images(str(shards / "*.tar"), out, model=tiny_clip_spec, workers=0, progress=False)
    assert (again.present, again.embedded, again.failed) == (11, 0, 1)


def test_tar_text_columns_from_txt_and_json(shards, tiny_clip_spec, tmp_path):
    for col in ("txt", "title", "tags"):
        s = extract_texts(str(shards / "*.tar"), col, tmp_path / col, model=tiny_clip_spec, progress=False)
        assert (s.rows, s.failed) == (12, 0)
    assert keys_of(tmp_path / "txt")["000000001"] == sha("a photo number 000000001".encode())
    assert keys_of(tmp_path / "tags")["000000001"] == sha(b"x, y")


def test_folder_parquet_bytes_and_struct_columns(tiny_clip_spec, tmp_path):
    folder = data.image_folder(tmp_path / "imgs")
    s = extract_images(folder, tmp_path / "f", model=tiny_clip_spec, workers=0, progress=False)
    assert (s.embedded, s.failed) == (12, 0)
    assert keys_of(tmp_path / "f")["validation/dog/2.jpg"] == sha((folder / "validation/dog/2.jpg").read_bytes())

    path = data.bytes_parquet(tmp_path / "b.parquet", n=6)
    s = extract_images(Source(str(path), id_col="key", image_col="jpg"), tmp_path / "b", model=tiny_clip_spec,
                       workers=0, progress=False, shard_size=2)
    assert (s.embedded, s.failed) == (6, 0) and keys_of(tmp_path / "b")["p5"] == sha(data.jpeg(2005))

    path = data.struct_parquet(tmp_path / "hf.parquet")
    s = extract_images(path, tmp_path / "s", model=tiny_clip_spec, workers=0, progress=False)
    assert (s.embedded, s.failed) == (4, 1)
    assert pq.read_table(tmp_path / "s" / "errors.parquet").to_pylist() == [
        {"id": "s4", "reason": "no image bytes in this row"}]


def test_cli_maps_columns_and_names_a_missing_one(tiny_clip_spec, tmp_path):
    path = data.bytes_parquet(tmp_path / "b.parquet", n=3)
    ok = run_cli("extract", "images", path, "--id-col", "key", "--image-col", "jpg", "--out", tmp_path / "b",
                 "--model", tiny_clip_spec, "--workers", "0", "--json", check=True)
    assert '"embedded": 3' in ok.stdout
    bad = run_cli("extract", "texts", path, "--id-col", "nokey", "--col", "caption", "--out", tmp_path / "t")
    assert bad.returncode == 2 and "no column 'nokey'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_tar_resume_after_sigkill(shards, tiny_clip_spec, tmp_path):
    pytest.importorskip("phrasefuse.faultpoints")
    out = tmp_path / "img"
    args = ["extract", "images", str(shards / "*.tar"), "--out", out, "--model", tiny_clip_spec,
            "--workers", "0", "--batch-size", "1", "--shard-size", "2"]
    os.environ["PHRASEFUSE_FAULT"] = "shard-renamed@2:kill"
    try:
        killed = run_cli(*args)
    finally:
        del os.environ["PHRASEFUSE_FAULT"]
    assert killed.returncode == -9
    kept = EmbeddingStore(out).ids_and_keys()["id"].to_pylist()
    assert len(kept) == 4  # two whole shards
    s = extract_images(str(shards / "*.tar"), out, model=tiny_clip_spec, workers=0, batch_size=1, shard_size=2,
                       progress=False)
    assert (s.present, s.embedded, s.failed) == (4, 7, 1)
    ids = EmbeddingStore(out).ids_and_keys()["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 11
