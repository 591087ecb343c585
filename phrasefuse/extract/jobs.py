"""The extract jobs: embed every image / text of a manifest once, into a store.

Each job is reader -> mapper -> writer:
  reader  the manifest rows not yet in the store (`pending_rows`), and, per row,
          its content key (sha256 of the image bytes / of the text);
  mapper  the encoder, on batches: with engine "local", images decoded in DataLoader
          workers and the model in this process; with engine "ray", the same per-row work
          and model in Ray actors (`phrasefuse.extract.ray_engine`), one per device;
  writer  `StoreWriter`, in this process whatever the engine: whole shards, errors.parquet,
          the store lock; so resume and embed-once behave the same on both engines.

Embed once: an id already in the store is skipped; an item whose content key is
already embedded (another id, an earlier manifest) is copied, not re-embedded.
A killed job loses at most the shard it was filling; the next run resumes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.errors import BadInput
from phrasefuse.extract import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL
from phrasefuse.manifests import Manifest, read_manifest
from phrasefuse.manifests.tables import sql
from phrasefuse.store import EmbeddingStore, StoreWriter, new_meta

DEFAULT_SHARD_SIZE = 10_000
ENGINES = ("local", "ray")


@dataclass
class RayOptions:
    """Where and how wide `--engine ray` runs: `address` None means $RAY_ADDRESS, else a new
    local Ray; `actors` None means one model actor per GPU, else one per spare CPU."""

    address: str | None = None
    actors: int | None = None


@dataclass
class ExtractSummary:
    what: str
    store: str
    rows: int = 0
    embedded: int = 0  # ran through the model
    reused: int = 0  # content already embedded under another id: copied
    present: int = 0  # id already in the store: skipped
    failed: int = 0  # in errors.parquet
    no_text: int = 0  # of the failed: a missing or empty text (extract texts)
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        done = self.embedded + self.reused
        return done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        broken = self.failed - self.no_text
        failed = f"{broken} failed" + (f" (see {self.store}/errors.parquet)" if broken else "")
        if self.no_text:
            failed += f", {self.no_text} without text"
        return (f"extract {self.what}: {self.embedded} embedded, {self.reused} reused, {self.present} already in store, "
                f"{failed}; {self.seconds:.1f} s, {self.rows_per_second:.1f} rows/s -> {self.store}")

    def as_dict(self) -> dict:
        return asdict(self) | {"rows_per_second": round(self.rows_per_second, 2)}


# ---------------------------------------------------------------- reader


def pending_rows(manifest: Manifest, store: EmbeddingStore) -> tuple[pa.Table, pa.Table]:
    """(rows of the manifest whose id is not in the store, the store's id/key table)."""
    existing = store.ids_and_keys() if store.exists() else pa.table({"id": pa.array([], pa.string()),
                                                                      "key": pa.array([], pa.string())})
    todo = manifest.table.filter(pc.invert(pc.is_in(manifest.table["id"], value_set=existing["id"])))
    return todo, existing


@contextmanager
def _progress(total: int, what: str, enabled: bool | None):
    """A rich progress bar (rows/s, ETA) on a terminal; nothing otherwise."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or total == 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(f"extract {what}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    start = time.perf_counter()
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total, rate="")
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            rate = done / max(1e-9, time.perf_counter() - start)
            bar.update(task, advance=n, rate=f"{rate:.1f} rows/s")

        yield advance


def _copy_known(writer: StoreWriter, known: list[tuple[str, str]]) -> int:
    """Rows whose content is already in the store: copy the embedding under the new id."""
    if not known:
        return 0
    writer.flush()  # keys embedded in this run must be on disk to be found
    ids, keys = zip(*known)
    emb = writer.store.embeddings_by_key(pa.array(keys, pa.string()))
    writer.add(ids, keys, emb)
    return len(ids)


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


def extract_images(manifest: str | os.PathLike, out: str | os.PathLike, *, model: str = DEFAULT_IMAGE_MODEL,
                   batch_size: int = 64, workers: int | None = None, device: str = "auto",
                   limit: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float32",
                   progress: bool | None = None, allow_outside_paths: bool = False, engine: str = "local",
                   ray: RayOptions | None = None, limits=None) -> ExtractSummary:
    """Embed the `image` column of a manifest into the store `out`. Image paths that resolve
    outside the manifest's folder are refused unless `allow_outside_paths`; images over `limits`
    (`images.ImageLimits`: file size, pixels, aspect ratio) are error rows."""
    from phrasefuse.extract.encoders import load_image_encoder
    from phrasefuse.extract.images import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    _check_sizes(batch_size, shard_size, limit)
    check_engine(engine, ray)
    rows = read_manifest(manifest, require_image=True, allow_outside_paths=allow_outside_paths).head(limit)
    # With Ray the model runs in the actors; this copy only names the encoder (its weights checksum).
    encoder = load_image_encoder(model, "cpu" if engine == "ray" else device)
    meta = new_meta(modality="image", encoder=encoder.identity, dtype=dtype, preprocess=encoder.preprocess,
                    source={"manifest": str(manifest), "column": "image"})
    summary = ExtractSummary("images", str(out), rows=len(rows))
    start = time.perf_counter()
    with StoreWriter.open(out, meta, shard_size) as writer:
        todo, existing = pending_rows(rows, writer.store)
        summary.present = len(rows) - todo.num_rows
        if engine == "ray":
            from phrasefuse.extract.ray_engine import embed_images

            batches = embed_images(todo, existing["key"], model, encoder.identity, batch_size=batch_size,
                                   device=device, options=ray or RayOptions(), limits=limits)
        else:
            batches = _embed_images_local(todo, existing["key"], encoder, batch_size, workers, limits)
        known: list[tuple[str, str]] = []
        with _progress(todo.num_rows, "images", progress) as advance:
            for batch in batches:
                known.extend(batch.known)
                if batch.errors:
                    writer.add_errors(*zip(*batch.errors))
                    summary.failed += len(batch.errors)
                if batch.ids:
                    writer.add(batch.ids, batch.keys, batch.emb)
                    summary.embedded += len(batch.ids)
                advance(batch.rows)
        summary.reused = _copy_known(writer, known)
        writer.flush()
    summary.seconds = time.perf_counter() - start
    return summary


def image_loader(todo: pa.Table, known_keys: pa.Array, encoder, batch_size: int, workers: int | None,
                 limits=None):
    """The local engine's reader: a DataLoader whose workers read, hash, decode and prepare the
    rows (id, image) for `encoder`; batches as `images.collate` makes them. Rows whose key is in
    `known_keys` are hashed, not decoded."""
    import torch

    from phrasefuse.extract.images import DEFAULT_LIMITS, ImageRows, collate, worker_init

    dataset = ImageRows(todo["id"].to_pylist(), todo["image"].to_pylist(), encoder.to_pixels,
                        encoder.resize_shorter, frozenset(known_keys.to_pylist()), limits or DEFAULT_LIMITS)
    workers = min(os.cpu_count() or 1, 4) if workers is None else max(0, workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
        worker_init_fn=partial(worker_init, yield_to_model=encoder.device.type == "cpu") if workers else None,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=False)


def _embed_images_local(todo: pa.Table, known_keys: pa.Array, encoder, batch_size: int,
                        workers: int | None, limits=None) -> Iterator[ImageBatch]:
    """The local mapper: `image_loader`'s workers prepare the images; the model runs here. An item
    whose key was embedded earlier in this run (same bytes, another id) is not run again."""
    import torch

    loader = image_loader(todo, known_keys, encoder, batch_size, workers, limits)
    embedded_keys: set[str] = set()
    for batch in loader:
        out = ImageBatch([], [], np.zeros((0, encoder.dim), np.float32), batch["known"], batch["errors"])
        if batch["pixels"] is not None:
            fresh = _first_of_each_key(batch["keys"], embedded_keys)
            out.known.extend((batch["ids"][i], batch["keys"][i]) for i in np.flatnonzero(~fresh))
            if fresh.any():
                pixels = batch["pixels"] if fresh.all() else batch["pixels"][torch.from_numpy(fresh)]
                out.ids = [i for i, f in zip(batch["ids"], fresh) if f]
                out.keys = [k for k, f in zip(batch["keys"], fresh) if f]
                out.emb = encoder.encode(pixels)
                embedded_keys.update(out.keys)
        yield out


def _first_of_each_key(keys: list[str], seen: set[str]) -> np.ndarray:
    """True for the rows whose key was not embedded before in this run (nor earlier in the batch)."""
    fresh = np.ones(len(keys), dtype=bool)
    batch_seen: set[str] = set()
    for i, k in enumerate(keys):
        if k in seen or k in batch_seen:
            fresh[i] = False
        batch_seen.add(k)
    return fresh


# ---------------------------------------------------------------- texts


def text_column(manifest: Manifest, col: str) -> pa.Array:
    """A text column as strings: lists (tags) joined with ', ', numbers cast; whitespace trimmed."""
    values = manifest.column(col).combine_chunks()
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        values = pc.binary_join(pc.cast(values, pa.list_(pa.string())), ", ")
    elif pa.types.is_null(values.type) or not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        try:
            values = pc.cast(values, pa.string())
        except pa.ArrowException:
            raise BadInput(f"{manifest.source}: column '{col}' has type {values.type}; expected text") from None
    return pc.utf8_trim_whitespace(pc.cast(values, pa.string()))


def extract_texts(manifest: str | os.PathLike, col: str, out: str | os.PathLike, *,
                  model: str = DEFAULT_TEXT_MODEL, batch_size: int = 256, device: str = "auto",
                  limit: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float32",
                  progress: bool | None = None, engine: str = "local", ray: RayOptions | None = None) -> ExtractSummary:
    """Embed the text column `col` of a manifest into the store `out`. Each distinct
    text is embedded once; missing and empty texts go to errors.parquet."""
    from phrasefuse.extract.encoders import load_text_encoder

    _check_sizes(batch_size, shard_size, limit)
    check_engine(engine, ray)
    rows = read_manifest(manifest).head(limit)
    texts = text_column(rows, col)  # refuses a missing column before loading a model
    encoder = load_text_encoder(model, "cpu" if engine == "ray" else device)
    meta = new_meta(modality="text", encoder=encoder.identity, dtype=dtype,
                    source={"manifest": str(manifest), "column": col})
    summary = ExtractSummary(f"texts ({col})", str(out), rows=len(rows))
    start = time.perf_counter()
    table = pa.table({"id": rows.ids, "text": texts})
    with StoreWriter.open(out, meta, shard_size) as writer:
        existing = writer.store.ids_and_keys() if writer.store.exists() else None
        if existing is not None:
            table = table.filter(pc.invert(pc.is_in(table["id"], value_set=existing["id"])))
        summary.present = len(rows) - table.num_rows
        # Missing / empty texts are row errors, not manifest errors.
        missing = pc.or_(pc.is_null(table["text"]), pc.equal(pc.utf8_length(table["text"].fill_null("")), 0))
        bad = table.filter(missing)
        writer.add_errors(bad["id"].to_pylist(),
                          ["missing text" if t is None else "empty text" for t in bad["text"].to_pylist()])
        summary.failed = summary.no_text = bad.num_rows
        table = table.filter(pc.invert(missing))
        keys = sql("SELECT sha256(text) AS key FROM t", t=table)["key"]
        table = table.append_column("key", keys)
        known = pc.is_in(table["key"], value_set=existing["key"]) if existing is not None else \
            pa.array(np.zeros(table.num_rows, bool))
        reuse, todo = table.filter(known), table.filter(pc.invert(known))
        # One model call per distinct text; every row with that text gets its vector.
        unique = sql("SELECT key, any_value(text) AS text FROM t GROUP BY key", t=todo)
        if engine == "ray":
            from phrasefuse.extract.ray_engine import embed_texts

            chunks = embed_texts(unique, model, encoder.identity, batch_size=batch_size, device=device,
                                 options=ray or RayOptions())
        else:
            chunks = _embed_texts_local(unique, encoder, batch_size, shard_size)
        with _progress(unique.num_rows, f"texts ({col})", progress) as advance:
            for chunk_keys, emb in chunks:
                rows_of_chunk = todo.filter(pc.is_in(todo["key"], value_set=chunk_keys))
                where = pc.index_in(rows_of_chunk["key"], value_set=chunk_keys).to_numpy()
                writer.add(rows_of_chunk["id"], rows_of_chunk["key"], emb[where])
                summary.embedded += len(chunk_keys)
                summary.reused += rows_of_chunk.num_rows - len(chunk_keys)
                advance(len(chunk_keys))
        summary.reused += _copy_known(writer, list(zip(reuse["id"].to_pylist(), reuse["key"].to_pylist())))
        writer.flush()
    summary.seconds = time.perf_counter() - start
    return summary


def _embed_texts_local(unique: pa.Table, encoder, batch_size: int,
                       chunk_rows: int) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """The local mapper: (keys, vectors) of the distinct texts, `chunk_rows` at a time."""
    for start_row in range(0, unique.num_rows, chunk_rows):
        chunk = unique.slice(start_row, chunk_rows)
        yield chunk["key"].combine_chunks(), encoder.encode(chunk["text"].to_pylist(), batch_size=batch_size)


def check_engine(engine: str, ray: RayOptions | None = None) -> None:
    if engine not in ENGINES:
        raise BadInput(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if engine == "ray":  # before the store is opened: Ray installed, the cluster reachable
        from phrasefuse.extract.ray_engine import preflight

        preflight(ray or RayOptions())


def _check_sizes(batch_size: int, shard_size: int, limit: int | None) -> None:
    if batch_size < 1:
        raise BadInput(f"--batch-size {batch_size}: must be at least 1")
    if shard_size < 1:
        raise BadInput(f"--shard-size {shard_size}: must be at least 1")
    if limit is not None and limit < 0:
        raise BadInput(f"--limit {limit}: must be 0 or more")
