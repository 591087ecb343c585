"""Inputs are read truthfully (the second adversarial pass): no two tar samples merged under one key
(b01), no tar cut short read as whole (b02), hidden and NAS folders never break a class layout and a
stray image is named (b10), a folder confines to itself (b11), tar links (b12), dictionary-encoded
bytes (b13), huge brace ranges (b21), tar globs without .tar (b23), Parquet globs mixing bytes and
paths (b26)."""

from __future__ import annotations

import os
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.manifests import image_chunks, read_manifest
from phrasefuse.manifests.sources import LINK_SIZE, brace_count, expand_braces, is_tar_pattern
from tests import inputs_data as data


def write_tar(path, members) -> None:
    """members: (name, bytes) or (name, ("link"|"symlink", target))."""
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            if isinstance(content, tuple):
                info = tarfile.TarInfo(name)
                info.type = tarfile.LNKTYPE if content[0] == "link" else tarfile.SYMTYPE
                info.linkname = content[1]
                tar.addfile(info)
            else:
                data.add_member(tar, name, content)


# ---------------------------------------------------------------- b01


@pytest.mark.parametrize("members", [
    [("a.jpg", 1), ("a.cls", b"red"), ("a.jpg", 2), ("a.cls", b"green"), ("b.jpg", 3)],  # consecutive
    [("a.jpg", 1), ("a.cls", b"red"), ("b.jpg", 3), ("a.txt", b"late")],  # the key comes back later
])
def test_a_key_used_by_two_samples_of_one_shard_is_refused(tmp_path, members):
    write_tar(tmp_path / "dup.tar", [(n, data.jpeg(c) if isinstance(c, int) else c) for n, c in members])
    with pytest.raises(BadInput, match=r"dup.tar: key 'a' is used by two samples \(a\.(jpg|txt) again at byte \d+\)"):
        read_manifest(tmp_path / "dup.tar")


# ---------------------------------------------------------------- b02


def test_a_tar_cut_at_a_block_boundary_is_refused(tmp_path):
    write_tar(tmp_path / "full.tar", [(f"s{i}.{ext}", data.jpeg(i) if ext == "jpg" else b"x")
                                      for i in range(6) for ext in ("jpg", "cls")])
    assert len(read_manifest(tmp_path / "full.tar")) == 6
    whole = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        members = tar.getmembers()
    (tmp_path / "cut.tar").write_bytes(whole[:members[6].offset])  # cut just before s3.jpg's header
    with pytest.raises(BadInput, match=r"cut.tar: the tar ends without the end-of-archive marker at byte"):
        read_manifest(tmp_path / "cut.tar")
    last = members[-1]
    block = (last.offset_data + last.size + 511) // 512 * 512  # where the end-of-archive marker starts
    garbage = bytearray(whole)
    garbage[block:block + 512] = b"G" * 512  # a header that is not one, where the end marker was
    (tmp_path / "bad.tar").write_bytes(bytes(garbage))
    with pytest.raises(BadInput, match=r"bad.tar: the tar has an unreadable header at byte"):
        read_manifest(tmp_path / "bad.tar")


# ---------------------------------------------------------------- b10


def test_hidden_and_nas_folders_inside_class_folders_are_skipped(tmp_path):
    root = data.image_folder(tmp_path / "f", splits=None, per_class=2)
    for stray in ("cat/.thumbnails/0.jpg", "dog/@eaDir/0.jpg/SYNOFILE_THUMB_M.jpg", "__MACOSX/cat/0.jpg"):
        (root / stray).parent.mkdir(parents=True, exist_ok=True)
        (root / stray).write_bytes(data.jpeg(9))
    m = read_manifest(root)
    assert sorted(m.ids.to_pylist()) == ["cat/0.jpg", "cat/1.jpg", "dog/0.jpg", "dog/1.jpg"]
    assert m.table["label"].to_pylist() == ["cat", "cat", "dog", "dog"] and m.labels_note is None


def test_a_stray_image_that_breaks_the_class_layout_is_named(tmp_path):
    from phrasefuse.fuse.data import label_column

    root = data.image_folder(tmp_path / "f", splits=None, per_class=2)
    (root / "cat" / "extra").mkdir()
    (root / "cat" / "extra" / "x.jpg").write_bytes(data.jpeg(9))
    m = read_manifest(root)
    assert "label" not in m.table.column_names  # unlabeled use (extract) still reads every image
    with pytest.raises(BadInput, match=r"'cat/extra/x.jpg' is not one level inside a class folder"):
        label_column(m, None)


# ---------------------------------------------------------------- b11


