"""The extract jobs' mappers, for both engines (`phrasefuse.engine`).

Images: locally, `image_loader`'s DataLoader workers read, hash, decode and prepare the rows
and the model runs in this process; on Ray, `ImageEmbedder` actors do the same per-row work
(`images.ImageRows`) and run the model. Either way the job gets `ImageBatch`es, and an item
whose key was embedded earlier in this run (same bytes, another id) is not embedded again.

Texts: the distinct texts (key, text), embedded a chunk at a time: (keys, vectors).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.engine import check_identity, set_threads
from phrasefuse.store import embedding_array, embeddings_to_numpy

# ---------------------------------------------------------------- images


@dataclass
class ImageBatch:
    """What a mapper (either engine) hands the writer for one batch of manifest rows."""

    ids: list[str]  # rows run through the model...
    keys: list[str]
    emb: np.ndarray  # ...and their vectors (len(ids), dim)
    known: list[tuple[str, str]] = field(default_factory=list)  # (id, key) whose key is embedded: copied later
    errors: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)

    @property
    def rows(self) -> int:
        return len(self.ids) + len(self.known) + len(self.errors)


def image_loader(todo: pa.Table, known_keys: pa.Array, encoder, batch_size: int, workers: int | None,
                 limits=None):
    """The local engine's reader: a DataLoader whose workers read, hash, decode and prepare the
    rows (id, image) for `encoder`; batches as `images.collate` makes them. Rows whose key is in
    `known_keys` are hashed, not decoded."""
    import torch

    from phrasefuse.extract.images import DEFAULT_LIMITS, ImageRows, collate, image_sources, worker_init

    dataset = ImageRows(todo["id"].to_pylist(), image_sources(todo), encoder.to_pixels,
                        encoder.resize_shorter, frozenset(known_keys.to_pylist()), limits or DEFAULT_LIMITS)
    workers = min(os.cpu_count() or 1, 4) if workers is None else max(0, workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
        worker_init_fn=partial(worker_init, yield_to_model=encoder.device.type == "cpu") if workers else None,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=False)


def embed_images_local(todo: pa.Table, known_keys: pa.Array, encoder, batch_size: int,
                       workers: int | None, limits=None) -> Iterator[ImageBatch]:
    """The local mapper: `image_loader`'s workers prepare the images; the model runs here. An item
    whose key was embedded earlier in this run (same bytes, another id) is not run again."""
    import torch

    loader = image_loader(todo, known_keys, encoder, batch_size, workers, limits)
    embedded_keys: set[str] = set()
    for batch in loader:
        out = ImageBatch([], [], np.zeros((0, encoder.dim), np.float32), batch["known"], batch["errors"])
        if batch["pixels"] is not None:
            fresh = first_of_each_key(batch["keys"], embedded_keys)
            out.known.extend((batch["ids"][i], batch["keys"][i]) for i in np.flatnonzero(~fresh))
            if fresh.any():
                pixels = batch["pixels"] if fresh.all() else batch["pixels"][torch.from_numpy(fresh)]
                out.ids = [i for i, f in zip(batch["ids"], fresh) if f]
                out.keys = [k for k, f in zip(batch["keys"], fresh) if f]
                out.emb = encoder.encode(pixels)
                embedded_keys.update(out.keys)
        yield out


def first_of_each_key(keys: list[str], seen: set[str]) -> np.ndarray:
    """True for the rows whose key was not embedded before in this run (nor earlier in the batch)."""
    fresh = np.ones(len(keys), dtype=bool)
    batch_seen: set[str] = set()
    for i, k in enumerate(keys):
        if k in seen or k in batch_seen:
            fresh[i] = False
        batch_seen.add(k)
    return fresh


class ImageEmbedder:
    """Ray actor: manifest rows (id, image) -> (id, key, reason, embedded, emb). The per-row work
    is the local engine's (`images.ImageRows`: read, hash, skip known keys, decode, transform),
    on `threads` threads; the model runs once per batch."""

    def __init__(self, spec: str, device: str, identity: dict | None, known_keys: pa.Array, threads: int,
                 limits=None):
        from phrasefuse.extract.encoders import load_image_encoder
        from phrasefuse.extract.images import DEFAULT_LIMITS

        self.limits = limits or DEFAULT_LIMITS  # images.ImageLimits: rows over them are error rows
        set_threads(threads)
        self.encoder = load_image_encoder(spec, device)
        if identity is not None:  # None: a local replica, whose pool checks `identity` as it reports ready
            check_identity(self.encoder.identity, identity, spec)
        self.known_keys = frozenset(known_keys.to_pylist())
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    @property
    def identity(self) -> dict:
        return self.encoder.identity

    def add_known_keys(self, keys: pa.Array) -> None:
        """Keys embedded since (the store's at the start, then each chunk's): those rows are hashed, not decoded."""
        self.known_keys = self.known_keys | frozenset(keys.to_pylist())

    def __call__(self, batch: pa.Table) -> pa.Table:
        from phrasefuse.extract.images import ImageRows, collate, image_sources

        rows = ImageRows(batch["id"].to_pylist(), image_sources(batch), self.encoder.to_pixels,
                         self.encoder.resize_shorter, self.known_keys, self.limits)
        items = list((self.pool.map if self.pool else map)(rows.__getitem__, range(len(rows))))
        out = collate(items)
        n, known, errors = len(out["ids"]), out["known"], out["errors"]
        emb = np.zeros((len(items), self.encoder.dim), np.float32)
        if n:
            emb[:n] = self.encoder.encode(out["pixels"])
        return pa.table({
            "id": pa.array(out["ids"] + [i for i, _ in known] + [i for i, _ in errors], pa.string()),
            "key": pa.array(out["keys"] + [k for _, k in known] + [None] * len(errors), pa.string()),
            "reason": pa.array([None] * (n + len(known)) + [r for _, r in errors], pa.string()),
            "embedded": pa.array(np.arange(len(items)) < n),
            "emb": embedding_array(emb),
        })


def embed_images_replicas(todo: pa.Table, replicas, batch_size: int) -> Iterator[ImageBatch]:
    """The local mapper with model replicas (`engine.ReplicaPool` of `ImageEmbedder`s): each
    replica reads, decodes and embeds whole batches of rows itself, on one core; the batches come
    back in order, as `embed_images_local` yields them."""
    blocks = (todo.slice(start, batch_size) for start in range(0, todo.num_rows, batch_size))
    yield from image_batches_from_actors(replicas.map(blocks))


def image_batches_from_actors(tables: Iterator[pa.Table]) -> Iterator[ImageBatch]:
    """`ImageEmbedder` output -> `ImageBatch`es, as the local mapper yields them. Rows whose key
    another actor embedded earlier in this run become `known` (copied, like the local engine)."""
    embedded_keys: set[str] = set()
    for out in tables:
        failed = out.filter(pc.is_valid(out["reason"]))
        done = out.filter(pc.and_(pc.is_null(out["reason"]), out["embedded"]))
        skipped = out.filter(pc.and_(pc.is_null(out["reason"]), pc.invert(out["embedded"])))
        ids, keys = done["id"].to_pylist(), done["key"].to_pylist()
        fresh = first_of_each_key(keys, embedded_keys)
        batch = ImageBatch([i for i, f in zip(ids, fresh) if f], [k for k, f in zip(keys, fresh) if f],
                           embeddings_to_numpy(done["emb"])[fresh],
                           known=list(zip(skipped["id"].to_pylist(), skipped["key"].to_pylist())),
                           errors=list(zip(failed["id"].to_pylist(), failed["reason"].to_pylist())))
        batch.known.extend((i, k) for i, k, f in zip(ids, keys, fresh) if not f)
        embedded_keys.update(batch.keys)
        yield batch


# ---------------------------------------------------------------- texts


def embed_texts_local(unique: pa.Table, encoder, batch_size: int,
                      chunk_rows: int) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """The local mapper: (keys, vectors) of the distinct texts, `chunk_rows` at a time."""
    for start_row in range(0, unique.num_rows, chunk_rows):
        chunk = unique.slice(start_row, chunk_rows)
        yield chunk["key"].combine_chunks(), encoder.encode(chunk["text"].to_pylist(), batch_size=batch_size)


class TextEmbedder:
    """Ray actor: distinct texts (key, text) -> (key, emb)."""

    def __init__(self, spec: str, device: str, identity: dict, batch_size: int, threads: int):
        from phrasefuse.extract.encoders import load_text_encoder

        set_threads(threads)
        self.encoder = load_text_encoder(spec, device)
        check_identity(self.encoder.identity, identity, spec)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb = self.encoder.encode(batch["text"].to_pylist(), batch_size=self.batch_size)
        return pa.table({"key": batch["key"], "emb": embedding_array(emb)})


def text_batches_from_actors(tables: Iterator[pa.Table]) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """`TextEmbedder` output -> (keys, vectors), as the local mapper yields them."""
    for out in tables:
        if out.num_rows:
            yield out["key"].combine_chunks(), embeddings_to_numpy(out["emb"])
