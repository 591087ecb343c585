"""The extract jobs: embed every image / text of a manifest once, into a store.

Each job is reader -> mapper -> writer (`phrasefuse.engine` runs the mapper, locally or on Ray):
  reader  the manifest rows (`image_rows`, `text_rows`) not yet in the store, or whose content
          changed (`_pending_images`, `_pending_texts`), and, per row, its content key (sha256 of
          the image bytes / of the text);
  mapper  the encoder, on batches (`image_job`, `text_job`: the mappers of `extract.mappers`
          for both engines);
  writer  `StoreWriter`, in this process whatever the engine: whole shards, errors.parquet,
          the store lock; so resume and embed-once behave the same on both engines.

Embed once, keyed by what the item is: an id already in the store is skipped while its content
is the same; an item whose content key is already embedded (another id, an earlier manifest) is
copied, not re-embedded. A killed job loses at most the shard it was filling; the next run resumes.

Changed content: each image row stores a `stamp` (`source_stamps`: the file its bytes come from,
with that file's size, mtime_ns and ctime_ns, and the tar member's offset or the Parquet row). An
id whose stamp is unchanged is trusted without reading the file (the fast path of make, rsync and
git's index; ctime is in it because no user tool sets it back, so a photo replaced with the same
size and its mtime restored is still noticed). Otherwise its bytes are read and hashed: the same
content key only refreshes the stamp (a touched file is not embedded again); another key is a
changed item: its old row is dropped (`StoreWriter.revise`) and it is embedded again ("changed"
in the summary). Texts: the key is the text's sha256, computed for every row, so an id whose text
changed is embedded again likewise. A file that cannot be stat'ed now (an unmounted disk) keeps its
stored row: nothing says it changed.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.engine import BLOCK_BATCHES, Job, RayOptions, ReplicaPool, arrow_blocks, get_engine, progress as progress_bar
from phrasefuse.errors import BadInput
from phrasefuse.extract import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL
from phrasefuse.manifests import Manifest, Source, image_chunks, read_manifest
from phrasefuse.manifests.tables import sql
from phrasefuse.manifests.sources import OFFSET_COL, SIZE_COL
from phrasefuse.manifests.tables import ROW_COL
from phrasefuse.extract.identity import (record_weights_stamp, recorded_identity, refuse_other_model, stamped,
                                         weights_stamp)
from phrasefuse.store import STAMP, EmbeddingStore, StoreWriter, new_meta

DEFAULT_SHARD_SIZE = 10_000

__all__ = ["DEFAULT_SHARD_SIZE", "ExtractSummary", "RayOptions", "extract_images", "extract_texts", "image_job",
           "image_rows", "pending_rows", "source_stamps", "stamps_fingerprint", "text_column", "text_job",
           "text_rows"]


@dataclass
class ExtractSummary:
    what: str
    store: str
    rows: int = 0
    embedded: int = 0  # ran through the model
    reused: int = 0  # content already embedded under another id: copied
    present: int = 0  # id already in the store, same content: skipped
    changed: int = 0  # id already in the store, other content: old row dropped, embedded again (in `embedded`)
    failed: int = 0  # in errors.parquet
    no_text: int = 0  # of the failed: a missing or empty text (extract texts)
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        done = self.embedded + self.reused
        return done / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        broken = self.failed - self.no_text
        failed = f"{broken} failed" + (f" (see {self.store}/errors.parquet)" if broken else "")
        if self.no_text:
            failed += f", {self.no_text} without text"
        changed = f", {self.changed} changed (old vectors replaced)" if self.changed else ""
        return (f"extract {self.what}: {self.embedded} embedded, {self.reused} reused, {self.present} already in store"
                f"{changed}, {failed}; {self.seconds:.1f} s, {self.rows_per_second:.1f} rows/s -> {self.store}")

    def as_dict(self) -> dict:
        """As `text` counts them: `failed` the broken rows, `no_text` the rows without text
        (`errors`: both, the rows of errors.parquet this run)."""
        return asdict(self) | {"failed": self.failed - self.no_text, "errors": self.failed,
                               "rows_per_second": round(self.rows_per_second, 2)}


# ---------------------------------------------------------------- reader


def pending_rows(manifest: Manifest, store: EmbeddingStore) -> tuple[pa.Table, pa.Table]:
    """(rows of the manifest whose id is not in the store, the store's id/key table). By id only:
    the extract jobs also re-embed changed content (`_pending_images`)."""
    existing = store.ids_and_keys() if store.exists() else pa.table({"id": pa.array([], pa.string()),
                                                                      "key": pa.array([], pa.string())})
    todo = manifest.table.filter(pc.invert(pc.is_in(manifest.table["id"], value_set=existing["id"])))
    return todo, existing


def image_rows(manifest: str | os.PathLike | Source, limit: int | None, allow_outside_paths: bool) -> Manifest:
    """The image job's input rows: a table, a folder of images, WebDataset tars or Parquet with image
    bytes (`manifests.sources`; the rows' image bytes: `manifests.image_chunks`). Image paths that
    resolve outside the manifest's folder are refused unless `allow_outside_paths`."""
    return read_manifest(manifest, require_image=True, allow_outside_paths=allow_outside_paths).head(limit)


def _copy_known(writer: StoreWriter, known: list[tuple[str, str]], stamps: "_Stamps | None" = None) -> int:
    """Rows whose content is already in the store: copy the embedding under the new id."""
    if not known:
        return 0
    writer.flush()  # keys embedded in this run must be on disk to be found
    ids, keys = zip(*known)
    emb = writer.store.embeddings_by_key(pa.array(keys, pa.string()))
    writer.add(ids, keys, emb, extra={STAMP: stamps.of(ids)} if stamps is not None else None)
    return len(ids)


# ---------------------------------------------------------------- changed images


def source_stamps(rows: pa.Table, image_bytes: str | None) -> pa.Array:
    """Per manifest row (absolute `image` paths, as `read_manifest` gives them), where its bytes are
    and the state of that file: 'PATH|SIZE:MTIME_NS:CTIME_NS', then '|@OFFSET+SIZE' for a tar member
    or '|#ROW:COLUMN' for Parquet bytes. Null when the file cannot be stat'ed (or is not a regular
    file) or the sample has no image. One stat per distinct file (a tar or a Parquet file: once)."""
    paths = pc.cast(rows["image"], pa.string()).combine_chunks()
    distinct = pc.unique(paths.drop_null())
    states: list[str | None] = []
    for path in distinct.to_pylist():
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            states.append(None)
            continue
        states.append(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}" if stat.S_ISREG(st.st_mode) else None)
    state = pa.array(states, pa.string()).take(pc.index_in(paths, value_set=distinct))
    parts = [paths, state]

    def text(name: str) -> pa.Array:
        return pc.cast(rows[name].combine_chunks(), pa.string())

    if OFFSET_COL in rows.column_names:
        parts.append(pc.binary_join_element_wise("@", text(OFFSET_COL), "+", text(SIZE_COL), ""))
    elif image_bytes is not None:
        parts.append(pc.binary_join_element_wise("#", text(ROW_COL), f":{image_bytes}", ""))
    return pc.binary_join_element_wise(*parts, "|")  # null when any part is


def stamps_fingerprint(manifest: str | os.PathLike | Source, allow_outside_paths: bool = False) -> str:
    """sha256 over the (id, stamp) of every image row: changes when any image file does (`run`'s
    extract stage reruns then, even when the manifest file itself is the same)."""
    import hashlib

    rows = image_rows(manifest, None, allow_outside_paths)
    stamps = source_stamps(rows.table, rows.image_bytes).fill_null("")
    h = hashlib.sha256()
    for column in (rows.ids, stamps):
        h.update(b"\0".join(v.encode() for v in column.to_pylist()))
        h.update(b"\1")
    return h.hexdigest()


class _Stamps:
    """id -> stamp for the rows of a job, found by binary search (no per-batch hash table over all
    the rows, no dict of a million Python strings)."""

    def __init__(self, ids: pa.Array, stamps: pa.Array):
        order = pc.sort_indices(ids)
        self.ids = ids.take(order).to_numpy(zero_copy_only=False)
        self.stamps = stamps.take(order)

    def of(self, ids) -> pa.Array:
        pos = np.searchsorted(self.ids, np.asarray(list(ids), dtype=object))
        return self.stamps.take(pa.array(pos, pa.int64()))


def _content_keys(rows: pa.Table, image_bytes: str | None, limits) -> pa.Table:
    """(id, key) of `rows`, reading and hashing their bytes (no decoding); key null when unreadable."""
    from concurrent.futures import ThreadPoolExecutor

    from phrasefuse.extract.images import DEFAULT_LIMITS, content_key, image_sources, read_source

    def key_of(source) -> str | None:
        data, _ = read_source(source, limits or DEFAULT_LIMITS)
        return None if data is None else content_key(data)

    ids: list[pa.Array] = []
    keys: list[str | None] = []
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:  # hashlib and reads release the GIL
        for chunk in image_chunks(rows, image_bytes):
            ids.append(chunk["id"].combine_chunks())
            keys.extend(pool.map(key_of, image_sources(chunk)))
    return pa.table({"id": pa.concat_arrays(ids) if ids else pa.array([], pa.string()),
                     "key": pa.array(keys, pa.string())})


def _pending_images(rows: Manifest, stamps: pa.Array, existing: pa.Table,
                    limits) -> tuple[pa.Table, pa.Array, pa.Table]:
    """(rows to embed, ids whose content changed, (id, stamp) of ids checked and unchanged).
    `existing` is the store's (id, key, stamp)."""
    ids = rows.ids
    pos = pc.index_in(ids, value_set=existing["id"])
    present = pc.is_valid(pos)
    same = pc.fill_null(pc.equal(existing[STAMP].combine_chunks().take(pos), stamps), False)
    # Present, stamp differs (or the store has none yet), and the file is there to check.
    check = pc.and_(pc.and_(present, pc.invert(same)), pc.is_valid(stamps))
    changed = pa.array([], pa.string())
    restamp = pa.table({"id": pa.array([], pa.string()), STAMP: pa.array([], pa.string())})
    if pc.any(check).as_py():
        checked = _content_keys(rows.table.filter(check), rows.image_bytes, limits)
        stored = existing["key"].combine_chunks().take(pc.index_in(checked["id"], value_set=existing["id"]))
        unchanged = pc.fill_null(pc.equal(checked["key"], stored), False)
        changed = checked["id"].filter(pc.invert(unchanged)).combine_chunks()
        kept = checked["id"].filter(unchanged).combine_chunks()
        restamp = pa.table({"id": kept, STAMP: stamps.take(pc.index_in(kept, value_set=ids))})
    todo = rows.table.filter(pc.or_(pc.invert(present), pc.is_in(ids, value_set=changed)))
    return todo, changed, restamp


# ---------------------------------------------------------------- images


def image_job(todo: pa.Table, known_keys: pa.Array | pa.ChunkedArray, encoder, spec: str, *, batch_size: int,
              workers: int | None, device: str, limits=None, replicas: ReplicaPool | None = None) -> Job:
    """The image mapper for either engine: pending rows (id, image[, _offset, _size | _bytes]: a chunk of
    `manifests.image_chunks`) -> `mappers.ImageBatch`es. Locally, `replicas` (started by the caller,
    which has sent them `known_keys`) embed the rows instead of the model of this process."""
    from phrasefuse.extract import mappers

    known_keys = known_keys.combine_chunks() if isinstance(known_keys, pa.ChunkedArray) else known_keys
    if replicas is not None:
        local = lambda: mappers.embed_images_replicas(todo, replicas, batch_size)  # noqa: E731
    else:
        local = lambda: mappers.embed_images_local(todo, known_keys, encoder, batch_size, workers, limits)  # noqa: E731
    return Job(pending=todo.num_rows > 0, local=local,
               actor=mappers.ImageEmbedder,
               # No encoder when nothing is to embed (not loaded: `extract_images`); the job then never runs.
               actor_args={"spec": spec, "identity": getattr(encoder, "identity", None), "known_keys": known_keys,
                           "limits": limits},
               read=lambda ray: arrow_blocks(ray, todo, batch_size * BLOCK_BATCHES),
               batch_size=batch_size, device=device, collect=mappers.image_batches_from_actors)


def extract_images(manifest: str | os.PathLike, out: str | os.PathLike, *, model: str = DEFAULT_IMAGE_MODEL,
                   batch_size: int = 64, workers: int | None = None, device: str = "auto",
                   limit: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float32",
                   progress: bool | None = None, allow_outside_paths: bool = False, engine: str = "local",
                   ray: RayOptions | None = None, limits=None, replicas: int | str = 1) -> ExtractSummary:
    """Embed the `image` column of a manifest into the store `out`. Image paths that resolve
    outside the manifest's folder are refused unless `allow_outside_paths`; images over `limits`
    (`images.ImageLimits`: file size, pixels, aspect ratio; None: the defaults) are error rows.
    `replicas` (CPU, local engine): model processes (1, the default: this one), or "auto" as
    `planned_replicas` decides (spawned processes re-import the caller's main module: a script needs
    `if __name__ == "__main__"`)."""
    _check_sizes(batch_size, shard_size, limit)
    if workers is not None and workers < 0:  # 0 is meaningful: decode in this process
        raise BadInput(f"--workers {workers}: must be 0 or more (0 decodes in the main process)")
    runner = get_engine(engine, ray)
    rows = image_rows(manifest, limit, allow_outside_paths)
    if replicas != "auto":  # a bad --replicas is refused before any work, even when nothing is to embed
        planned_replicas(replicas, device, engine, len(rows))
    summary = ExtractSummary("images", str(out), rows=len(rows))
    with contextlib.ExitStack() as stack:
        lazy = _ImageModel(stack, runner, model, device, engine, replicas, limits, len(rows))
        # The store's record names this model while its weights files are unchanged: no load to learn it.
        identity = _recorded(out, model)
        if identity is None:
            stamp = weights_stamp(model)  # before loading: weights changed meanwhile are seen next time
            identity = stamped(lazy.load()[0].identity, stamp)
        encoder, pool = lazy.encoder, lazy.pool
        meta = new_meta(modality="image", encoder=identity, dtype=dtype,
                        preprocess=encoder.preprocess if encoder else EmbeddingStore(out).meta.get("preprocess"),
                        source={"manifest": str(manifest), "column": "image"})
        start = time.perf_counter()
        writer = stack.enter_context(StoreWriter.open(out, meta, shard_size))
        stamps = source_stamps(rows.table, rows.image_bytes)  # before any read: a later change is seen next time
        existing = writer.store.ids_keys_stamps()
        todo, changed, restamp = _pending_images(rows, stamps, existing, limits)
        writer.revise(changed, restamp)  # the old vectors of changed images go before anything is added
        existing = existing.filter(pc.invert(pc.is_in(existing["id"], value_set=changed)))
        summary.present, summary.changed = len(rows) - todo.num_rows, len(changed)
        if todo.num_rows and encoder is None:
            encoder, pool = lazy.load()
            start += lazy.seconds  # as when loaded first: the rate is of the embedding
            refuse_other_model(writer, encoder.identity)
        if encoder is not None:
            record_weights_stamp(writer, identity)
        stamp_of = _Stamps(pc.cast(todo["id"], pa.string()).combine_chunks(),
                           stamps.filter(pc.is_in(rows.ids, value_set=todo["id"])))
        known_keys, known, sent_keys = existing["key"].combine_chunks(), [], 0
        with progress_bar(todo.num_rows, "extract images", progress) as advance:
            for chunk in image_chunks(todo, rows.image_bytes):  # Parquet bytes: a few thousand rows at a time
                if pool is not None:  # the keys embedded so far, as the local mapper gets them in `known_keys`
                    pool.broadcast("add_known_keys", known_keys.slice(sent_keys))
                    sent_keys = len(known_keys)
                job = image_job(chunk, known_keys, encoder, model, batch_size=batch_size, workers=workers,
                                device=device, limits=limits, replicas=pool)
                new_keys = _write_image_batches(writer, runner.map(job), summary, advance, known, stamp_of)
                known_keys = pa.concat_arrays([known_keys, pa.array(new_keys, pa.string())])
        summary.reused = _copy_known(writer, known, stamp_of)
        writer.flush()
    summary.seconds = time.perf_counter() - start
    return summary


class _ImageModel:
    """The image encoder of a job and its replicas (`replicas`), loaded by `load`: only once the
    store's record cannot name the model, or some row is to be embedded."""

    def __init__(self, stack: contextlib.ExitStack, runner, model: str, device: str, engine: str,
                 replicas: int | str, limits, rows: int):
        self.stack, self.runner, self.model, self.device, self.engine = stack, runner, model, device, engine
        self.replicas, self.limits, self.rows = replicas, limits, rows
        self.encoder, self.pool, self.seconds = None, None, 0.0

    def load(self) -> tuple:
        """(encoder, replica pool or None); `seconds` is how long that took."""
        from phrasefuse.extract.encoders import load_image_encoder  # torch: only when a model runs

        began = time.perf_counter()
        count = planned_replicas(self.replicas, self.device, self.engine, self.rows)
        pool = self.stack.enter_context(_replica_pool(self.model, self.limits, count)) if count > 1 else None
        self.encoder = self.runner.driver_encoder(load_image_encoder, self.model, self.device)  # beside the pool's
        self.pool = _keep_replicas(pool, self.encoder, self.model, auto=self.replicas == "auto")
        self.seconds = time.perf_counter() - began
        return self.encoder, self.pool


def _recorded(out: str | os.PathLike, spec: str) -> dict | None:
    """The encoder record of the store `out` when it can stand for `spec` unloaded (`identity.recorded_identity`)."""
    store = EmbeddingStore(out)
    return recorded_identity(spec, store.meta) if store.exists() else None


AUTO_REPLICA_ROWS = 2_000  # fewer rows: starting the replicas (seconds) costs more than they save
AUTO_REPLICA_PARAMETERS = 1_000_000  # a smaller model is cheap beside decoding, which the workers spread already
AUTO_REPLICA_MEMORY = 3 << 30  # bytes a replica may take: EfficientNet-Lite0 at batch 64 peaks at 2.6-2.8 GiB


def planned_replicas(replicas: int | str, device: str, engine: str, rows: int) -> int:
    """How many model processes `extract images` runs (1: the model in this process, over every core).

    "auto": one single-threaded replica per core when the model runs on the CPU (`device` cpu, or
    auto without CUDA), the engine is local, there are at least 2 cores and AUTO_REPLICA_ROWS rows
    (and, once the model is loaded, it has AUTO_REPLICA_PARAMETERS parameters: `_keep_replicas`);
    fewer (the cores shared out) when the available memory does not hold AUTO_REPLICA_MEMORY per
    replica; else 1. N > 1 asks for N replicas (the cores shared out between them), on the CPU only."""
    from phrasefuse.engine import cpu_cores

    if replicas != "auto":
        try:
            count = int(replicas)
        except (TypeError, ValueError):
            raise BadInput(f"--replicas {replicas}: expected auto or a number of at least 1") from None
        if count < 1:
            raise BadInput(f"--replicas {replicas}: expected auto or a number of at least 1")
        if count > 1 and (engine != "local" or _on_cuda(device)):
            raise BadInput(f"--replicas {count}: model replicas run the model on this machine's CPU; "
                           f"use --device cpu and --engine local, or drop --replicas")
        return count
    if engine != "local" or _on_cuda(device) or cpu_cores() < 2 or rows < AUTO_REPLICA_ROWS:
        return 1
    fit = available_memory() // AUTO_REPLICA_MEMORY  # many cores, little memory: fewer, wider replicas
    return max(1, min(cpu_cores(), fit))


def available_memory() -> int:
    """Bytes of memory available to new processes (Linux: MemAvailable); unknown: as if plenty."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 60


def _on_cuda(device: str) -> bool:
    import torch

    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


@contextlib.contextmanager
def _replica_pool(model: str, limits, count: int):
    """`count` `ImageEmbedder` replicas, the cores shared out between them; stopped on the way out."""
    from phrasefuse.engine import ReplicaPool, cpu_cores
    from phrasefuse.extract.mappers import ImageEmbedder

    args = {"spec": model, "identity": None, "known_keys": pa.array([], pa.string()), "limits": limits}
    pool = ReplicaPool(ImageEmbedder, args, count, threads=max(1, cpu_cores() // count))
    try:
        yield pool
    finally:
        pool.close()


def _keep_replicas(pool, encoder, model: str, auto: bool):
    """The replicas to use: none when "auto" started them for a model too small to gain from them."""
    if pool is None:
        return None
    if auto and sum(p.numel() for p in encoder.module.parameters()) < AUTO_REPLICA_PARAMETERS:
        pool.close()
        return None
    pool.expect(encoder.identity, model)
    return pool


def _write_image_batches(writer: StoreWriter, batches: Iterator, summary: ExtractSummary,
                         advance, known: list[tuple[str, str]], stamps: _Stamps) -> list[str]:
    """Write the embedded rows and the errors of each batch; adds the (id, key) rows to copy to
    `known`; returns the keys embedded."""
    keys: list[str] = []
    for batch in batches:
        known.extend(batch.known)
        if batch.errors:
            writer.add_errors(*zip(*batch.errors))
            summary.failed += len(batch.errors)
        if batch.ids:
            writer.add(batch.ids, batch.keys, batch.emb, extra={STAMP: stamps.of(batch.ids)})
            summary.embedded += len(batch.ids)
            keys.extend(batch.keys)
        advance(batch.rows)
    return keys


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


def text_rows(manifest: str | os.PathLike | Source, col: str, limit: int | None) -> pa.Table:
    """The text job's input rows (id, text): refuses a missing column before a model is loaded."""
    rows = read_manifest(manifest).head(limit)
    return pa.table({"id": rows.ids, "text": text_column(rows, col)})


def text_job(unique: pa.Table, encoder, spec: str, *, batch_size: int, chunk_rows: int, device: str) -> Job:
    """The text mapper for either engine: distinct texts (key, text) -> (keys, vectors)."""
    from phrasefuse.extract import mappers

    return Job(pending=unique.num_rows > 0,
               local=lambda: mappers.embed_texts_local(unique, encoder, batch_size, chunk_rows),
               actor=mappers.TextEmbedder,
               # No encoder when nothing is to embed (not loaded: `extract_texts`); the job then never runs.
               actor_args={"spec": spec, "identity": getattr(encoder, "identity", None), "batch_size": batch_size},
               read=lambda ray: arrow_blocks(ray, unique.select(["key", "text"]), batch_size * BLOCK_BATCHES),
               batch_size=batch_size * BLOCK_BATCHES, device=device, collect=mappers.text_batches_from_actors)


def extract_texts(manifest: str | os.PathLike, col: str, out: str | os.PathLike, *,
                  model: str = DEFAULT_TEXT_MODEL, batch_size: int = 256, device: str = "auto",
                  limit: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float32",
                  progress: bool | None = None, engine: str = "local", ray: RayOptions | None = None) -> ExtractSummary:
    """Embed the text column `col` of a manifest into the store `out`. Each distinct
    text is embedded once; missing and empty texts go to errors.parquet."""
    def load_text_encoder(spec: str, device: str):  # torch: only when a model runs
        from phrasefuse.extract.encoders import load_text_encoder

        return load_text_encoder(spec, device)

    _check_sizes(batch_size, shard_size, limit)
    runner = get_engine(engine, ray)
    table = text_rows(manifest, col, limit)
    # As extract images: the store's record stands for the model while its weights files are unchanged.
    encoder, identity = None, _recorded(out, model)
    if identity is None:
        stamp = weights_stamp(model)  # before loading: weights changed meanwhile are seen next time
        encoder = runner.driver_encoder(load_text_encoder, model, device)
        identity = stamped(encoder.identity, stamp)
    meta = new_meta(modality="text", encoder=identity, dtype=dtype,
                    source={"manifest": str(manifest), "column": col})
    summary = ExtractSummary(f"texts ({col})", str(out), rows=table.num_rows)
    start = time.perf_counter()
    with StoreWriter.open(out, meta, shard_size) as writer:
        reuse, todo = _pending_texts(table, writer, summary)
        if todo.num_rows and encoder is None:
            began = time.perf_counter()
            encoder = runner.driver_encoder(load_text_encoder, model, device)
            start += time.perf_counter() - began  # as when loaded first: the rate is of the embedding
            refuse_other_model(writer, encoder.identity)
        if encoder is not None:
            record_weights_stamp(writer, identity)
        # One model call per distinct text; every row with that text gets its vector.
        unique = sql("SELECT key, any_value(text) AS text FROM t GROUP BY key", t=todo)
        job = text_job(unique, encoder, model, batch_size=batch_size, chunk_rows=shard_size, device=device)
        with progress_bar(unique.num_rows, f"extract texts ({col})", progress) as advance:
            for chunk_keys, emb in runner.map(job):
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


def _pending_texts(table: pa.Table, writer: StoreWriter, summary: ExtractSummary) -> tuple[pa.Table, pa.Table]:
    """Rows (id, text) not yet in the store, keyed: (rows whose key the store has: copied, rows to embed).
    Missing and empty texts are row errors (written now), not manifest errors."""
    rows = table.num_rows
    existing = writer.store.ids_and_keys() if writer.store.exists() else None
    missing = pc.or_(pc.is_null(table["text"]), pc.equal(pc.utf8_length(table["text"].fill_null("")), 0))
    # Every row's key (a missing or empty text: none), so that an id whose text changed is noticed.
    keys = pc.if_else(missing, pa.scalar(None, pa.string()), sql("SELECT sha256(text) AS key FROM t", t=table)["key"])
    table = table.append_column("key", keys)
    if existing is not None:
        pos = pc.index_in(table["id"], value_set=existing["id"])
        present = pc.is_valid(pos)
        differs = pc.and_(present, pc.fill_null(pc.not_equal(existing["key"].combine_chunks().take(pos),
                                                              table["key"]), True))
        changed = table["id"].filter(differs).combine_chunks()
        summary.changed = len(changed)
        writer.revise(changed)  # the old vector goes; the new text (or its error row) replaces it
        existing = existing.filter(pc.invert(pc.is_in(existing["id"], value_set=changed)))
        table = table.filter(pc.or_(pc.invert(present), differs))
    summary.present = rows - table.num_rows
    missing = pc.or_(pc.is_null(table["text"]), pc.equal(pc.utf8_length(table["text"].fill_null("")), 0))
    bad = table.filter(missing)
    writer.add_errors(bad["id"].to_pylist(),
                      ["missing text" if t is None else "empty text" for t in bad["text"].to_pylist()])
    summary.failed = summary.no_text = bad.num_rows
    table = table.filter(pc.invert(missing))
    known = pc.is_in(table["key"], value_set=existing["key"]) if existing is not None else \
        pa.array(np.zeros(table.num_rows, bool))
    return table.filter(known), table.filter(pc.invert(known))


def _check_sizes(batch_size: int, shard_size: int, limit: int | None) -> None:
    if batch_size < 1:
        raise BadInput(f"--batch-size {batch_size}: must be at least 1")
    if shard_size < 1:
        raise BadInput(f"--shard-size {shard_size}: must be at least 1")
    if limit is not None and limit < 0:
        raise BadInput(f"--limit {limit}: must be 0 or more")
