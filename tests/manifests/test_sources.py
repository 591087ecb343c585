"""Every MANIFEST source reads as the same manifest table (issue 14): folders (with and without
classes, a split level), WebDataset tars, Parquet with image bytes; column mapping; bad input."""

from __future__ import annotations

import tarfile

import pyarrow as pa
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.manifests import Source, image_chunks, read_manifest
from phrasefuse.manifests.sources import expand_braces
from tests import inputs_data as data


def test_folder_with_classes_and_splits(tmp_path):
    root = data.image_folder(tmp_path / "imgs")
    m = read_manifest(root, require_image=True)
    t = m.table.to_pydict()
    assert len(m) == 12 and t["id"][0] == "train/cat/0.jpg"
    assert set(t["label"]) == {"cat", "dog"} and set(t["split"]) == {"train", "val"}  # validation -> val
    assert all(p.startswith(str(root.resolve())) for p in t["image"])


def test_folder_without_classes_has_no_label_and_hash_splits(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.png").write_bytes(data.jpeg(i))
    (root / "notes.txt").write_text("not an image")
    m = read_manifest(root)
    assert sorted(m.ids.to_pylist()) == [f"{i}.png" for i in range(5)]
    assert "label" not in m.table.column_names and set(m.table["split"].to_pylist()) <= {"train", "val", "test"}


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(BadInput, match="no image files"):
        read_manifest(tmp_path)


def test_brace_ranges_keep_zero_padding():
    assert expand_braces("s/{00008..00010}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]


def test_tar_shards_give_one_row_per_key_with_text_json_and_cls(tmp_path):
    root = data.tar_shards(tmp_path / "shards")
    m = read_manifest(str(root / "{00000..00001}.tar"), require_image=True)
    t = m.table.to_pydict()
    assert t["id"] == [f"{s:05d}{i:04d}" for s in range(2) for i in range(4)]
    assert t["txt"][1] == "a photo number 000000001" and t["title"][5] == "title 000010001"
    assert t["tags"][0] == ["x", "y"] and "width" not in t  # numbers are not text columns
    assert t["label"] == ["0", "1"] * 4
    # the member's bytes are where the row says
    with open(t["image"][2], "rb") as f:
        f.seek(t["_offset"][2])
        assert f.read(t["_size"][2]) == data.tar_jpeg(0, 2)
    assert read_manifest(str(root / "*.tar")).ids.to_pylist() == t["id"]  # a glob: the same rows


def test_tar_duplicate_key_and_bad_json_name_shard_and_key(tmp_path):
    root = data.tar_shards(tmp_path / "shards")
    with tarfile.open(root / "00002.tar", "w") as tar:
        data.add_member(tar, "000000001.jpg", data.jpeg(1))
    with pytest.raises(BadInput, match=r"00002.tar: row 1: id '000000001' is duplicated"):
        read_manifest(str(root / "*.tar"))
    with tarfile.open(root / "00002.tar", "w") as tar:
        data.add_member(tar, "k9.jpg", data.jpeg(1))
        data.add_member(tar, "k9.json", b"{not json")
    with pytest.raises(BadInput, match=r"00002.tar: sample 'k9': k9.json is not valid JSON"):
        read_manifest(str(root / "*.tar"))
    (root / "00002.tar").write_bytes(b"garbage" * 200)
    with pytest.raises(BadInput, match=r"00002.tar: not a readable tar"):
        read_manifest(str(root / "*.tar"))
    with pytest.raises(BadInput, match=r"00003.tar: no such file"):
        read_manifest(str(root / "{00000..00007}.tar"))


def test_bytes_parquet_with_column_mapping_streams_the_pending_bytes(tmp_path):
    path = data.bytes_parquet(tmp_path / "b.parquet", n=6)
    m = read_manifest(Source(str(path), id_col="key", image_col="jpg", label_col="cls"), require_image=True)
    assert m.image_bytes == "jpg" and "jpg" not in m.table.column_names  # the bytes stay on disk
    assert m.ids.to_pylist() == [f"p{i}" for i in range(6)] and m.table["label"].to_pylist()[:2] == ["cat", "dog"]
    todo = m.table.take(pa.array([1, 4, 5]))  # across two row groups
    chunks = list(image_chunks(todo, m.image_bytes, rows=4))
    got = {i: b for c in chunks for i, b in zip(c["id"].to_pylist(), c["_bytes"].to_pylist())}
    assert got == {"p1": data.jpeg(2001), "p4": data.jpeg(2004), "p5": data.jpeg(2005)}
    with pytest.raises(BadInput, match="no column 'nope'.*--id-col"):
        read_manifest(Source(str(path), id_col="nope", image_col="jpg"))


def test_struct_image_column_and_split_aliases(tmp_path):
    path = data.struct_parquet(tmp_path / "hf.parquet")
    m = read_manifest(path, require_image=True)
    assert m.image_bytes == "image" and m.table["split"].to_pylist() == ["train", "val", "val", "test", "train"]
    chunk = next(image_chunks(m.table, m.image_bytes))
    assert chunk["_bytes"].to_pylist()[0] == data.jpeg(3000) and chunk["_bytes"].to_pylist()[4] is None


def test_tar_label_from_a_json_field_and_image_by_extension(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as tar:
        for key, kind in (("k1", "cat"), ("k2", "dog")):
            data.add_member(tar, f"{key}.png", data.jpeg(1))  # bytes are read, not judged by the name
            data.add_member(tar, f"{key}.jpg", data.jpeg(2))
            data.add_member(tar, f"{key}.json", f'{{"kind": "{kind}", "split": "validation"}}'.encode())
    m = read_manifest(Source(str(root / "a.tar"), image_col="png", label_col="kind"))
    assert m.table["label"].to_pylist() == ["cat", "dog"] and m.table["split"].to_pylist() == ["val", "val"]
    with open(m.table["image"][0].as_py(), "rb") as f:
        f.seek(m.table["_offset"][0].as_py())
        assert f.read(m.table["_size"][0].as_py()) == data.jpeg(1)


def test_parquet_bytes_come_in_chunks_bounded_by_bytes_not_only_rows(tmp_path):
    """b28: 2,048 rows of 2 MB made one 4 GB chunk; a chunk now holds under `max_bytes` of image bytes
    before its last row (and at most `rows` rows), its boundaries following from the row sizes alone."""
    import pyarrow.parquet as pq

    from phrasefuse.manifests.sources import byte_chunks

    sizes = [300, 50, 700, 120, 2500, 10, 10, 900, 400, 64, 1300, 5, 600, 1, 1, 1, 1, 1]
    cells = [bytes([i]) * size for i, size in enumerate(sizes)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(sizes))], "image": pa.array(cells, pa.large_binary())}),
                   path, row_group_size=5)  # row groups and reads do not line up with the chunks
    m = read_manifest(path, require_image=True)
    expected, current, used = [], [], 0  # a row joins while the chunk's bytes before it are under 1,000
    for size in sizes:
        if current and (used >= 1000 or len(current) == 4):
            expected, current, used = expected + [current], [], 0
        current, used = current + [size], used + size
    expected.append(current)
    chunks = list(image_chunks(m.table, m.image_bytes, rows=4, max_bytes=1000))
    got = [[len(b) for b in c["_bytes"].to_pylist()] for c in chunks]
    assert got == expected == [[300, 50, 700], [120, 2500], [10, 10, 900, 400], [64, 1300], [5, 600, 1, 1],
                               [1, 1, 1]]
    assert [b for c in chunks for b in c["_bytes"].to_pylist()] == cells  # every row once, in order
    assert [i for c in chunks for i in c["id"].to_pylist()] == m.ids.to_pylist()
    assert len(list(image_chunks(m.table, m.image_bytes))) == 1  # the default budget: one chunk here
    assert list(byte_chunks([], 4, 1000)) == []
