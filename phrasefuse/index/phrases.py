"""`phrasefuse phrases`: for every image of a store, its top-k phrases and a text feature.

reader  the image store, one shard at a time, minus the ids already in the output store (resume);
mapper  batched FAISS search -> top-k phrases and cosine scores; each distinct phrase is embedded
        once with the text model (a phrase shared by a million images: one model call), and the
        feature is the re-normalised mean of the k phrase embeddings (optionally score-weighted);
        `phrases_job` declares it for both engines (`phrasefuse.engine`): on Ray, `PhraseMapper`
        actors each load the index and the text model and embed each phrase once per actor;
writer  `StoreWriter`: an embedding store (modality text, column "phrases") whose shards also
        carry `phrases` (list<string>) and `scores` (list<float32>), so fuse reads it like any feature.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.engine import Job, RayOptions, check_identity, get_engine, set_threads
from phrasefuse.engine import progress as progress_bar
from phrasefuse.errors import BadInput
from phrasefuse.extract import DEFAULT_TEXT_MODEL
from phrasefuse.extract.identity import (record_weights_stamp, recorded_identity, refuse_other_model, stamped,
                                         weights_stamp)
from phrasefuse.index import DEFAULT_PHRASES_K
from phrasefuse.index.folder import PhraseIndex
from phrasefuse.store import (EmbeddingStore, StoreWriter, embedding_array, embeddings_to_numpy, encoder_identity,
                              l2_normalize, new_meta)

DEFAULT_BATCH = 10_000  # images per FAISS search on the CPU
DEFAULT_TEXT_BATCH = 256  # texts per text-model call on the CPU
DEFAULT_SHARD_SIZE = 10_000
GPU_SEARCH_BATCH_MAX = 131_072
GPU_TEXT_BATCH_MAX = 4096
GPU_SEARCH_SHARE = 0.02  # of free GPU memory for one batch of queries (FAISS tiles the rest itself)
GPU_TEXT_SHARE = 0.25  # of free GPU memory for one text batch's activations
TEXT_BYTES_PER_ROW = 2**20  # activations of one text in a base-sized text tower (77 tokens, fp16): generous


def batch_sizes(search_device: str, text_device: str, gpu_free_bytes: int, dim: int) -> tuple[int, int]:
    """(images per FAISS search, texts per text-model call) for the devices they run on, given the free
    memory of the GPU (ignored for CPU devices, whose sizes stay the measured defaults): a power of two
    between the CPU default and a cap, so a small GPU gets small batches and a large one is kept busy."""

    def sized(budget: float, row_bytes: int, low: int, high: int) -> int:
        rows = int(budget // max(1, row_bytes))
        return int(min(high, max(low, 2 ** int(np.log2(rows)) if rows >= 1 else 0)))

    search = (sized(gpu_free_bytes * GPU_SEARCH_SHARE, dim * 4, DEFAULT_BATCH, GPU_SEARCH_BATCH_MAX)
              if search_device == "cuda" else DEFAULT_BATCH)
    text = (sized(gpu_free_bytes * GPU_TEXT_SHARE, TEXT_BYTES_PER_ROW, DEFAULT_TEXT_BATCH, GPU_TEXT_BATCH_MAX)
            if text_device == "cuda" else DEFAULT_TEXT_BATCH)
    return search, text


def gpu_free_bytes() -> int:
    """Free memory of the current CUDA device (0 without one)."""
    import torch

    return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else 0


@dataclass
class PhrasesSummary:
    store: str
    images: int = 0  # rows of the image store
    written: int = 0  # rows written now
    present: int = 0  # already in the output store: skipped
    failed: int = 0  # no phrase found (errors.parquet)
    phrases_embedded: int = 0  # distinct phrases run through the text model
    seconds: float = 0.0
    search_device: str = "cpu"  # where FAISS searched (on Ray: each actor's own choice)
    batch_size: int = 0  # images per FAISS search
    text_batch_size: int = 0  # phrases per text-model call

    def text(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        return (f"phrases: {self.written} images done, {self.present} already in store, {self.failed} failed; "
                f"{self.phrases_embedded} distinct phrases embedded; {self.seconds:.1f} s, {rate:.1f} rows/s "
                f"-> {self.store}")

    def as_dict(self) -> dict:
        return asdict(self)


def phrase_features(rows: np.ndarray, scores: np.ndarray, phrase_emb: np.ndarray,
                    score_weighted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, dim) unit rows, found (n, k) bool): the mean of the embeddings of each row's
    phrases (rows = -1: none), or their score-weighted mean (negative scores weigh 0; a row whose
    scores are all <= 0 falls back to the plain mean)."""
    found = rows >= 0
    weights = found.astype(np.float32)
    if score_weighted:
        by_score = np.clip(scores, 0, None).astype(np.float32) * found
        positive = by_score.sum(axis=1) > 0
        weights[positive] = by_score[positive]
    summed = np.einsum("nk,nkd->nd", weights, phrase_emb[np.where(found, rows, 0)])
    return l2_normalize(summed), found


