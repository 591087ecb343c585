"""Files no image reader may trust: special files, huge or sparse files, extreme shapes, bad paths.

Each is an error row (extract), a one-line exit 2 (lookup) or an "unreadable" thumbnail (report):
never a hang, a memory blow-up or a dead job.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from phrasefuse.errors import BadInput
from phrasefuse.extract.images import DEFAULT_LIMITS, ImageLimits, decode, decode_errors, read_item


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels (no pixel data): a decompression bomb's header."""
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def special_files(tmp_path):
    """{kind: path} of files that are not regular files, and symlinks to them."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.jpg"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    links = {}
    for name, target in (("link_to_fifo", fifo), ("link_to_dev", Path("/dev/zero")), ("link_to_folder", folder)):
        links[name] = tmp_path / f"{name}.jpg"
        links[name].symlink_to(target)
    yield {"fifo": fifo, "socket": sock_path, "folder": folder, "char_device": Path("/dev/zero"),
           "urandom": Path("/dev/urandom"), **links}
    sock.close()


def test_only_regular_files_are_read(special_files):
    for kind, path in special_files.items():
        data, reason = read_item(str(path))  # returns at once: a FIFO without writer would block open/read
        assert data is None and "not an image file" in reason, (kind, reason)


@pytest.mark.parametrize("path", ["a\0b.jpg", "\udcff.jpg", "/" + "x" * 5000, ""])
def test_bad_paths_are_reasons_not_exceptions(path):
    data, reason = read_item(path)
    assert data is None and reason


def test_a_file_over_the_size_cap_is_not_read_even_when_sparse(tmp_path):
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as f:
        f.truncate(3 * 2**30)  # 3 GB, no blocks on disk
    data, reason = read_item(str(sparse))
    assert data is None and "file too large" in reason and "max_image_mb" in reason
    small = ImageLimits.of(max_image_mb=1)
    (tmp_path / "two_mb.bin").write_bytes(b"\xff" * (2 * 2**20))
    assert read_item(str(tmp_path / "two_mb.bin"), small)[0] is None
    assert read_item(str(tmp_path / "two_mb.bin"))[0] is not None  # under the default cap


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (2000, 1), (3, 400)])
def test_extreme_aspect_ratios_are_refused_before_decoding(size):
    with pytest.raises(ValueError, match="too elongated"):
        decode(png(*size), resize_shorter=224)


@pytest.mark.parametrize("size", [(50000, 50000), (12000, 12000), (100000, 1000)])
def test_huge_dimensions_are_refused_from_the_header(size):
    with pytest.raises(ValueError, match="too large|too elongated"):
        decode(png_header_only(*size), resize_shorter=224)


def test_real_photo_shapes_pass_and_caps_are_configurable():
    decode(png(1200, 100), resize_shorter=64)  # a 12:1 panorama is a photo
    decode(png(4000, 3000))
    with pytest.raises(ValueError, match="too large"):
        decode(png(4000, 3000), limits=ImageLimits.of(max_image_megapixels=5))
    with pytest.raises(ValueError, match="too elongated"):
        decode(png(1200, 100), limits=ImageLimits.of(max_aspect_ratio=4))
    assert DEFAULT_LIMITS.max_pixels >= 89_000_000 and DEFAULT_LIMITS.max_bytes >= 256 * 2**20
    for bad in ({"max_image_mb": 0}, {"max_aspect_ratio": float("nan")}, {"max_image_megapixels": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ImageLimits.of(**bad)


def test_extract_makes_error_rows_of_every_hostile_file_and_keeps_the_good_ones(tmp_path, tiny_clip_spec,
                                                                                shapes_dataset, special_files):
    from phrasefuse.extract.jobs import extract_images
    from phrasefuse.store import EmbeddingStore

    good = sorted(shapes_dataset.parent.glob("images/*.jpg"))[:2]
    (tmp_path / "strip.png").write_bytes(png(20000, 1))
    (tmp_path / "bomb.png").write_bytes(png_header_only(50000, 50000))
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as f:
        f.truncate(2**40)
    hostile = {**{k: str(v) for k, v in special_files.items()}, "strip": str(tmp_path / "strip.png"),
               "bomb": str(tmp_path / "bomb.png"), "sparse": str(sparse), "nul": str(good[0]) + "\0.png"}
    ids = ["good0", "good1", *hostile]
    pq.write_table(pa.table({"id": ids, "image": [str(p) for p in good] + list(hostile.values())}),
                   tmp_path / "m.parquet")
    for workers in (0, 2):  # in the main process and in decode workers
        out = tmp_path / f"st{workers}"
        s = extract_images(tmp_path / "m.parquet", out, model=tiny_clip_spec, workers=workers,
                           allow_outside_paths=True, progress=False)
        assert (s.embedded, s.failed) == (2, len(hostile))
        errors = EmbeddingStore(out).errors().to_pydict()
        assert sorted(errors["id"]) == sorted(hostile)
        assert all(errors["reason"])


def test_extract_cli_limits_are_options(tmp_path, tiny_clip_spec, shapes_dataset, capsys):
    from tests.faults.test_exit_status import run_main

    image = sorted(shapes_dataset.parent.glob("images/*.jpg"))[0]
    pq.write_table(pa.table({"id": ["a"], "image": [str(image)]}), tmp_path / "m.parquet")
    base = ["extract", "images", tmp_path / "m.parquet", "--out", tmp_path / "st", "--model", tiny_clip_spec,
            "--allow-outside-paths", "--workers", "0"]
    assert run_main(capsys, *base, "--max-aspect-ratio", "1")[0] == 0
    status, lines = run_main(capsys, *base, "--max-image-mb", "0")
    assert status == 2 and lines == ["phrasefuse: error: --max-image-mb 0: must be a number of at least 1"]
    assert "too elongated" in pq.read_table(tmp_path / "st" / "errors.parquet")["reason"][0].as_py()


@pytest.fixture(scope="module")
def tiny_index(shapes_dataset, tiny_clip_spec, tmp_path_factory) -> Path:
    """A prototype index over the shapes images, embedded with the tiny random model."""
    from phrasefuse.extract.jobs import extract_images
    from phrasefuse.index.build import build_index

    folder = tmp_path_factory.mktemp("lookup")
    extract_images(shapes_dataset, folder / "img", model=tiny_clip_spec, workers=0, progress=False)
    t = pq.read_table(shapes_dataset)
    pq.write_table(pa.table({"query": t["label"], "image_id": t["id"]}), folder / "pairs.parquet")
    build_index(folder / "pairs.parquet", folder / "img", folder / "index", device="cpu")
    return folder / "index"


def test_lookup_refuses_special_and_huge_files_with_bad_input(tmp_path, special_files, tiny_index, shapes_dataset):
    from phrasefuse.index.lookup import lookup

    (tmp_path / "strip.png").write_bytes(png(1, 20000))
    (tmp_path / "bomb.png").write_bytes(png_header_only(50000, 50000))
    for path in [special_files["fifo"], special_files["char_device"], special_files["link_to_folder"],
                 special_files["socket"]]:
        with pytest.raises(BadInput, match="not an image file"):
            lookup(tiny_index, [path], device="cpu")
    for path, reason in ((tmp_path / "strip.png", "too elongated"), (tmp_path / "bomb.png", "too large")):
        with pytest.raises(BadInput, match=reason):
            lookup(tiny_index, [path], device="cpu")
    good = sorted(shapes_dataset.parent.glob("images/*.jpg"))[0]
    assert len(lookup(tiny_index, [good], k=2, device="cpu").phrases[0]) == 2


def test_report_thumbnails_of_hostile_files_are_unreadable_not_fatal(tmp_path, special_files, shapes_dataset):
    from phrasefuse.report.page import _thumbnail

    (tmp_path / "bomb.png").write_bytes(png_header_only(50000, 50000))
    (tmp_path / "strip.png").write_bytes(png(1, 20000))
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not really")
    for path in [*special_files.values(), tmp_path / "bomb.png", tmp_path / "strip.png", tmp_path / "junk.jpg",
                 tmp_path / "missing.jpg", "a\0b.png"]:
        assert "unreadable" in _thumbnail(str(path)), path
    assert _thumbnail(str(sorted(shapes_dataset.parent.glob("images/*.jpg"))[0])).startswith("<img")


def test_decode_errors_turn_memory_errors_into_reasons():
    with pytest.raises(ValueError, match="out of memory"):
        with decode_errors():
            raise MemoryError


def test_nul_bytes_in_folder_or_file_names_pass_the_outside_paths_check_and_become_error_rows(tmp_path):
    from phrasefuse.manifests import read_manifest

    (tmp_path / "ok.png").write_bytes(png(8, 8))
    pq.write_table(pa.table({"id": ["good", "folder", "file"], "image": ["ok.png", "su\0b/x.png", "ok.png\0.png"]}),
                   tmp_path / "m.parquet")
    paths = read_manifest(tmp_path / "m.parquet", require_image=True).table["image"].to_pylist()  # no ValueError
    assert read_item(paths[0])[0] is not None
    for path in paths[1:]:
        data, reason = read_item(path)
        assert data is None and "not a valid path" in reason