def test_a_folder_confines_its_images_to_itself_not_its_parent(tmp_path):
    root = data.image_folder(tmp_path / "photos", splits=None, per_class=1)
    (tmp_path / "secret.jpg").write_bytes(data.jpeg(5))  # beside the folder, not in it
    os.symlink(tmp_path / "secret.jpg", root / "cat" / "link.jpg")
    with pytest.raises(BadInput, match=rf"'cat/link.jpg' resolves outside the manifest's folder {root}; "):
        read_manifest(root, require_image=True)
    assert len(read_manifest(root, require_image=True, allow_outside_paths=True)) == 3


# ---------------------------------------------------------------- b12


def test_tar_link_members_are_followed_inside_the_shard_or_named(tmp_path):
    from phrasefuse.extract.images import image_sources, read_source

    write_tar(tmp_path / "s.tar", [("a.jpg", data.jpeg(1)), ("b.jpg", ("link", "a.jpg")), ("b.cls", b"x"),
                                   ("c.jpg", ("symlink", "/etc/passwd")), ("d.cls", b"no image")])
    m = read_manifest(tmp_path / "s.tar", require_image=True)
    assert m.table["image"].to_pylist() == [str((tmp_path / "s.tar").resolve())] * 4  # never None
    got = dict(zip(m.ids.to_pylist(), (read_source(s) for s in image_sources(next(image_chunks(m.table, None))))))
    assert got["b"] == got["a"] == (data.jpeg(1), None)  # a hard link: the bytes of the member it names
    assert got["c"][0] is None and "is a symbolic link (links are not followed)" in got["c"][1]
    shard = (tmp_path / "s.tar").resolve()
    assert got["d"] == (None, f"no image member (.jpg, .jpeg, .png, .webp) in this sample of {shard}")
    assert m.table["_size"].to_pylist()[2] == LINK_SIZE


# ---------------------------------------------------------------- b13


def test_dictionary_encoded_image_bytes_are_read(tmp_path):
    images = [data.jpeg(i % 2) for i in range(4)]
    pq.write_table(pa.table({"id": list("abcd"), "image": pa.array(images, pa.binary()).dictionary_encode()}),
                   tmp_path / "d.parquet")
    m = read_manifest(tmp_path / "d.parquet", require_image=True)
    assert m.image_bytes == "image"
    chunk = pa.concat_tables(image_chunks(m.table, m.image_bytes))
    assert chunk["_bytes"].to_pylist() == images and chunk["_bytes"].type == pa.binary()


# ---------------------------------------------------------------- b21


def test_a_huge_brace_range_is_refused_before_it_is_expanded(tmp_path):
    assert brace_count("s/{0..9}-{a,b,c}.tar") == 30 and len(expand_braces("s/{0..9}-{a,b,c}.tar")) == 30
    assert is_tar_pattern(str(tmp_path / "shard-{0..99999999}.tar"))  # lazily: the first name only
    start = time.perf_counter()
    with pytest.raises(BadInput, match=r"the brace range names 100,000,000 files, over the limit of 1,000,000"):
        read_manifest(str(tmp_path / "shard-{0..99999999}.tar"))
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------- b23


def test_a_glob_of_tars_without_the_suffix_reads_them_and_a_mixed_one_is_named(tmp_path):
    for s in range(2):
        write_tar(tmp_path / f"shard-{s}.tar", [(f"k{s}.jpg", data.jpeg(s))])
    assert sorted(read_manifest(str(tmp_path / "shard-*")).ids.to_pylist()) == ["k0", "k1"]
    (tmp_path / "shard-notes.csv").write_text("id\nx\n")
    with pytest.raises(BadInput, match=r"shard-\*: matches tar shards .*shard-0.tar\) and other files .*"
                                       r"shard-notes.csv\); make the pattern end in .tar"):
        read_manifest(str(tmp_path / "shard-*"))


# ---------------------------------------------------------------- b26


@pytest.mark.parametrize("bytes_first", [True, False])
def test_a_parquet_glob_mixing_image_bytes_and_paths_names_the_file(tmp_path, bytes_first):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.jpg").write_bytes(data.jpeg(0))
    byte_file, path_file = ("part-0.parquet", "part-1.parquet") if bytes_first else ("part-1.parquet", "part-0.parquet")
    pq.write_table(pa.table({"id": ["a0"], "image": pa.array([data.jpeg(1)], pa.binary())}), tmp_path / byte_file)
    pq.write_table(pa.table({"id": ["b0"], "image": ["img/0.jpg"]}), tmp_path / path_file)
    with pytest.raises(BadInput, match=rf"{path_file}: has column 'image' of type string, but .*{byte_file} has "
                                       r"column 'image' of type binary \(image bytes\)"):
        read_manifest(str(tmp_path / "*.parquet"), require_image=True)
