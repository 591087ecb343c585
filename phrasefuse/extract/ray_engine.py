"""`--engine ray`: the mappers of the batch jobs on Ray Data, so that a Ray cluster spreads the work.

Only the mapper moves. The job functions (`extract.jobs.extract_images`, `extract_texts`,
`index.phrases.generate_phrases`) still compute the pending rows and write every shard
through `StoreWriter` in the driver, so the store, resume and embed-once are those of the
local engine. Here:

  reader  the pending rows as Arrow blocks (`ray.data.from_arrow`; for phrases, the image
          store's shards, one Ray task each through `EmbeddingStore.read_shard`, minus the ids done);
  mapper  `map_batches` with a callable class: one actor per device (per GPU, else one per CPU
          left after the driver's), which loads the model once and checks that its weights
          are the ones the driver recorded in meta.json;
  output  Arrow tables streamed back to the driver (`iter_batches`), in whatever order the
          actors finish (stores are keyed by id; row order carries no meaning).

Nothing here is imported with `--engine local`. Ray starts on first use: `RayOptions.address`
(`--ray-address`), else $RAY_ADDRESS, else a local instance on this machine (a few seconds).
Every file path (manifest images, the index, the image store) must be readable at the same
path on every node of a cluster (shared storage).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.errors import BadInput
from phrasefuse.store import EmbeddingStore, embedding_array, embeddings_to_numpy, encoder_identity

BLOCK_BATCHES = 4  # model batches per block handed to an actor


# ---------------------------------------------------------------- session and actor pool


def preflight(options) -> None:
    """Before a job opens its store: Ray is installed, and the cluster address answers."""
    _import_ray()
    _probe(options.address or os.environ.get("RAY_ADDRESS"))


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise BadInput("--engine ray: Ray is not installed; pip install 'phrasefuse[ray]' (or use --engine local)") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None):
    """The connected `ray` module; a Ray started here is shut down on exit (one already
    initialised by the caller, e.g. tests, is left running)."""
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        _probe(address or os.environ.get("RAY_ADDRESS"))
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError) as e:
            raise BadInput(f"--ray-address {address or '$RAY_ADDRESS'}: cannot connect to Ray "
                           f"({str(e).splitlines()[0][:160]}); check the address or unset it") from None
        started = True
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # execution plans and "progress bars disabled"
    ray.data.DataContext.get_current().enable_progress_bars = False  # the job's own summary line is the report
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds on an unreachable HOST:PORT (Ray itself retries for minutes)."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # a form only Ray knows: let it judge
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise BadInput(f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the cluster "
                       f"('ray start --head') or fix the address") from None


def actor_pool(ray, device: str, actors: int | None) -> tuple[dict, str, int]:
    """(map_batches resource arguments, device for the actors, threads per actor): one actor
    per GPU when the cluster has GPUs (and `device` allows), else one per CPU but one (kept for
    the driver and Ray's read tasks), each with an equal share of the CPUs."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if actors is not None and actors < 1:
        raise BadInput(f"--ray-actors {actors}: must be at least 1")
    if device == "cuda" and not gpus:
        raise BadInput("--device cuda: the Ray cluster has no GPU; use --device auto or cpu")
    if device != "cpu" and gpus:
        n = actors or gpus
        return {"compute": ray.data.ActorPoolStrategy(size=n), "num_gpus": 1, "num_cpus": 1}, "cuda", 1
    spare = max(1, cpus - 1)
    n = actors or spare
    threads = max(1, spare // n)
    return {"compute": ray.data.ActorPoolStrategy(size=n), "num_cpus": threads}, "cpu", threads


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def _check_identity(loaded: dict, expected: dict, spec: str) -> None:
    """A node with other weights (another package version, another file) must not mix its vectors in."""
    if encoder_identity(loaded) != encoder_identity(expected):
        raise RuntimeError(f"{spec}: a Ray worker loaded weights {loaded.get('weights_sha256', '')[:12]} "
                           f"(dim {loaded.get('dim')}), the driver {expected.get('weights_sha256', '')[:12]} "
                           f"(dim {expected.get('dim')}); install the same model on every node")


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ---------------------------------------------------------------- images


class ImageEmbedder:
    """Ray actor: manifest rows (id, image) -> (id, key, reason, embedded, emb). The per-row work
    is the local engine's (`images.ImageRows`: read, hash, skip known keys, decode, transform),
    on `threads` threads; the model runs once per batch."""

    def __init__(self, spec: str, device: str, identity: dict, known_keys: pa.Array, threads: int, limits=None):
        from phrasefuse.extract.encoders import load_image_encoder
        from phrasefuse.extract.images import DEFAULT_LIMITS

        self.limits = limits or DEFAULT_LIMITS
        _set_threads(threads)
        self.encoder = load_image_encoder(spec, device)
        _check_identity(self.encoder.identity, identity, spec)
        self.known_keys = frozenset(known_keys.to_pylist())
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from phrasefuse.extract.images import ImageRows, collate

        rows = ImageRows(batch["id"].to_pylist(), batch["image"].to_pylist(), self.encoder.to_pixels,
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


def embed_images(todo: pa.Table, known_keys: pa.Array, spec: str, identity: dict, *, batch_size: int,
                 device: str, options, limits=None) -> Iterator:
    """The Ray mapper of `extract_images`: yields `jobs.ImageBatch`es, as the local one does. Rows
    whose key another actor embedded earlier in this run become `known` (copied, like the local engine)."""
    from phrasefuse.extract.jobs import ImageBatch, _first_of_each_key

    if todo.num_rows == 0:
        return
    with ray_session(options.address) as ray:
        resources, actor_device, threads = actor_pool(ray, device, options.actors)
        dataset = ray.data.from_arrow(_blocks(todo.select(["id", "image"]), batch_size * BLOCK_BATCHES))
        results = dataset.map_batches(
            ImageEmbedder, batch_size=batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"spec": spec, "device": actor_device, "identity": identity,
                                   "known_keys": known_keys.combine_chunks() if isinstance(known_keys, pa.ChunkedArray)
                                   else known_keys, "threads": threads, "limits": limits},
            **resources)
        embedded_keys: set[str] = set()
        for out in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            failed = out.filter(pc.is_valid(out["reason"]))
            done = out.filter(pc.and_(pc.is_null(out["reason"]), out["embedded"]))
            skipped = out.filter(pc.and_(pc.is_null(out["reason"]), pc.invert(out["embedded"])))
            ids, keys = done["id"].to_pylist(), done["key"].to_pylist()
            fresh = _first_of_each_key(keys, embedded_keys)
            batch = ImageBatch([i for i, f in zip(ids, fresh) if f], [k for k, f in zip(keys, fresh) if f],
                               embeddings_to_numpy(done["emb"])[fresh],
                               known=list(zip(skipped["id"].to_pylist(), skipped["key"].to_pylist())),
                               errors=list(zip(failed["id"].to_pylist(), failed["reason"].to_pylist())))
            batch.known.extend((i, k) for i, k, f in zip(ids, keys, fresh) if not f)
            embedded_keys.update(batch.keys)
            yield batch


# ---------------------------------------------------------------- texts


class TextEmbedder:
    """Ray actor: distinct texts (key, text) -> (key, emb)."""

    def __init__(self, spec: str, device: str, identity: dict, batch_size: int, threads: int):
        from phrasefuse.extract.encoders import load_text_encoder

        _set_threads(threads)
        self.encoder = load_text_encoder(spec, device)
        _check_identity(self.encoder.identity, identity, spec)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb = self.encoder.encode(batch["text"].to_pylist(), batch_size=self.batch_size)
        return pa.table({"key": batch["key"], "emb": embedding_array(emb)})


def embed_texts(unique: pa.Table, spec: str, identity: dict, *, batch_size: int, device: str,
                options) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """The Ray mapper of `extract_texts`: (keys, vectors) of the distinct texts, block by block."""
    if unique.num_rows == 0:
        return
    with ray_session(options.address) as ray:
        resources, actor_device, threads = actor_pool(ray, device, options.actors)
        dataset = ray.data.from_arrow(_blocks(unique.select(["key", "text"]), batch_size * BLOCK_BATCHES))
        results = dataset.map_batches(
            TextEmbedder, batch_size=batch_size * BLOCK_BATCHES, batch_format="pyarrow",
            fn_constructor_kwargs={"spec": spec, "device": actor_device, "identity": identity,
                                   "batch_size": batch_size, "threads": threads},
            **resources)
        for out in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            if out.num_rows:
                yield out["key"].combine_chunks(), embeddings_to_numpy(out["emb"])


# ---------------------------------------------------------------- phrases


class PhraseMapper:
    """Ray actor: image rows (id, key, emb) -> (id, key, emb = phrase feature, rows, scores), the
    local mapper of `generate_phrases` per block: ids already done are dropped, FAISS search,
    each phrase embedded once per actor, then `phrase_features`."""

    def __init__(self, index: str, text_model: str, device: str, identity: dict, k: int, score_weighted: bool,
                 done: pa.Array, text_batch_size: int, threads: int):
        from phrasefuse.extract.encoders import load_text_encoder
        from phrasefuse.index.folder import PhraseIndex

        _set_threads(threads)
        self.index = PhraseIndex(index)
        self.encoder = load_text_encoder(text_model, device)
        _check_identity(self.encoder.identity, identity, text_model)
        self.k, self.score_weighted, self.done = k, score_weighted, done
        self.text_batch_size = text_batch_size
        self.phrases = self.index.phrases
        self.phrase_emb = np.zeros((len(self.phrases), self.encoder.dim), np.float32)
        self.embedded = np.zeros(len(self.phrases), bool)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from phrasefuse.index.phrases import phrase_features

        todo = batch.filter(pc.invert(pc.is_in(batch["id"], value_set=self.done)))
        k = min(self.k, len(self.phrases))
        if todo.num_rows == 0:
            return pa.table({"id": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                             "emb": embedding_array(np.zeros((0, self.encoder.dim), np.float32)),
                             "rows": _fixed(np.zeros((0, k), np.int64)), "scores": _fixed(np.zeros((0, k), np.float32))})
        scores, rows = self.index.search(embeddings_to_numpy(todo["emb"]).astype(np.float32), self.k)
        needed = np.unique(rows[rows >= 0])
        new = needed[~self.embedded[needed]]
        if len(new):
            self.phrase_emb[new] = self.encoder.encode(self.phrases.take(pa.array(new)).to_pylist(),
                                                       self.text_batch_size)
            self.embedded[new] = True
        features, _ = phrase_features(rows, scores, self.phrase_emb, self.score_weighted)
        return pa.table({"id": todo["id"], "key": todo["key"], "emb": embedding_array(features),
                         "rows": _fixed(rows), "scores": _fixed(scores.astype(np.float32))})


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), values.shape[1])