def list_column(values: pa.Array, found: np.ndarray) -> pa.ListArray:
    """Row i: values[j] for the found j of row i (values given flat, row-major over found)."""
    offsets = np.concatenate([[0], np.cumsum(found.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _at_least_one(*flags: tuple[str, int | None]) -> None:
    """Each (flag, value) given is at least 1 (None: left to be sized)."""
    for flag, value in flags:
        if value is not None and value < 1:
            raise BadInput(f"{flag} {value}: must be at least 1")


def generate_phrases(index: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                     k: int = DEFAULT_PHRASES_K, text_model: str = DEFAULT_TEXT_MODEL, score_weighted: bool = False,
                     batch_size: int | None = None, text_batch_size: int | None = None, device: str = "auto",
                     shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float32", engine: str = "local",
                     ray: RayOptions | None = None, progress: bool | None = None) -> PhrasesSummary:
    """Write the phrases store `out` for the images of store `images`, looked up in `index`.
    `engine` "ray" runs the mapper on Ray (`ray`: its `phrasefuse.engine.RayOptions`). `device`
    auto|cpu|cuda places the FAISS search and the text model; batch sizes left None are sized to it."""
    _at_least_one(("-k", k), ("--batch-size", batch_size), ("--text-batch-size", text_batch_size),
                  ("--shard-size", shard_size))

    def searched_index() -> PhraseIndex:
        # --device cuda without a GPU: refused before any work, even none (on Ray the actors choose their device).
        return PhraseIndex(index, device=device if engine == "local" else "cpu")

    phrase_index = searched_index() if device == "cuda" else PhraseIndex(index)  # else meta.json only, for now
    store = EmbeddingStore(images)
    if store.meta.get("modality") != "image":
        raise BadInput(f"--images {images}: holds {store.meta.get('modality')} embeddings; pass an image store")
    phrase_index.check_encoder(store.meta["encoder"], what=f"--images {images}")
    settings = {"index": str(index), "build_id": phrase_index.meta["build_id"],
                "index_encoder": encoder_identity(phrase_index.encoder), "k": k,
                "weighting": "score" if score_weighted else "mean", "text_model": text_model}
    _check_resumable(EmbeddingStore(out), settings)
    runner = get_engine(engine, ray)
    # As extract: the output store's record stands for the text model while its weights files are unchanged.
    out_store = EmbeddingStore(out)
    text_encoder, identity = None, recorded_identity(text_model, out_store.meta) if out_store.exists() else None
    if identity is None:
        phrase_index, stamp = searched_index(), weights_stamp(text_model)  # the stamp before the load
        text_encoder = runner.driver_encoder(_load_text_encoder, text_model, device)
        identity = stamped(text_encoder.identity, stamp)
    meta = new_meta(modality="text", encoder=identity, dtype=dtype,
                    source={"manifest": store.meta.get("source", {}).get("manifest"), "images": str(images),
                            "column": "phrases"},
                    extra={"phrases": settings})

    summary = PhrasesSummary(str(out), images=store.num_rows())  # nothing to search: no device, no batch sizes
    start = time.perf_counter()
    with StoreWriter.open(out, meta, shard_size) as writer:
        done = _drop_stale(writer, store)
        summary.present = int(pc.sum(pc.is_in(store.read_table(["id"])["id"], value_set=done)).as_py() or 0)
        if summary.present < summary.images:
            if text_encoder is None:
                phrase_index, began = searched_index(), time.perf_counter()
                text_encoder = runner.driver_encoder(_load_text_encoder, text_model, device)
                start += time.perf_counter() - began  # as when loaded first: the time is the search's
                refuse_other_model(writer, text_encoder.identity)
            _size_batches(summary, phrase_index, text_encoder, batch_size, text_batch_size)
            job = phrases_job(store, done, phrase_index, text_encoder, text_model, k=k, score_weighted=score_weighted,
                              batch_size=summary.batch_size, text_batch_size=summary.text_batch_size, device=device)
            with progress_bar(summary.images - summary.present, "phrases", progress) as advance:
                _write_phrase_batches(writer, runner.map(job), phrase_index.phrases, summary, advance)
        if text_encoder is not None:
            record_weights_stamp(writer, identity)
        writer.flush()
    summary.seconds = time.perf_counter() - start
    return summary


def _load_text_encoder(spec: str, device: str):
    from phrasefuse.extract.encoders import load_text_encoder  # torch: only when phrases are to be embedded

    return load_text_encoder(spec, device)


def _size_batches(summary: PhrasesSummary, phrase_index: PhraseIndex, text_encoder, batch_size: int | None,
                  text_batch_size: int | None) -> None:
    """The summary's search device and batch sizes (those left None: sized to the devices)."""
    sized_search, sized_text = batch_sizes(phrase_index.device, getattr(text_encoder.device, "type", "cpu"),
                                           gpu_free_bytes(), phrase_index.dim)
    summary.search_device = phrase_index.device
    summary.batch_size, summary.text_batch_size = batch_size or sized_search, text_batch_size or sized_text


def _drop_stale(writer: StoreWriter, images: EmbeddingStore) -> pa.Array:
    """The ids whose phrases are done. A phrase row keeps its image's content key: an image embedded
    again since (`extract images` saw its content change) has another key now, and its old phrases
    are dropped, so they are searched again from the new vector. Ids the image store no longer has
    keep their rows (nothing says they changed)."""
    have = writer.store.ids_and_keys()
    now = images.ids_and_keys()
    current = now["key"].combine_chunks().take(pc.index_in(have["id"], value_set=now["id"]))
    stale = pc.fill_null(pc.not_equal(have["key"].combine_chunks(), current), False)
    writer.revise(have["id"].filter(stale).combine_chunks())
    return have["id"].filter(pc.invert(stale)).combine_chunks()


def _write_phrase_batches(writer: StoreWriter, batches, phrases: pa.Array, summary: PhrasesSummary,
                          advance=lambda n: None) -> None:
    """Write each mapped batch: features with their phrases and scores; rows without a phrase as errors."""
    used = np.zeros(len(phrases), bool)  # phrases already counted (embedded once each)
    for batch, features, rows, scores in batches:
        found = rows >= 0
        new = np.unique(rows[found])
        summary.phrases_embedded += int((~used[new]).sum())
        used[new] = True
        ok = found.any(axis=1)
        good = batch.filter(pa.array(ok))
        writer.add(good["id"], good["key"], features[ok], extra={
            "phrases": list_column(phrases.take(pa.array(rows[ok][found[ok]])), found[ok]),
            "scores": list_column(pa.array(scores[ok][found[ok]], pa.float32()), found[ok]),
        })
        failed = batch.filter(pa.array(~ok))["id"].to_pylist()
        writer.add_errors(failed, ["no phrase found: the index returned no neighbour"] * len(failed))
        summary.written += int(ok.sum())
        summary.failed += len(failed)
        advance(batch.num_rows)


# ---------------------------------------------------------------- the mapper, on either engine


class PhraseSearch:
    """Image embeddings -> (features, phrase rows, scores): FAISS search, then each phrase the
    results name embedded once (for the life of this object), then `phrase_features`."""

    def __init__(self, phrase_index: PhraseIndex, text_encoder, *, k: int, score_weighted: bool,
                 text_batch_size: int):
        self.index, self.encoder = phrase_index, text_encoder
        self.k, self.score_weighted, self.text_batch_size = k, score_weighted, text_batch_size
        self.phrases = phrase_index.phrases
        # Filled lazily, each phrase once; np.zeros only touches the pages of phrases actually used.
        self.phrase_emb = np.zeros((len(self.phrases), text_encoder.dim), np.float32)
        self.embedded = np.zeros(len(self.phrases), bool)

    def __call__(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores, rows = self.index.search(emb.astype(np.float32), self.k)
        needed = np.unique(rows[rows >= 0])
        new = needed[~self.embedded[needed]]
        if len(new):
            self.phrase_emb[new] = self.encoder.encode(self.phrases.take(pa.array(new)).to_pylist(),
                                                       self.text_batch_size)
            self.embedded[new] = True
        features, _ = phrase_features(rows, scores, self.phrase_emb, self.score_weighted)
        return features, rows, scores


def phrases_job(store: EmbeddingStore, done: pa.ChunkedArray | pa.Array, phrase_index: PhraseIndex, text_encoder,
                text_model: str, *, k: int, score_weighted: bool, batch_size: int, text_batch_size: int,
                device: str) -> Job:
    """The phrases mapper for either engine: the image store's rows not in `done` ->
    (id/key table, features, phrase rows, scores) per batch."""
    done = done.combine_chunks() if isinstance(done, pa.ChunkedArray) else done
    shards = [str(p) for p in store.shard_paths()]
    pending = bool(shards) and not pc.all(pc.is_in(store.read_table(["id"])["id"], value_set=done)).as_py()

    def local():
        search = PhraseSearch(phrase_index, text_encoder, k=k, score_weighted=score_weighted,
                              text_batch_size=text_batch_size)
        for shard in store.iter_tables(["id", "key", "emb"]):
            todo = shard.filter(pc.invert(pc.is_in(shard["id"], value_set=done)))
            for offset in range(0, todo.num_rows, batch_size):
                batch = todo.slice(offset, batch_size)
                yield (batch.select(["id", "key"]), *search(embeddings_to_numpy(batch["emb"])))

    def read(ray):
        # One Ray task per shard, read (and checked, as the local reader does) by the store's own reader.
        dataset = ray.data.from_items([{"store": str(store.path), "shard": shard} for shard in shards])
        return dataset.map_batches(_read_shards, batch_size=1, batch_format="pyarrow")

    return Job(pending=pending, local=local, actor=PhraseMapper, read=read, batch_size=batch_size, device=device,
               actor_args={"index": str(phrase_index.path), "text_model": text_model,
                           "identity": text_encoder.identity, "k": k, "score_weighted": score_weighted,
                           "done": done, "text_batch_size": text_batch_size},
               collect=_phrase_batches_from_actors)


def _read_shards(batch: pa.Table) -> pa.Table:
    """Ray task: store shards named by (store, shard) rows -> their (id, key, emb) rows."""
    from pathlib import Path

    return pa.concat_tables([EmbeddingStore(store).read_shard(Path(shard), ["id", "key", "emb"])
                             for store, shard in zip(batch["store"].to_pylist(), batch["shard"].to_pylist())])


class PhraseMapper:
    """Ray actor: image rows (id, key, emb) -> (id, key, emb = phrase feature, rows, scores), the
    local mapper per block: ids already done are dropped, then `PhraseSearch` (each phrase
    embedded once per actor)."""

    def __init__(self, index: str, text_model: str, device: str, identity: dict, k: int, score_weighted: bool,
                 done: pa.Array, text_batch_size: int, threads: int):
        from phrasefuse.extract.encoders import load_text_encoder

        set_threads(threads)
        encoder = load_text_encoder(text_model, device)
        check_identity(encoder.identity, identity, text_model)
        # An actor given a GPU searches there when its FAISS can (auto): a node with faiss-cpu still works.
        self.search = PhraseSearch(PhraseIndex(index, device="auto" if device == "cuda" else "cpu"), encoder, k=k,
                                   score_weighted=score_weighted,
                                   text_batch_size=text_batch_size)
        self.done, self.dim = done, encoder.dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        todo = batch.filter(pc.invert(pc.is_in(batch["id"], value_set=self.done)))
        k = min(self.search.k, len(self.search.phrases))
        if todo.num_rows == 0:
            return pa.table({"id": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                             "emb": embedding_array(np.zeros((0, self.dim), np.float32)),
                             "rows": _fixed(np.zeros((0, k), np.int64)), "scores": _fixed(np.zeros((0, k), np.float32))})
        features, rows, scores = self.search(embeddings_to_numpy(todo["emb"]))
        return pa.table({"id": todo["id"], "key": todo["key"], "emb": embedding_array(features),
                         "rows": _fixed(rows), "scores": _fixed(scores.astype(np.float32))})


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), values.shape[1])


def _phrase_batches_from_actors(tables):
    """`PhraseMapper` output -> (id/key table, features, phrase rows, scores), as the local mapper yields them."""
    for out in tables:
        if out.num_rows:
            rows = out["rows"].combine_chunks()
            scores = out["scores"].combine_chunks()
            width = rows.type.list_size
            yield (out.select(["id", "key"]), embeddings_to_numpy(out["emb"]),
                   rows.flatten().to_numpy().reshape(-1, width),
                   scores.flatten().to_numpy().reshape(-1, width))


def _check_resumable(out: EmbeddingStore, settings: dict) -> None:
    """Resuming must not mix rows of another index, k or weighting into one store."""
    if not out.exists():
        return
    have = out.meta.get("phrases")
    if not isinstance(have, dict):
        raise BadInput(f"--out {out.path}: an embedding store that is not a phrases store; use another --out folder")
    for key in ("build_id", "k", "weighting"):
        if have.get(key) != settings[key]:
            raise BadInput(f"--out {out.path}: holds phrases made with {key}={have.get(key)!r}, not "
                           f"{settings[key]!r}; use another --out folder to keep both")
