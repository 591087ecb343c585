"""Prototypes under a memory budget: neither the pairs table nor the image store is held whole.

pass 1      the distinct phrases of the pairs table (memory: the distinct phrases), sorted:
            a phrase's code is its rank, so the phrases come out in today's order;
pass 2      each batch of pairs cleaned (pairs.clean_batch), coded as integers (phrase rank,
            store row, weight) and appended to the spill file of its query partition (a
            contiguous range of ranks) on disk; pairs naming ids absent from the store are
            only counted;
partitions  one at a time: its pairs loaded, the first of each (phrase, image) kept, counted;
            weighted sums added shard by shard over the store (one shard in memory; with
            `--engine ray` one Ray task per shard, reduced here), re-normalised and appended
            to the prototypes file (float32 rows, phrase order).

Partitions are as many as needed for one partition's sums (phrases x dim x 4 bytes) and its
pairs (PAIR_BYTES each, a few copies while deduplicated) to stay within a share of --memory;
ranges of phrases are assumed to hold similar numbers of pairs (the pairs table's row count
sets how many). The result equals prototypes.prototypes() on pairs.read_pairs() (float sums in
another order: within float tolerance).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.engine import progress as progress_bar
from phrasefuse.index.pairs import PairCounts, FirstOfEachPair, clean_batch, pairs_columns
from phrasefuse.index.prototypes import scaled_per_segment, segment_sums
from phrasefuse.manifests.tables import BATCH_ROWS, iter_batches
from phrasefuse.store import EmbeddingStore, embeddings_to_numpy

PAIR = np.dtype([("code", "<i8"), ("row", "<i8"), ("weight", "<f8")])
PAIR_COPIES = 4  # a partition's pairs while deduplicated: the records, the keys, the sort, the kept rows
SUMS_SHARE = 0.25  # of --memory: one partition's sums; as much again for its pairs


def _no_progress(n: int) -> None:
    """The default `advance` of a step run without progress."""


@dataclass
class StoreLayout:
    """Where each store row lives: shard paths and the first row of each (shard order, then row order)."""

    store: EmbeddingStore
    shards: list[Path]
    starts: np.ndarray  # (shards + 1,) int64

    @classmethod
    def of(cls, store: EmbeddingStore) -> "StoreLayout":
        shards = store.shard_paths()
        rows = [store.shard_rows(s) for s in shards]
        return cls(store, shards, np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]))

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def embeddings(self, shard: int) -> np.ndarray:
        return embeddings_to_numpy(self.store.read_shard(self.shards[shard], ["emb"])["emb"])

    def rows_of(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings (float32) of the sorted store `rows`, reading only the shards they are in."""
        out = np.empty((len(rows), self.store.dim), np.float32)
        for shard, lo, hi in self.split(rows):
            out[lo:hi] = self.embeddings(shard)[rows[lo:hi] - self.starts[shard]]
        return out

    def split(self, sorted_rows: np.ndarray):
        """(shard, lo, hi): sorted_rows[lo:hi] are the rows in that shard; shards without rows skipped."""
        bounds = np.searchsorted(sorted_rows, self.starts)
        for shard in range(len(self.shards)):
            if bounds[shard + 1] > bounds[shard]:
                yield shard, int(bounds[shard]), int(bounds[shard + 1])


def partition_size(n_phrases: int, n_rows: int, dim: int, memory: int) -> int:
    """Phrases per partition so that one partition's sums and pairs fit SUMS_SHARE of `memory` each."""
    share = max(1, int(memory * SUMS_SHARE))
    by_sums = math.ceil(n_phrases * dim * 4 / share)
    by_pairs = math.ceil(n_rows * PAIR.itemsize * PAIR_COPIES / share)
    partitions = max(1, by_sums, by_pairs)
    return max(1, math.ceil(n_phrases / partitions))


def distinct_phrases(pattern, weighted: bool) -> tuple[pa.Array, int]:
    """(every distinct non-empty normalised phrase, sorted; rows read). Memory: the distinct phrases."""
    held: list[pa.Array] = []
    n_held = n_distinct = rows = 0
    for batch in iter_batches(pattern, what="pairs table"):
        clean = clean_batch(batch, pattern, weighted)
        rows += clean.rows
        held.append(pc.unique(clean.phrase))
        n_held += len(held[-1])
        if n_held > max(2 * n_distinct, BATCH_ROWS):
            held = [pc.unique(pa.concat_arrays(held))]
            n_held = n_distinct = len(held[0])
    phrases = pc.unique(pa.concat_arrays(held)) if held else pa.array([], pa.string())
    return phrases.take(pc.sort_indices(phrases)), rows


