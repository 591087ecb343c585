"""The index folder on disk, and `PhraseIndex` to query it.

    INDEX/meta.json         format, the image store's encoder (identity + spec), dim, index kind,
                            structure and search setting, recall@10 at build time, counts, build id
    INDEX/phrases.parquet   row i = FAISS row i: phrase, images (image count), source (image|text)
    INDEX/index.faiss       the FAISS index (faiss.write_index; no pickle)

The folder is built under a hidden temporary sibling and renamed into place, so an
index is there whole or not at all (a rebuild replaces the old one the same way).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from phrasefuse.errors import BadInput
from phrasefuse.folders import (atomic_folder, is_folder_of, read_meta_json, readable_folder, write_atomic,
                                write_json_atomic, write_parquet_atomic)
from phrasefuse.store import describe_encoder, encoder_identity

FORMAT = "phrasefuse-index"
FORMAT_VERSION = 1
META = "meta.json"
PHRASES = "phrases.parquet"
FAISS_FILE = "index.faiss"
SOURCES = ("image", "text")


def is_index(path: str | os.PathLike) -> bool:
    return is_folder_of(path, FORMAT)


def phrases_table(phrases: pa.Array, images: np.ndarray, source: np.ndarray) -> pa.Table:
    return pa.table({"phrase": pa.array(phrases, pa.string()), "images": pa.array(images, pa.int64()),
                     "source": pa.array(source, pa.string())})


def write_index_folder(out: str | os.PathLike, index, phrases: pa.Table, meta: dict) -> None:
    """Write the three files under a temporary sibling folder, then rename it to `out`."""
    import faiss

    if index.ntotal != phrases.num_rows:
        raise RuntimeError(f"index has {index.ntotal} rows, phrases table {phrases.num_rows}")
    with atomic_folder(out, FORMAT, "index") as tmp:
        # serialized, then written by Python: faiss.write_index reports a full disk as a RuntimeError
        # and a file-size limit not at all (a truncated file, "close error" on stderr)
        write_atomic(tmp / FAISS_FILE, lambda path: _write_bytes(path, faiss.serialize_index(index)))
        write_parquet_atomic(tmp / PHRASES, phrases)
        write_json_atomic(tmp / META, meta)  # last: a folder with meta.json is complete


def _write_bytes(path: str, data: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(memoryview(data))


class PhraseIndex:
    """An index folder, read-only. Cheap to open (meta and phrases); the FAISS file loads on first search.

    `device` auto|cpu|cuda: where searches run (`devices.search_device`: a GPU copy of the index when FAISS
    sees a GPU); resolved here, so `--device cuda` without a GPU fails before any model loads."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        from phrasefuse.index.devices import search_device

        self.path = readable_folder(path)  # a swap killed half-way: the previous index, read in place
        meta = read_meta_json(self.path, fmt=FORMAT, version=FORMAT_VERSION, what="index",
                              not_a="a phrasefuse index", missing="build one with 'phrasefuse index build'", unreadable="rebuild the index")
        self.meta = meta
        self._faiss = None
        self._gpu_copy = None
        self._table: pa.Table | None = None
        self.requested_device = device
        self.device = search_device(**self._gpu_terms(), requested=device) if device != "cpu" else "cpu"

    def __repr__(self) -> str:
        return f"PhraseIndex({str(self.path)!r})"

    @property
    def encoder(self) -> dict:
        return self.meta["encoder"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            try:
                self._table = pq.read_table(self.path / PHRASES)
            except (OSError, pa.ArrowException) as e:
                raise BadInput(f"{self.path / PHRASES}: unreadable ({str(e).splitlines()[0][:160]}); "
                               f"rebuild the index") from None
        return self._table

    @property
    def phrases(self) -> pa.Array:
        return self.table["phrase"].combine_chunks()

    @property
    def faiss_index(self):
        if self._faiss is None:
            import faiss

            from phrasefuse.index.ann import faiss_threads
            from phrasefuse.index.kinds import Plan
            from phrasefuse.index.tuning import set_search_value

            faiss_threads()
            path = self.path / FAISS_FILE
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as e:
                raise BadInput(f"{path}: unreadable FAISS index ({str(e).strip().splitlines()[-1][:160]}); "
                               f"rebuild the index") from None
            info = self.meta["index"]
            set_search_value(index, Plan(info["kind"], self.dim), info.get("search_value"))
            self._faiss = index
        return self._faiss

    def check_encoder(self, encoder: dict, what: str) -> None:
        """Refuse vectors from another encoder (identity) or of another dimension."""
        if int(encoder.get("dim", -1)) != self.dim:
            raise BadInput(f"{what}: embeddings of dim {encoder.get('dim')}, but index {self.path} holds dim "
                           f"{self.dim} ({describe_encoder(self.encoder)}); use vectors of that encoder")
        if encoder_identity(encoder) != encoder_identity(self.encoder):
            raise BadInput(f"{what}: embeddings of {describe_encoder(encoder)}, but index {self.path} was built "
                           f"from {describe_encoder(self.encoder)}; query it with that encoder's embeddings "
                           f"(or build an index from this store)")

    def search(self, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n, k') float32 cosine, rows (n, k') int64 into `phrases`, -1 = none), k' = min(k, phrases)."""
        from phrasefuse.index.tuning import search

        emb = np.asarray(emb)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise BadInput(f"query embeddings of shape {emb.shape}, but index {self.path} holds dim {self.dim}")
        return search(self.searcher(k), emb, k)

    def _gpu_terms(self) -> dict:
        """What decides whether a GPU can search this index: kind, search setting, PQ code."""
        info = self.meta.get("index", {})
        structure = info.get("structure", {})
        return {"kind": info.get("kind"), "search_value": info.get("search_value"),
                "pq": (structure.get("pq_m", 0), structure.get("pq_nbits", 0))}

    def searcher(self, k: int):
        """What answers a search for the top `k`: the CPU index, or its GPU copy (made once)."""
        from phrasefuse.index.devices import GpuCopy, search_device
        from phrasefuse.index.kinds import Plan
        from phrasefuse.index.tuning import set_search_value

        info = self.meta["index"]
        device = self.device
        if device == "cuda":  # a k beyond the GPU's limit: auto searches on the CPU, cuda refuses
            device = search_device(**self._gpu_terms(), requested=self.requested_device, k=k)
        if device == "cpu":
            return self.faiss_index
        if self._gpu_copy is None:
            self._gpu_copy = GpuCopy(self.faiss_index, info["kind"])
            set_search_value(self._gpu_copy, Plan(info["kind"], self.dim), info.get("search_value"))
        return self._gpu_copy


