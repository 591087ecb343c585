"""Small generated inputs of every source kind (issue 14): an ImageFolder tree with a split level,
WebDataset tar shards (.jpg/.txt/.json/.cls, one corrupt image member), Parquet with image bytes
(a binary column and a HF-datasets struct {bytes, path})."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CLASSES = ("cat", "dog")


def jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A small JPEG whose pixels depend on `seed` (a flat colour plus noise)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    pixels = np.clip(base + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bmp(seed: int) -> bytes:
    """A 32x32 BMP: every seed gives a file of the same size, other pixels (a replaced photo that
    keeps its size)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "BMP")
    return buf.getvalue()


def bmp_classes(folder: Path, per_class: int) -> Path:
    """folder/red/0.bmp ... folder/blue/N.bmp (seeds 0.. and 10..)."""
    for c, name in enumerate(("red", "blue")):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            (folder / name / f"{i}.bmp").write_bytes(bmp(10 * c + i))
    return folder


def bmp_folder_and_pairs(tmp_path: Path, n: int = 6) -> Path:
    """tmp_path/photos/0.bmp ... (n flat images) and tmp_path/pairs.parquet (3 phrases over them)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(n):
        (photos / f"{i}.bmp").write_bytes(bmp(i))
    pq.write_table(pa.table({"query": [f"phrase {i % 3}" for i in range(n)],
                             "image_id": [f"{i}.bmp" for i in range(n)]}), tmp_path / "pairs.parquet")
    return photos


def image_folder(root: Path, splits=("train", "validation"), per_class: int = 3) -> Path:
    """root/SPLIT/CLASS/N.jpg (splits None: root/CLASS/N.jpg)."""
    for s, split in enumerate(splits or [None]):
        for c, name in enumerate(CLASSES):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i}.jpg").write_bytes(jpeg(100 * s + 10 * c + i))
    return root


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_shards(root: Path, shards: int = 2, per_shard: int = 4, corrupt: str | None = "000010003") -> Path:
    """root/0000N.tar, img2dataset style: KEY.jpg, KEY.txt, KEY.json (title, tags, a number), KEY.cls;
    the image member of sample `corrupt` is not an image."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                add_member(tar, f"{key}.jpg", b"not a jpeg at all" if key == corrupt else jpeg(1000 + 10 * s + i))
                add_member(tar, f"{key}.txt", f"a photo number {key}".encode())
                add_member(tar, f"{key}.json", json.dumps({"title": f"title {key}", "tags": ["x", "y"],
                                                          "width": 48, "key": key}).encode())
                add_member(tar, f"{key}.cls", str(i % 2).encode())
    return root


def tar_jpeg(shard: int, i: int) -> bytes:
    return jpeg(1000 + 10 * shard + i)


def bytes_parquet(path: Path, n: int = 6) -> Path:
    """img2dataset's parquet style: key, jpg (binary), caption, cls."""
    pq.write_table(pa.table({"key": [f"p{i}" for i in range(n)],
                             "jpg": pa.array([jpeg(2000 + i) for i in range(n)], pa.binary()),
                             "caption": [f"caption {i}" for i in range(n)],
                             "cls": [CLASSES[i % 2] for i in range(n)]}), path, row_group_size=4)
    return path


def struct_parquet(path: Path, n: int = 5) -> Path:
    """Hugging Face datasets' Parquet export: image = struct {bytes, path}; one row without bytes."""
    images = [{"bytes": jpeg(3000 + i), "path": f"{i}.jpg"} for i in range(n - 1)] + [{"bytes": None, "path": "x.jpg"}]
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(n)], "image": pa.array(images),
                             "label": [CLASSES[i % 2] for i in range(n)],
                             "split": ["train", "validation", "dev", "test", "train"]}), path)
    return path
