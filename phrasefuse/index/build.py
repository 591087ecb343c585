"""`phrasefuse index build`: pairs + image store -> prototypes -> FAISS index folder.

reader   the pairs table, streamed, cleaned and counted (pairs.py), coded and spilled to disk by query
         partition (streaming.py); the image store, one shard at a time;
mapper   prototypes as segment sums (prototypes.py), a query partition per pass and a shard at a time
         (--engine ray: one Ray task per shard, reduced here), into a file; with --text-prototypes,
         phrases that have no image get one from the image encoder's own text tower (open_clip);
writer   the FAISS index, chosen, trained on a sample and filled in batches from that file, tuned
         (ann.py), in an index folder (folder.py).

Memory: --memory bounds a partition's sums and pairs (streaming.py) and the loaded index (ann.py);
neither the pairs table nor the store nor all the prototypes is held whole besides the index.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from phrasefuse.errors import BadInput
from phrasefuse.index import DEFAULT_TARGET_RECALL
from phrasefuse.index.ann import build_faiss_index
from phrasefuse.index.ann import human_bytes, parse_memory
from phrasefuse.index.folder import FORMAT, FORMAT_VERSION, phrases_table, write_index_folder
from phrasefuse.engine import RayOptions
from phrasefuse.folders import environment_errno, library_versions
from phrasefuse.index.streaming import RaySums, StoreLayout, StreamedPrototypes, VectorFile, local_sums, stream_prototypes
from phrasefuse.store import EmbeddingStore, describe_encoder, l2_normalize

RECALL_QUERIES = 1000  # sample image embeddings: half tune the search setting, half measure recall@10


@dataclass
class BuildSummary:
    out: str
    pairs: dict  # PairCounts
    counts: dict  # phrases kept / dropped, prototypes by source
    index: dict  # IndexReport
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        p, c, ix = self.pairs, self.counts, self.index
        dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in p.items()
                            if k not in ("pairs_read", "pairs_used") and v)
        setting = f" {ix['search_param']}={ix['search_value']}" if ix.get("search_param") else ""
        lines = [
            f"index build: {c['phrases']} phrases ({c['prototypes_from_images']} from images, "
            f"{c['prototypes_from_text']} from text) from {p['pairs_used']} of {p['pairs_read']} pairs"
            + (f" (dropped: {dropped})" if dropped else ""),
            f"  index: {ix['factory']}{setting} ({human_bytes(ix['bytes'])}); {ix['reason']}"
            + ("; trained and tuned on the GPU, saved in the CPU format" if ix.get("device") == "cuda" else ""),
            f"  recall@10 {ix['recall_at_10']:.3f} vs exact search"
            + (f" on {ix['recall_queries']} held-out image embeddings" if ix["recall_queries"] else " (exact)")
            + f"; {self.seconds:.1f} s -> {self.out}",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def as_dict(self) -> dict:
        return {"out": self.out, "pairs": self.pairs, "counts": self.counts, "index": self.index,
                "seconds": round(self.seconds, 2), "notes": self.notes}


def build_index(pairs: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                min_images: int = 1, text_prototypes: bool = False, kind: str = "auto",
                memory: str | int | None = None, use_weights: bool = True,
                target_recall: float = DEFAULT_TARGET_RECALL, device: str = "auto", seed: int = 0,
                engine: str = "local", ray: RayOptions | None = None, progress: bool | None = None) -> BuildSummary:
    """Build the prototype index of the pairs table `pairs` over the image store `images` into `out`.
    `device` auto|cpu|cuda: the text tower of --text-prototypes, and FAISS's k-means and tuning searches
    (the index is saved in the CPU format either way). `memory` bounds the prototype sums and the index
    (streaming.py); `engine` 'ray' sums the store's shards in Ray tasks. `progress` as every batch job's
    (engine.progress: a bar on a terminal, else a line at most every 30 s; False: none): the pairs coded,
    the store shards summed per query partition, the vectors added to FAISS."""
    from phrasefuse.index.devices import faiss_device

    start = time.perf_counter()
    faiss_device(device)  # --device cuda without a GPU: refused before any work
    if min_images < 1:
        raise BadInput(f"--min-images {min_images}: must be at least 1")
    if not 0 < target_recall <= 1:
        raise BadInput(f"--target-recall {target_recall}: must be in (0, 1]")
    memory_bytes = memory if isinstance(memory, int) else parse_memory(memory)
    shard_summer = _shard_summer(engine, ray)  # --engine ray: Ray installed and reachable, before any work
    layout = _image_layout(images)
    try:
        with tempfile.TemporaryDirectory(prefix="phrasefuse-index-") as work, shard_summer as summer:
            streamed = stream_prototypes(pairs, layout, Path(work), memory=memory_bytes, min_images=min_images,
                                         use_weights=use_weights, summer=summer, progress=progress)
            summary = _index_from_prototypes(streamed, layout, pairs, images, out, min_images=min_images,
                                             text_prototypes=text_prototypes, kind=kind, memory=memory_bytes,
                                             target_recall=target_recall, device=device, seed=seed,
                                             progress=progress)
    except OSError as e:  # the scratch files (NumPy's tofile: a short write has no errno) on a full disk
        scratch = tempfile.gettempdir()
        code = environment_errno(e, Path(scratch))
        if code not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise BadInput(f"{scratch}: cannot write the index build's scratch files ({os.strerror(code)}); free "
                       f"space there or set TMPDIR to a folder with room") from None
    summary.seconds = time.perf_counter() - start
    return summary


def _index_from_prototypes(streamed: StreamedPrototypes, layout: StoreLayout, pairs, images, out, *,
                           min_images: int, text_prototypes: bool, kind: str, memory: int, target_recall: float,
                           device: str, seed: int, progress: bool | None = False) -> BuildSummary:
    """Text prototypes appended, the FAISS index chosen, trained, tuned and written."""
    store, phrases, counts = layout.store, streamed.phrases, streamed.images_per_phrase
    kept_idx = streamed.kept
    sources, image_counts = [np.full(len(kept_idx), "image")], [counts[kept_idx]]
    names = [phrases.take(pa.array(kept_idx, pa.int64()))]
    no_images = np.flatnonzero(counts == 0)
    notes: list[str] = []
    if text_prototypes and len(no_images):
        text_names = phrases.take(pa.array(no_images, pa.int64()))
        with open(streamed.vectors_path, "ab") as f:
            np.asarray(_text_prototypes(store, text_names.to_pylist(), device), np.float32).tofile(f)
        sources.append(np.full(len(no_images), "text"))
        image_counts.append(np.zeros(len(no_images), np.int64))
        names.append(text_names)
    if streamed.zero_prototypes:  # said, not silently lost: all-zero weights, or images that cancel out
        notes.append(f"{streamed.zero_prototypes} phrases dropped: their images' weighted mean is zero (all weights 0, "
                     f"or vectors that cancel out)")
    if len(no_images) and not text_prototypes:
        notes.append(f"{len(no_images)} phrases have no image in the store"
                     " (--text-prototypes gives them one if the store's encoder is open_clip)")
    n_text = int(sum(len(s) for s in sources[1:]))
    kept = counts >= min_images
    summary_counts = {
        "phrases": int(len(kept_idx) + n_text),
        "prototypes_from_images": int(len(kept_idx)),
        "prototypes_from_text": n_text,
        "phrases_below_min_images": int(((counts > 0) & ~kept).sum()),
        "phrases_without_images": int(len(no_images) - n_text),
        "phrases_zero_prototype": int(streamed.zero_prototypes),  # their images cancel out
    }
    if summary_counts["phrases"] == 0:
        raise BadInput(_no_usable_rows(pairs, images, streamed, summary_counts, min_images))
    if streamed.partitions > 1:
        notes.append(f"prototypes summed in {streamed.partitions} query partitions (--memory {human_bytes(memory)})")

    vectors = VectorFile(streamed.vectors_path, summary_counts["phrases"], streamed.dim)
    table = phrases_table(pa.concat_arrays(names), np.concatenate(image_counts), np.concatenate(sources))
    sample = np.random.default_rng(seed).choice(layout.rows, size=min(layout.rows, RECALL_QUERIES), replace=False)
    queries = l2_normalize(layout.rows_of(np.sort(sample)))
    # Arrow's pool (mimalloc) keeps the blocks freed by the passes over the store for reuse: about
    # 0.3 GB after reading every shard for the sample, which the index would otherwise sit on top of.
    pa.default_memory_pool().release_unused()
    index, report = build_faiss_index(vectors, queries, kind=kind, memory=memory, target_recall=target_recall,
                                      seed=seed, device=device, progress=progress)
    meta = _index_meta(store, images, layout.rows, streamed.dim, pairs, streamed, min_images, summary_counts, report)
    write_index_folder(out, index, table, meta)
    return BuildSummary(str(out), streamed.counts.as_dict(), summary_counts, report.as_dict(), 0.0, notes)


def _shard_summer(engine: str, ray: RayOptions | None):
    """A context manager yielding the ShardSummer of --engine: local, or Ray tasks in one Ray session."""
    from phrasefuse.engine import get_engine, ray_session

    chosen = get_engine(engine, ray)
    if chosen.name == "local":
        return contextlib.nullcontext(local_sums)

    @contextlib.contextmanager
    def on_ray():
        with ray_session(chosen.options.address) as ray_module:
            yield RaySums(ray_module)

    return on_ray()


def _image_layout(images: str | os.PathLike) -> StoreLayout:
    """The image store the pairs name, by shard; refuses another modality or an empty store."""
    store = EmbeddingStore(images)
    if store.meta.get("modality") != "image":
        raise BadInput(f"--images {images}: holds {store.meta.get('modality')} embeddings; pass an image store "
                       f"(phrasefuse extract images)")
    layout = StoreLayout.of(store)
    if layout.rows == 0:
        raise BadInput(f"--images {images}: the store has no embeddings; run 'phrasefuse extract images' first")
    return layout


def _index_meta(store: EmbeddingStore, images, rows: int, dim: int, pairs, pairs_data, min_images: int,
                summary_counts: dict, report) -> dict:
    """INDEX/meta.json."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "build_id": uuid.uuid4().hex,
        "encoder": store.meta["encoder"],
        "dim": int(dim),
        "metric": "inner product on unit vectors (cosine)",
        "images": {"store": str(images), "rows": int(rows)},
        "pairs": {"path": str(pairs), "counts": pairs_data.counts.as_dict(), "min_images": min_images,
                  "weighted": pairs_data.weighted, "normalisation": "NFKC, lower case, whitespace collapsed, trimmed"},
        "counts": summary_counts,
        "recall_at_10": report.recall_at_10,
        "index": report.as_dict(),
        "versions": {**library_versions(), "faiss": _faiss_version()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _text_prototypes(store: EmbeddingStore, texts: list[str], device: str) -> np.ndarray:
    """Prototypes from the image encoder's own text tower (a family that shares the image-text space)."""
    from phrasefuse.extract.encoders import families_sharing_image_text_space, family_of
    from phrasefuse.extract.recorded import load_recorded_encoder

    encoder_meta = store.meta["encoder"]
    family = family_of(encoder_meta.get("family"))
    if not (family and family.shares_image_text_space):
        raise BadInput(f"--text-prototypes: store {store.path} was embedded with {describe_encoder(encoder_meta)}, "
                       f"which has no text tower in the same space; use an image store of "
                       f"{' or '.join(families_sharing_image_text_space())}, or drop the flag")
    encoder = load_recorded_encoder(store.meta, "text", folder=store.path, kind="store", device=device,
                                    what="--text-prototypes: ", fix="restore those weights or re-extract the store")
    return encoder.encode(texts)


def _no_usable_rows(pairs, images, data, counts: dict, min_images: int) -> str:
    c = data.counts
    parts = [f"{c.pairs_read} rows read", f"{c.empty_phrase} empty phrases", f"{c.no_image_id} without image_id",
             f"{c.missing_id} image_ids not in the store" + (f" (e.g. {data.missing_example!r})" if data.missing_example else ""),
             f"{c.zero_weight} of weight 0", f"{counts['phrases_below_min_images']} phrases below --min-images {min_images}"]
    return (f"{pairs}: no usable pairs ({'; '.join(parts)}); image_id must name ids of the image store {images}")


def _faiss_version() -> str:
    import faiss

    return faiss.__version__