@dataclass
class SpilledPairs:
    """Pass 2's result: the coded pairs of each partition in `folder`, and what cleaning counted."""

    folder: Path
    per_partition: int
    partitions: int
    counts: PairCounts
    named: int
    missing_example: str | None

    def path(self, partition: int) -> Path:
        return self.folder / f"pairs-{partition:05d}.bin"

    def load(self, partition: int) -> np.ndarray:
        path = self.path(partition)
        return np.fromfile(path, dtype=PAIR) if path.exists() else np.empty(0, PAIR)


def spill_pairs(pattern, weighted: bool, phrases: pa.Array, store_ids: pa.Array, per_partition: int,
                folder: Path, advance: Callable[[int], None] = _no_progress) -> SpilledPairs:
    """Pass 2: code every pair as (phrase rank, store row, weight) into its partition's file;
    advance(rows) after each batch of the pairs table."""
    counts, named = PairCounts(), 0
    missing = FirstOfEachPair()  # pairs naming ids not in the store: counted once each (usually few)
    partitions = max(1, math.ceil(len(phrases) / per_partition))
    files = [open(folder / f"pairs-{p:05d}.bin", "ab") for p in range(partitions)]
    try:
        for batch in iter_batches(pattern, what="pairs table"):
            clean = clean_batch(batch, pattern, weighted)
            counts.pairs_read += clean.rows
            counts.empty_phrase += clean.empty_phrase
            counts.no_image_id += clean.no_image_id
            named += clean.named
            with_id = pc.not_equal(clean.image_id, "")
            phrase, image_id = clean.phrase.filter(with_id), clean.image_id.filter(with_id)
            weight = clean.weight[with_id.to_numpy(zero_copy_only=False)]
            found = pc.index_in(image_id, value_set=store_ids)
            present = found.is_valid()
            absent = pc.invert(present)
            missing.add(pa.table({"phrase": phrase.filter(absent), "image_id": image_id.filter(absent),
                                  "weight": pa.array(np.zeros(found.null_count), pa.float64())}))
            present_np = present.to_numpy(zero_copy_only=False)
            records = np.empty(int(present_np.sum()), PAIR)
            records["code"] = pc.index_in(phrase.filter(present), value_set=phrases).to_numpy()
            records["row"] = found.filter(present).to_numpy()
            records["weight"] = weight[present_np]
            part = records["code"] // per_partition
            order = np.argsort(part, kind="stable")  # keeps row order within a partition: first pair wins
            records, part = records[order], part[order]
            for p, lo, hi in _runs(part):
                records[lo:hi].tofile(files[p])
            advance(clean.rows)
    finally:
        for f in files:
            f.close()
    distinct_missing = missing.result()
    counts.missing_id = distinct_missing.num_rows
    example = distinct_missing["image_id"][0].as_py() if counts.missing_id else None
    return SpilledPairs(folder, per_partition, partitions, counts, named, example)


def _runs(sorted_values: np.ndarray):
    """(value, lo, hi) of each run of equal values in a sorted array."""
    if len(sorted_values) == 0:
        return
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(sorted_values)]
    for lo, hi in zip(starts, ends):
        yield int(sorted_values[lo]), int(lo), int(hi)


def first_of_each(records: np.ndarray, n_store: int) -> np.ndarray:
    """The first record of each distinct (code, row), in file order (the first pair's weight wins)."""
    code = records["code"] - (records["code"].min() if len(records) else 0)  # small keys: no int64 overflow
    _, first = np.unique(code * n_store + records["row"], return_index=True)
    return records[np.sort(first)]


# A shard summer: (layout, [(shard, codes, rows in shard, weights)], n_segments, advance) -> sums
# (n_segments, dim); advance(1) as each shard's sums are added (the build's progress).
ShardSummer = Callable[[StoreLayout, list, int, Callable[[int], None]], np.ndarray]