def _read_shards(batch: pa.Table) -> pa.Table:
    """Ray task: store shards named by (store, shard) rows -> their (id, key, emb) rows."""
    from pathlib import Path

    return pa.concat_tables([EmbeddingStore(store).read_shard(Path(shard), ["id", "key", "emb"])
                             for store, shard in zip(batch["store"].to_pylist(), batch["shard"].to_pylist())])


def phrase_batches(store: EmbeddingStore, done: pa.ChunkedArray, index: str, text_model: str, identity: dict, *,
                   k: int, score_weighted: bool, batch_size: int, text_batch_size: int, device: str,
                   options) -> Iterator[tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]]:
    """The Ray mapper of `generate_phrases`: (id/key table, features, phrase rows, scores) per block."""
    shards = [str(p) for p in store.shard_paths()]
    done = done.combine_chunks() if isinstance(done, pa.ChunkedArray) else done
    ids = store.read_table(["id"])["id"]
    if not shards or pc.all(pc.is_in(ids, value_set=done)).as_py():
        return  # nothing pending: Ray is not even started
    with ray_session(options.address) as ray:
        resources, actor_device, threads = actor_pool(ray, device, options.actors)
        # One Ray task per shard, read (and checked, as the local reader does) by the store's own reader.
        dataset = ray.data.from_items([{"store": str(store.path), "shard": shard} for shard in shards])
        dataset = dataset.map_batches(_read_shards, batch_size=1, batch_format="pyarrow")
        results = dataset.map_batches(
            PhraseMapper, batch_size=batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"index": str(index), "text_model": text_model, "device": actor_device,
                                   "identity": identity, "k": k, "score_weighted": score_weighted, "done": done,
                                   "text_batch_size": text_batch_size, "threads": threads},
            **resources)
        for out in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            if out.num_rows:
                rows = out["rows"].combine_chunks()
                scores = out["scores"].combine_chunks()
                width = rows.type.list_size
                yield (out.select(["id", "key"]), embeddings_to_numpy(out["emb"]),
                       rows.flatten().to_numpy().reshape(-1, width),
                       scores.flatten().to_numpy().reshape(-1, width))
