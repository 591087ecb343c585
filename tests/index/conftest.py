"""Fixtures for the index stage: image stores of the generated shapes, a planted pairs table,
a built index, and a store of random vectors for the approximate-index paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.store import StoreWriter, l2_normalize, new_meta

HELD_OUT = 12  # the last 12 shapes images (2 per class) are in no pair: lookup queries


def planted_phrase(label: str) -> str:
    return f"a photo of a {label}"


def random_encoder(dim: int) -> dict:
    """Identity of generated vectors (no model made them; the store format is the real one)."""
    return {"spec": f"random:{dim}", "family": "random", "name": f"gaussian-{dim}",
            "weights_sha256": "0" * 64, "dim": dim}


def write_random_store(path: Path, emb: np.ndarray, prefix: str = "r") -> list[str]:
    ids = [f"{prefix}{i:06d}" for i in range(len(emb))]
    meta = new_meta(modality="image", encoder=random_encoder(emb.shape[1]), dtype="float32",
                    source={"manifest": "generated", "column": "image"})
    with StoreWriter.open(path, meta, shard_size=4096) as writer:
        writer.add(ids, ids, emb)
    return ids


@pytest.fixture(scope="session")
def shapes_table(shapes_dataset) -> pa.Table:
    return pq.read_table(shapes_dataset)


@pytest.fixture(scope="session")
def shapes_img_store(shapes_dataset, tmp_path_factory) -> Path:
    """The shapes images embedded with the built-in EfficientNet-Lite0 (pretrained: shapes separate)."""
    from phrasefuse.extract.jobs import extract_images

    out = tmp_path_factory.mktemp("stores") / "img"
    extract_images(shapes_dataset, out, workers=0, progress=False)
    return out


@pytest.fixture(scope="session")
def shapes_tiny_store(shapes_dataset, tmp_path_factory, tiny_clip_spec) -> Path:
    """The same images embedded with the tiny random open_clip model (another encoder identity)."""
    from phrasefuse.extract.jobs import extract_images

    out = tmp_path_factory.mktemp("stores") / "tiny-img"
    extract_images(shapes_dataset, out, model=tiny_clip_spec, workers=0, progress=False)
    return out


@pytest.fixture(scope="session")
def planted_pairs(shapes_table, tmp_path_factory) -> Path:
    """Each class's planted phrase (written with noisy case and spacing) on its first images,
    plus distractor phrases on mixed-class images; the last HELD_OUT images are in no pair."""
    ids, labels = shapes_table["id"].to_pylist(), shapes_table["label"].to_pylist()
    n = len(ids) - HELD_OUT
    rng = np.random.default_rng(0)
    query, image_id = [], []
    for i in range(n):
        text = planted_phrase(labels[i])
        query.append(text.upper() + "  " if i % 2 else "  " + text.replace(" ", "   "))
        image_id.append(ids[i])
    for j in range(10):
        for i in rng.choice(n, size=3, replace=False):
            query.append(f"distractor {j}")
            image_id.append(ids[i])
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    pq.write_table(pa.table({"query": query, "image_id": image_id}), path)
    return path


@pytest.fixture(scope="session")
def shapes_index(planted_pairs, shapes_img_store, tmp_path_factory) -> Path:
    """The planted pairs' index, built in this process (the CLI's build is tested in test_cli.py)."""
    from phrasefuse.index.build import build_index

    out = tmp_path_factory.mktemp("index") / "shapes-index"
    build_index(planted_pairs, shapes_img_store, out, progress=False)
    return out


@pytest.fixture(scope="session")
def random_vectors() -> np.ndarray:
    """5,000 random unit vectors of dim 32."""
    return l2_normalize(np.random.default_rng(1).standard_normal((5000, 32)).astype(np.float32))


@pytest.fixture(scope="session")
def random_store(random_vectors, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "random"
    write_random_store(path, random_vectors)
    return path


@pytest.fixture(scope="session")
def random_pairs(random_vectors, tmp_path_factory) -> Path:
    """3,000 phrases, each on 2 random images of the random store (prototypes are their means)."""
    rng = np.random.default_rng(2)
    n_phrases = 3000
    images = rng.integers(0, len(random_vectors), size=(n_phrases, 2))
    path = tmp_path_factory.mktemp("pairs") / "random-pairs.parquet"
    pq.write_table(pa.table({"query": np.repeat([f"phrase {i}" for i in range(n_phrases)], 2),
                             "image_id": [f"r{i:06d}" for i in images.reshape(-1)]}), path)
    return path


def read_meta(index: Path) -> dict:
    return json.loads((index / "meta.json").read_text())