def local_sums(layout: StoreLayout, work: list, n_segments: int,
               advance: Callable[[int], None] = _no_progress) -> np.ndarray:
    """The ShardSummer of the local engine: shard after shard, in this process."""
    sums = np.zeros((n_segments, layout.store.dim), np.float32)
    for shard, code, row, weight in work:
        segment_sums(code, row, unit_rows(layout.embeddings(shard)), n_segments, weight, out=sums)
        advance(1)
    return sums


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """l2_normalize of a shard's embeddings, dividing the float32 copy in place (one copy, not two)."""
    x = np.array(embeddings, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


@dataclass
class PartitionResult:
    kept: np.ndarray  # (k,) phrase ranks (global) with a usable prototype, ascending
    vectors: np.ndarray  # (k, dim) float32 unit rows
    images: np.ndarray  # (phrases in the partition,) usable images per phrase
    zero: int  # kept phrases whose images cancel out (no prototype)
    distinct: int  # distinct pairs with an image in the store
    zero_weight: int


def partition_prototypes(records: np.ndarray, lo: int, hi: int, layout: StoreLayout, min_images: int,
                         weighted: bool, summer: ShardSummer = local_sums,
                         advance: Callable[[int], None] = _no_progress) -> PartitionResult:
    """Prototypes of the phrases ranked [lo, hi) from their spilled pairs; advance(1) per store shard
    (a shard holding none of the partition's rows counts as done at once)."""
    records = first_of_each(records, layout.rows)
    distinct, positive = len(records), records["weight"] > 0
    zero_weight = int(distinct - positive.sum())
    records = records[positive]  # the pairs' records are dropped as soon as what the sums need is out
    code = records["code"] - lo
    images = np.bincount(code, minlength=hi - lo)
    kept = images >= min_images
    keep = kept[code]
    code, row = code[keep], records["row"][keep]
    weight = scaled_per_segment(records["weight"][keep], code, hi - lo) if weighted else None
    del records, keep
    order = np.argsort(row, kind="stable")
    code, row = code[order], row[order]
    weight = None if weight is None else weight[order]
    del order
    work = [(shard, code[a:b], row[a:b] - layout.starts[shard], None if weight is None else weight[a:b])
            for shard, a, b in layout.split(row)]
    advance(len(layout.shards) - len(work))
    sums = summer(layout, work, hi - lo, advance)
    del work, code, row, weight
    ok = kept & (np.linalg.norm(sums, axis=1) > 1e-6)
    vectors = sums if ok.all() else sums[ok]
    del sums  # normalised in place: the partition's sums and its prototypes are never held three times
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return PartitionResult(np.flatnonzero(ok) + lo, vectors, images, int((kept & ~ok).sum()), distinct, zero_weight)


@dataclass
class StreamedPrototypes:
    """Image prototypes of every kept phrase, in phrase order, in the file `vectors_path`."""

    phrases: pa.Array  # every distinct phrase, sorted
    kept: np.ndarray  # (n,) ranks of the phrases with a prototype
    vectors_path: Path  # (n, dim) float32, row-major
    dim: int
    images_per_phrase: np.ndarray  # (phrases,)
    zero_prototypes: int
    counts: PairCounts
    weighted: bool
    missing_example: str | None
    partitions: int


def stream_prototypes(pattern, layout: StoreLayout, work: Path, *, memory: int, min_images: int = 1,
                      use_weights: bool = True, summer: ShardSummer = local_sums,
                      progress: bool | None = False) -> StreamedPrototypes:
    """Pairs table + store -> prototypes file in `work` (a scratch folder), within about `memory` bytes.
    `progress` (engine.progress): pass 2 by pairs rows, then the sums by store shard of each partition."""
    weighted = pairs_columns(pattern, use_weights)
    phrases, rows = distinct_phrases(pattern, weighted)
    store_ids = layout.store.read_table(["id"])["id"].combine_chunks()
    per_partition = partition_size(len(phrases), rows, layout.store.dim, memory)
    with progress_bar(rows, "index build: coding pairs", progress, unit="pairs") as advance:
        spilled = spill_pairs(pattern, weighted, phrases, store_ids, per_partition, work, advance)
    del store_ids
    counts = spilled.counts
    kept, images, zero, distinct = [], [], 0, 0
    vectors_path = work / "prototypes.f32"
    shard_passes = spilled.partitions * len(layout.shards)
    with open(vectors_path, "wb") as out, \
            progress_bar(shard_passes, "index build: prototype sums", progress, unit="shards") as advance:
        for p in range(spilled.partitions):
            lo, hi = p * per_partition, min(len(phrases), (p + 1) * per_partition)
            result = partition_prototypes(spilled.load(p), lo, hi, layout, min_images, weighted, summer, advance)
            spilled.path(p).unlink(missing_ok=True)
            result.vectors.astype(np.float32, copy=False).tofile(out)
            kept.append(result.kept)
            images.append(result.images)
            zero += result.zero
            distinct += result.distinct
            counts.zero_weight += result.zero_weight
    counts.duplicate = spilled.named - distinct - counts.missing_id
    images_per_phrase = np.concatenate(images) if images else np.zeros(0, np.int64)
    counts.pairs_used = int(images_per_phrase.sum())
    return StreamedPrototypes(phrases, np.concatenate(kept) if kept else np.zeros(0, np.int64), vectors_path,
                              layout.store.dim, images_per_phrase, zero, counts, weighted, spilled.missing_example,
                              spilled.partitions)


class VectorFile:
    """Rows of a float32 file, read on demand (indexing returns an in-memory copy): the built index
    and a chunk are in memory, never the whole file. Rows are read with pread, not through a memory
    map: a mapping's pages count in the process's RSS, and a few thousand scattered rows (the tuning's
    recall checks) fault in far more than they hold (the kernel maps whole neighbourhoods of pages)."""

    def __init__(self, path: Path, rows: int, dim: int):
        self.path, self.shape, self.dtype, self.ndim = Path(path), (int(rows), int(dim)), np.dtype(np.float32), 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        rows, dim = self.shape
        if isinstance(key, slice):
            start, stop, step = key.indices(rows)
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._read_runs(np.array([start]), np.array([max(start, stop)]))
        index = np.asarray(key)
        if index.dtype.kind not in "iu":
            raise TypeError(f"VectorFile rows: a slice or integer indices, not {index.dtype}")
        index = np.where(index < 0, index + rows, index)
        if index.size and (index.min() < 0 or index.max() >= rows):
            raise IndexError(f"row index out of range for {rows} rows")
        wanted, where = np.unique(index.ravel(), return_inverse=True)
        # Consecutive wanted rows are read in one call (a sorted sample reads in few runs).
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        firsts = wanted[np.r_[0, breaks]] if len(wanted) else wanted
        lasts = wanted[np.r_[breaks - 1, len(wanted) - 1]] if len(wanted) else wanted
        return self._read_runs(firsts, lasts + 1)[where].reshape(*index.shape, dim)

    def _read_runs(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Rows [starts[i], ends[i]) of each run, concatenated, read straight into one array."""
        dim = self.shape[1]
        out = np.empty((int((ends - starts).sum()), dim), np.float32)
        row_bytes = dim * 4
        if out.size == 0:
            return out
        view = memoryview(out.reshape(-1)).cast("B")
        with open(self.path, "rb", buffering=0) as f:
            at = 0
            for start, end in zip(starts.tolist(), ends.tolist()):
                size = (end - start) * row_bytes
                done = 0
                while done < size:  # pread may return less than asked
                    got = os.preadv(f.fileno(), [view[at + done:at + size]], start * row_bytes + done)
                    if got <= 0:
                        raise OSError(f"{self.path}: ended at byte {start * row_bytes + done}")
                    done += got
                at += size
        return out

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)


def shard_file_sums(store_path: str, shard: str, code: np.ndarray, row: np.ndarray, weight: np.ndarray | None,
                    n_segments: int) -> np.ndarray:
    """One shard's partial sums, from its paths alone (what a Ray task runs, on any node)."""
    store = EmbeddingStore(store_path)
    emb = embeddings_to_numpy(store.read_shard(Path(shard), ["emb"])["emb"])
    return segment_sums(code, row, unit_rows(emb), n_segments, weight)


class RaySums:
    """A ShardSummer running one Ray task per shard and adding their sums here as they finish
    (at most `in_flight` at a time, so the partial sums waiting to be added stay few)."""

    def __init__(self, ray):
        self.ray = ray
        self.task = ray.remote(num_cpus=1)(shard_file_sums)
        self.in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))

    def __call__(self, layout: StoreLayout, work: list, n_segments: int,
                 advance: Callable[[int], None] = _no_progress) -> np.ndarray:
        from phrasefuse.errors import BadInput

        sums = np.zeros((n_segments, layout.store.dim), np.float32)
        pending, todo = [], list(work)
        try:
            while todo or pending:
                while todo and len(pending) < self.in_flight:
                    shard, code, row, weight = todo.pop(0)
                    pending.append(self.task.remote(str(layout.store.path), str(layout.shards[shard]),
                                                    code, row, weight, n_segments))
                done, pending = self.ray.wait(pending, num_returns=1)
                sums += self.ray.get(done[0])
                advance(1)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, BadInput):  # a bad shard: the same one line as the local engine
                raise BadInput(str(cause)) from None
            raise
        return sums
