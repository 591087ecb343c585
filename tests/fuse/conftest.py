"""Generated feature stores with a known answer, written through the real store format.

`write_synthetic` draws labels, then an image vector and a text vector per row from
class centroids plus noise. Which classes a feature can tell apart is set by a grouping
(`image_groups`, `text_groups`: class -> centroid index), e.g. image vectors that only
know y // 2 and text vectors that only know y % 2: then only the fused head can get
every class right.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.store import StoreWriter, new_meta


@dataclass
class Synthetic:
    manifest: Path
    image: Path
    text: Path
    labels: np.ndarray
    split: np.ndarray
    text_present: np.ndarray


def generated_encoder(name: str, dim: int) -> dict:
    return {"spec": f"generated:{name}", "family": "generated", "name": name,
            "weights_sha256": hashlib.sha256(name.encode()).hexdigest(), "dim": dim}


def write_store(path: Path, modality: str, ids, emb: np.ndarray, encoder: dict, extra: dict | None = None) -> Path:
    meta = new_meta(modality=modality, encoder=encoder, dtype="float32", source={"manifest": "generated",
                                                                                  "column": modality})
    with StoreWriter.open(path, meta, shard_size=max(1, len(ids) // 2 + 1)) as w:
        w.add(list(ids), [f"k{i}" for i in ids], emb, extra=extra)
    return path


def class_vectors(rng, groups: np.ndarray, y: np.ndarray, dim: int, signal: float) -> np.ndarray:
    centroids = rng.standard_normal((int(groups.max()) + 1, dim)).astype(np.float32)
    x = signal * centroids[groups[y]] + rng.standard_normal((len(y), dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_synthetic(folder: Path, n: int = 900, classes: int = 6, image_dim: int = 48, text_dim: int = 24,
                    image_signal: float = 0.6, text_signal: float = 0.6, image_groups=None, text_groups=None,
                    text_missing: float = 0.3, seed: int = 0, text_name: str = "title",
                    multilabel: bool = False) -> Synthetic:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    image_groups = np.arange(classes) if image_groups is None else np.asarray(image_groups)
    text_groups = np.arange(classes) if text_groups is None else np.asarray(text_groups)
    ids = np.array([f"r{i:05d}" for i in range(n)], dtype=object)
    split = np.where(np.arange(n) % 20 < 14, "train", np.where(np.arange(n) % 20 < 17, "val", "test"))
    img = class_vectors(rng, image_groups, y, image_dim, image_signal)
    txt = class_vectors(rng, text_groups, y, text_dim, text_signal)
    present = rng.random(n) >= text_missing
    names = np.array([f"c{c}" for c in range(classes)], dtype=object)
    columns = {"id": ids.tolist(), "split": split.tolist()}
    if multilabel:  # the class, plus its neighbour for a third of the rows
        second = (y + 1) % classes
        both = rng.random(n) < 1 / 3
        columns["labels"] = [[names[a]] + ([names[b]] if t else []) for a, b, t in zip(y, second, both)]
    else:
        columns["label"] = names[y].tolist()
    pq.write_table(pa.table(columns), folder / "manifest.parquet")
    write_store(folder / "img", "image", ids, img, generated_encoder("img", image_dim))
    write_store(folder / text_name, "text", ids[present], txt[present], generated_encoder(text_name, text_dim))
    return Synthetic(folder / "manifest.parquet", folder / "img", folder / text_name, y, split, present)


@pytest.fixture
def synthetic(tmp_path):
    """A function (folder name, **write_synthetic options) -> Synthetic under tmp_path."""
    return lambda name="data", **kw: write_synthetic(tmp_path / name, **kw)


@pytest.fixture(scope="session")
def stores(shapes_dataset, tiny_clip_spec, tmp_path_factory):
    """The shapes' img and title stores (tiny open_clip, one space), and title-minilm (built-in text
    encoder): the fuse commands' CLI tests (test_cli.py, test_cli_ablate.py)."""
    from phrasefuse.extract.jobs import extract_images, extract_texts

    work = tmp_path_factory.mktemp("fuse-cli")
    extract_images(shapes_dataset, work / "img", model=tiny_clip_spec, workers=0, progress=False)
    extract_texts(shapes_dataset, "title", work / "title", model=tiny_clip_spec, progress=False)
    extract_texts(shapes_dataset, "title", work / "title-minilm", progress=False)
    return work


# The CLI's outcomes, as the fuse commands' CLI tests check them.


def ok(proc) -> dict | str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def one_json(proc) -> dict:
    return json.loads(ok(proc))  # the whole of stdout is one JSON document


def refused(proc, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
