"""`extract images` on tars that are not what they seem (b01, b02, b12): refusals are one line and
exit 2 before anything is written; a symlinked image member is an error row naming its shard."""

from __future__ import annotations

import tarfile

import pyarrow.parquet as pq

from phrasefuse.extract.jobs import extract_images
from tests import inputs_data as data
from tests.conftest import invoke_cli


def test_a_cut_or_ambiguous_tar_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_clip_spec):
    with tarfile.open(tmp_path / "full.tar", "w") as tar:
        for i in range(4):
            data.add_member(tar, f"s{i}.jpg", data.jpeg(i))
    with tarfile.open(tmp_path / "full.tar") as tar:
        cut_at = tar.getmembers()[2].offset
    (tmp_path / "cut.tar").write_bytes((tmp_path / "full.tar").read_bytes()[:cut_at])
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        for name in ("a.jpg", "a.cls", "a.jpg", "a.cls"):
            data.add_member(tar, name, data.jpeg(1) if name.endswith("jpg") else b"x")
    for shard, says in (("cut.tar", "the tar ends without the end-of-archive marker"),
                        ("dup.tar", "key 'a' is used by two samples")):
        proc = invoke_cli("extract", "images", tmp_path / shard, "--out", tmp_path / "st", "--model", tiny_clip_spec,
                          "--workers", "0")
        assert proc.returncode == 2 and says in proc.stderr and str(tmp_path / shard) in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "st").exists()


def test_symlinked_image_member_is_an_error_row_naming_its_shard(tmp_path, tiny_clip_spec):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        data.add_member(tar, "a.jpg", data.jpeg(1))
        info = tarfile.TarInfo("b.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(info)
        info = tarfile.TarInfo("c.jpg")
        info.type, info.linkname = tarfile.LNKTYPE, "a.jpg"
        tar.addfile(info)
    summary = extract_images(tmp_path / "s.tar", tmp_path / "st", model=tiny_clip_spec, workers=0, progress=False)
    assert (summary.embedded + summary.reused, summary.failed) == (2, 1)  # c: a hard link reads a's bytes
    errors = pq.read_table(tmp_path / "st" / "errors.parquet").to_pylist()
    assert errors == [{"id": "b", "reason": f"the image member of this sample of {(tmp_path / 's.tar').resolve()} is "
                                            f"a symbolic link (links are not followed); store the image itself in "
                                            f"the tar"}]