def verify_index(index: PhraseIndex) -> list[str]:
    """Load everything; one line per problem (empty: sound)."""
    problems = []
    try:
        table = index.table
        ntotal, dim = index.faiss_index.ntotal, index.faiss_index.d
    except BadInput as e:
        return [str(e)]
    if ntotal != table.num_rows:
        problems.append(f"{FAISS_FILE} has {ntotal} rows, {PHRASES} {table.num_rows}")
    if dim != index.dim:
        problems.append(f"{FAISS_FILE} has dim {dim}, meta.json {index.dim}")
    for name in ("phrase", "images", "source"):
        if name not in table.column_names:
            problems.append(f"{PHRASES}: no '{name}' column")
    if "phrase" in table.column_names and len(pc.unique(table["phrase"])) != table.num_rows:
        problems.append(f"{PHRASES}: phrases are not unique")
    return problems


def describe_index(path: str | os.PathLike, verify: bool = False):
    """`phrasefuse inspect INDEX [--verify]`: an inspect Report."""
    from phrasefuse.folder_report import Report

    index = PhraseIndex(path)
    report = Report("index", str(path), describe_fields(index))
    if verify:
        report.verified, report.problems = True, verify_index(index)
    return report


def describe_fields(index: PhraseIndex) -> dict:
    meta, info, counts = index.meta, index.meta["index"], index.meta.get("counts", {})
    setting = f", {info['search_param']}={info['search_value']}" if info.get("search_param") else ""
    return {
        "encoder": describe_encoder(meta["encoder"]),
        "dim": meta["dim"],
        "index": f"{info['kind']} ({info['factory']}{setting}), {info.get('reason', '')}",
        "recall@10": f"{info['recall_at_10']} on {info['recall_queries']} held-out queries"
                     if info.get("recall_queries") else f"{info['recall_at_10']} (exact search)",
        "phrases": f"{counts.get('phrases')} ({counts.get('prototypes_from_images')} from images, "
                   f"{counts.get('prototypes_from_text')} from text)",
        "pairs": ", ".join(f"{k}={v}" for k, v in meta.get("pairs", {}).get("counts", {}).items()),
        "images": meta.get("images", {}).get("store"),
        "created": meta.get("created"),
    }
