"""The embedding store: the on-disk format every stage reads and writes.

A store is a folder per feature (docs/formats.md, Embedding store)::

    STORE/meta.json              encoder identity, dim, dtype, normalised, preprocessing, versions
    STORE/part-00000.parquet     id (string), key (string), emb (fixed_size_list<float32|float16>[dim]),
    STORE/part-00001.parquet     ... plus any extra columns a stage adds (e.g. phrases, scores)
                                 image stores: stamp (string), where the row's bytes were read from and
                                 the file's size, mtime_ns and ctime_ns (`extract.jobs.source_stamps`);
                                 null in stores written before stamps (filled by the next extract)
    STORE/errors.parquet         id, reason: rows that could not be embedded (retried on the next run)
    STORE/.lock                  flock'ed by the one job writing the store
    STORE/quarantine/            shards `inspect --verify --quarantine` moved aside (quarantine.json says why);
                                 readers never look there, so a re-run of the job re-embeds their rows

Every file appears whole or not at all: it is written to a hidden temporary name,
fsync'ed, then renamed (`folders.write_atomic`). Each id is in at most one shard.

A row is the embedding of the item's content (`key`: sha256 of the bytes). When an item's content
changes (a photo replaced at the same path, another text under the same id), the job that notices
drops the old row first (`StoreWriter.revise` rewrites its shard, whole or not at all) and then
embeds the item again into a new shard: readers never see two vectors for one id, nor the old one
after the job; a job killed between the two leaves the id absent, and the next run embeds it.

`EmbeddingStore` reads (into NumPy through one contiguous Arrow buffer, no per-row
Python); `StoreWriter` appends shards under the lock. Other stages (index, fuse)
use these two and never touch the files directly.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from phrasefuse.errors import BadInput
from phrasefuse.faultpoints import fault_point
from phrasefuse.folders import (ENVIRONMENT_ERRNOS, LEFTOVER_RE, META, SHARD_RE, fsync_dir, library_versions,
                                read_meta_json, readable_folder, write_json_atomic, write_parquet_atomic)

FORMAT = "phrasefuse-store"
FORMAT_VERSION = 1
ERRORS = "errors.parquet"
LOCK = ".lock"
QUARANTINE = "quarantine"
QUARANTINE_LOG = "quarantine.json"
STAMP = "stamp"  # image stores: where a row's bytes came from, and that file's size and times
DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
# Fields of meta["encoder"] that say which model made the vectors; "spec" is how the
# user named it and may differ (another path to the same checkpoint).
IDENTITY_FIELDS = ("family", "name", "weights_sha256", "dim")


# ---------------------------------------------------------------- arrays


def embedding_array(emb: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """(n, dim) floats -> Arrow fixed_size_list<dtype>[dim], without a per-row loop."""
    emb = np.ascontiguousarray(emb, dtype=np.dtype(dtype))
    n, dim = emb.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=DTYPES[dtype]), dim)


def embeddings_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Arrow fixed_size_list column -> (n, dim) NumPy view of one contiguous buffer."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    values = column.flatten()  # respects slice offsets
    if len(values) == 0:
        return np.zeros((0, dim), dtype=values.type.to_pandas_dtype())
    return values.to_numpy(zero_copy_only=True).reshape(-1, dim)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)




# ---------------------------------------------------------------- meta


def new_meta(*, modality: str, encoder: dict, dtype: str, preprocess: dict | None = None,
             source: dict | None = None, extra: dict | None = None) -> dict:
    """The meta.json of a new store. `encoder` holds spec + IDENTITY_FIELDS."""
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modality": modality,
        "encoder": encoder,
        "dim": int(encoder["dim"]),
        "dtype": dtype,
        "normalized": True,
        "preprocess": preprocess or {},
        "source": source or {},
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra or {})
    return meta


def _check_store_meta(path: Path, meta: dict) -> None:
    """The fields every reader relies on, as a writer writes them (a tampered or hand-edited meta.json
    is refused here, naming the field, rather than failing later in a library)."""
    dim, dtype, encoder = meta.get("dim"), meta.get("dtype"), meta.get("encoder")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim <= 1 << 20:
        raise BadInput(f"{path}: field 'dim' is {dim!r}; expected a whole number (the vector size); restore "
                       f"meta.json or re-create the store")
    if dtype not in DTYPES:
        raise BadInput(f"{path}: field 'dtype' is {dtype!r}; expected one of {', '.join(DTYPES)}; restore "
                       f"meta.json or re-create the store")
    if not isinstance(encoder, dict) or encoder.get("dim") != dim:
        got = encoder.get("dim") if isinstance(encoder, dict) else encoder
        raise BadInput(f"{path}: field 'encoder.dim' is {got!r} but 'dim' is {dim}; the vectors cannot be of "
                       f"both sizes: restore meta.json or re-create the store")


def encoder_identity(encoder: dict) -> dict:
    return {k: encoder.get(k) for k in IDENTITY_FIELDS}


def describe_encoder(encoder: dict) -> str:
    return f"{encoder.get('spec') or encoder.get('name')} (dim {encoder.get('dim')}, weights {str(encoder.get('weights_sha256'))[:12]})"


# ---------------------------------------------------------------- reading


class EmbeddingStore:
    """A store folder, read-only. Cheap to construct; reads lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = readable_folder(path)  # a swap killed half-way: the previous store, read in place

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r})"

    # -- layout
    @property
    def meta_path(self) -> Path:
        return self.path / META

    @property
    def errors_path(self) -> Path:
        return self.path / ERRORS

    def exists(self) -> bool:
        return self.meta_path.is_file()

    @property
    def meta(self) -> dict:
        if not hasattr(self, "_meta"):
            meta = read_meta_json(self.path, fmt=FORMAT, version=FORMAT_VERSION, what="store",
                                  not_a="an embedding store", missing="create it with 'phrasefuse extract'",
                                  unreadable="restore it or re-create the store")
            _check_store_meta(self.meta_path, meta)
            self._meta = meta
        return self._meta

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    def shard_paths(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if SHARD_RE.match(p.name))

    def next_shard_number(self) -> int:
        numbers = [int(SHARD_RE.match(p.name).group(1)) for p in self.shard_paths()]
        return max(numbers, default=-1) + 1

    def num_rows(self) -> int:
        """Row count from the Parquet footers, without reading data."""
        return sum(self.shard_rows(p) for p in self.shard_paths())

    def shard_rows(self, shard: Path) -> int:
        try:
            return pq.read_metadata(shard).num_rows
        except (OSError, pa.ArrowException) as e:
            raise BadInput(f"{shard}: unreadable shard ({str(e).splitlines()[0][:200]}); run 'phrasefuse inspect "
                           f"--verify {self.path} --quarantine', then re-run the job") from None

    # -- reading
    def _check_schema(self, shard: Path, schema: pa.Schema) -> None:
        expected = pa.list_(DTYPES[self.dtype], self.dim)
        for name in ("id", "key", "emb"):
            if name not in schema.names:
                raise BadInput(f"{shard}: no '{name}' column; run 'phrasefuse inspect --verify {self.path}'")
        if schema.field("emb").type != expected:
            raise BadInput(f"{shard}: column emb is {schema.field('emb').type}, expected {expected} "
                           f"(meta.json); run 'phrasefuse inspect --verify {self.path}'")

    def read_table(self, columns: Iterable[str] | None = None) -> pa.Table:
        """All shards as one Arrow table (shard order, then row order)."""
        columns = list(columns) if columns is not None else None
        tables = list(self.iter_tables(columns))
        if not tables:
            return self.empty_table(columns)
        return pa.concat_tables(tables, promote_options="default")

    def iter_tables(self, columns: Iterable[str] | None = None) -> Iterator[pa.Table]:
        """Each shard as an Arrow table, in shard order: one shard in memory at a time."""
        self.meta  # fail early on a folder that is not a store
        columns = list(columns) if columns is not None else None
        for shard in self.shard_paths():
            yield self.read_shard(shard, columns)

    def read_shard(self, shard: Path, columns: list[str] | None = None) -> pa.Table:
        """One shard, checked: a truncated file, another schema, NaN/inf or zero embeddings are a
        BadInput naming the shard (never silently wrong vectors)."""
        fix = f"run 'phrasefuse inspect --verify {self.path} --quarantine', then re-run the job"
        try:
            self._check_schema(shard, pq.read_schema(shard))
            table = pq.read_table(shard, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise BadInput(f"{shard}: unreadable shard ({str(e).splitlines()[0][:200]}); {fix}") from None
        if "emb" in table.column_names:
            emb = embeddings_to_numpy(table["emb"])
            bad = ~np.isfinite(emb).all(axis=1) | ~emb.any(axis=1)
            if bad.any():
                first = f" (first id {table['id'][int(np.argmax(bad))]})" if "id" in table.column_names else ""
                raise BadInput(f"{shard}: {int(bad.sum())} embeddings are NaN/inf or zero{first}; {fix}")
        return table

    def empty_table(self, columns: Iterable[str] | None = None) -> pa.Table:
        schema = pa.schema([("id", pa.string()), ("key", pa.string()),
                            ("emb", pa.list_(DTYPES[self.dtype], self.dim))])
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns if c in schema.names])
        return schema.empty_table()

    def ids_and_keys(self) -> pa.Table:
        return self.read_table(["id", "key"])

    def ids_keys_stamps(self) -> pa.Table:
        """(id, key, stamp) of every row; stamp is null in shards written before stamps existed."""
        tables = []
        for shard in self.shard_paths():
            names = self._shard_names(shard)
            t = self.read_shard(shard, ["id", "key"] + [STAMP] * (STAMP in names))
            if STAMP not in names:
                t = t.append_column(STAMP, pa.nulls(t.num_rows, pa.string()))
            tables.append(t.select(["id", "key", STAMP]))
        if not tables:
            return pa.table({"id": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                             STAMP: pa.array([], pa.string())})
        return pa.concat_tables(tables)

    def _shard_names(self, shard: Path) -> list[str]:
        try:
            return pq.read_schema(shard).names
        except (OSError, pa.ArrowException) as e:
            raise BadInput(f"{shard}: unreadable shard ({str(e).splitlines()[0][:200]}); run 'phrasefuse inspect "
                           f"--verify {self.path} --quarantine', then re-run the job") from None

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, emb): ids as a NumPy object array, emb (n, dim) in the stored dtype."""
        table = self.read_table(["id", "emb"])
        return table["id"].to_numpy(), embeddings_to_numpy(table["emb"])

    def lookup(self, ids: pa.Array | Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings for `ids` in their order: (emb (n, dim) float32, present (n,) bool).
        Ids absent from the store get a zero row and present=False."""
        ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string())
        table = self.read_table(["id", "emb"])
        found = pc.index_in(ids, value_set=table["id"])
        present = found.is_valid().to_numpy(zero_copy_only=False)
        pos = found.fill_null(0).to_numpy(zero_copy_only=False)
        emb = embeddings_to_numpy(table["emb"]).astype(np.float32, copy=False)
        out = np.zeros((len(pos), self.dim), dtype=np.float32)
        if len(emb):
            out[present] = emb[pos[present]]
        return out, present

    def embeddings_by_key(self, keys: pa.Array) -> np.ndarray:
        """Stored embeddings for content keys (all must be present), in the order of
        `keys`; reads one shard at a time, so memory holds only the matches."""
        keys = pa.array(keys, pa.string()) if not isinstance(keys, pa.Array) else keys
        unique = pc.unique(keys)
        found_keys, found_emb = [], []
        remaining = unique
        for shard in self.shard_paths():
            if len(remaining) == 0:
                break
            t = self.read_shard(shard, ["key", "emb"])
            t = t.filter(pc.is_in(t["key"], value_set=remaining))
            if t.num_rows:
                # One row per key (the same content may be stored under several ids).
                first = pc.index_in(pc.unique(t["key"]), value_set=t["key"])
                t = t.take(first)
                found_keys.append(t["key"].combine_chunks())
                found_emb.append(embeddings_to_numpy(t["emb"]))
                remaining = remaining.filter(pc.invert(pc.is_in(remaining, value_set=t["key"])))
        if len(remaining):
            raise RuntimeError(f"{self.path}: {len(remaining)} content keys vanished from the store during the job")
        all_keys = pa.concat_arrays(found_keys) if found_keys else pa.array([], pa.string())
        all_emb = np.concatenate(found_emb) if found_emb else np.zeros((0, self.dim), np.float32)
        return all_emb[pc.index_in(keys, value_set=all_keys).to_numpy()]

    def errors(self) -> pa.Table:
        """The rows that could not be embedded (id, reason)."""
        if not self.errors_path.is_file():
            return pa.table({"id": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
        try:
            errors = pq.read_table(self.errors_path)
            if not {"id", "reason"} <= set(errors.column_names):
                raise ValueError("no 'id' and 'reason' columns")
            return pa.table({"id": pc.cast(errors["id"], pa.string()), "reason": pc.cast(errors["reason"], pa.string())})
        except (OSError, ValueError, pa.ArrowException) as e:
            raise BadInput(f"{self.errors_path}: unreadable ({str(e).splitlines()[0][:120]}); delete it (the rows it "
                           f"lists are simply tried again by the next run of the job)") from None


# ---------------------------------------------------------------- writing


class StoreWriter:
    """Appends shards to a store, holding its lock. Use as a context manager::

        with StoreWriter.open(path, meta, shard_size=10_000) as writer:
            writer.revise(changed_ids, restamp)   # first, if any: rows whose content changed go
            writer.add(ids, keys, emb)            # buffered; a full buffer becomes a shard
            writer.add_errors(ids, reasons)
        # closing flushes the last shard and the errors file

    Opening refuses a store whose encoder identity, modality, source column or dtype
    differ from `meta` (exit 2), and another job holding the lock (exit 2).
    """

    def __init__(self, store: EmbeddingStore, meta: dict, shard_size: int, lock_fd: int):
        self.store = store
        self.meta = meta
        self.shard_size = max(1, int(shard_size))
        self._lock_fd = lock_fd
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._next = store.next_shard_number()
        self._old_errors = store.errors()
        self._new_errors: list[pa.Table] = []
        self._written_ids: list[pa.Array] = []
        self._errors_dirty = False
        self.rows_written = 0
        self.shards_written = 0

    @classmethod
    def open(cls, path: str | os.PathLike, meta: dict, shard_size: int = 10_000) -> "StoreWriter":
        path = Path(path)
        _check_store_folder(path)  # before the lock file: nothing is written into someone else's folder
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"{path}: cannot create the store folder ({e.strerror}); choose another --out") from None
        lock_fd = _acquire_lock(path)
        try:
            store = EmbeddingStore(path)
            if store.exists():
                meta = _compatible_meta(store, meta)
            elif store.shard_paths():
                raise BadInput(f"{path}: has shards but no {META}; restore meta.json or use a new --out folder")
            else:
                _check_store_folder(path)  # again under the lock: filled meanwhile?
                write_json_atomic(store.meta_path, meta)
            for stale in path.iterdir():  # our temporary files of a killed job (we hold the lock)
                m = LEFTOVER_RE.match(stale.name)
                if m and m["kind"] == "tmp" and not stale.is_dir() and not stale.is_symlink():
                    stale.unlink(missing_ok=True)
            _drop_stale_errors(store)
            return cls(store, meta, shard_size, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
            else:
                try:  # Ctrl-C or a failure: keep what is already embedded, if the disk lets us
                    self.flush()
                except Exception:  # noqa: BLE001 - the original exception is the one to report
                    pass
                if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM: the CLI prints the note (what is kept)
                    with contextlib.suppress(Exception):
                        exc.add_note(f"{self.store.path}: {self.rows_written} rows written by this run, "
                                     f"{self.store.num_rows()} rows in {len(self.store.shard_paths())} shards kept")
        finally:
            os.close(self._lock_fd)

    # -- appending
    def add(self, ids: Iterable[str] | pa.Array, keys: Iterable[str] | pa.Array, emb: np.ndarray,
            extra: dict[str, pa.Array] | None = None) -> None:
        """Buffer rows; write a shard each time `shard_size` rows are buffered."""
        if len(emb) == 0:
            return
        if emb.shape[1] != self.store.dim:
            raise RuntimeError(f"embedding dim {emb.shape[1]} != store dim {self.store.dim}")
        columns = {"id": pa.array(ids, pa.string()), "key": pa.array(keys, pa.string()),
                   "emb": embedding_array(emb, self.meta["dtype"])}
        columns.update(extra or {})
        self._buffer.append(pa.table(columns))
        self._buffered += len(emb)
        while self._buffered >= self.shard_size:
            self._write_shard(self.shard_size)
        fault_point("rows-buffered")

    def add_errors(self, ids: Iterable[str], reasons: Iterable[str]) -> None:
        ids, reasons = list(ids), list(reasons)
        if ids:
            self._new_errors.append(pa.table({"id": pa.array(ids, pa.string()),
                                              "reason": pa.array(reasons, pa.string())}))
            self._errors_dirty = True

    def flush(self) -> None:
        """Write all buffered rows as a shard (whole or not at all), then errors.parquet."""
        if self._buffered:
            self._write_shard(self._buffered)
        if self._errors_dirty:
            self._write_errors()

    def revise(self, drop: pa.Array, restamp: pa.Table | None = None) -> int:
        """Before new rows are added: remove the rows of the ids `drop` (their content changed: the
        job embeds them again), and set the `stamp` of the ids of `restamp` (id, stamp; their content
        was checked and is unchanged). Each shard concerned is rewritten whole (atomic rename), or
        deleted when no row is left. Returns the number of rows removed."""
        restamp = restamp if restamp is not None else pa.table({"id": pa.array([], pa.string()),
                                                                STAMP: pa.array([], pa.string())})
        if self._buffered:
            raise RuntimeError("revise() must come before add()")
        if not len(drop) and not restamp.num_rows:
            return 0
        touched = pa.concat_arrays([pc.cast(drop, pa.string()), restamp["id"].combine_chunks()])
        removed = 0
        for shard in self.store.shard_paths():
            ids = self.store.read_shard(shard, ["id"])["id"]
            if not pc.any(pc.is_in(ids, value_set=touched)).as_py():
                continue
            table = self.store.read_shard(shard)
            keep = pc.invert(pc.is_in(table["id"], value_set=drop))
            table = table.filter(keep)
            removed += len(ids) - table.num_rows
            if restamp.num_rows:
                where = pc.index_in(table["id"], value_set=restamp["id"])
                old = table[STAMP] if STAMP in table.column_names else pa.nulls(table.num_rows, pa.string())
                new = pc.coalesce(restamp[STAMP].combine_chunks().take(where), old)
                table = (table.set_column(table.column_names.index(STAMP), STAMP, new) if STAMP in table.column_names
                         else table.append_column(STAMP, new))
            if table.num_rows:
                write_parquet_atomic(shard, table)
            else:
                shard.unlink()
                fsync_dir(self.store.path)
            fault_point("shard-revised")
        return removed

    def _write_shard(self, rows: int) -> None:
        """The first `rows` buffered rows become the next part-NNNNN.parquet."""
        buffered = pa.concat_tables(self._buffer)
        table, rest = buffered.slice(0, rows), buffered.slice(rows)
        write_parquet_atomic(self.store.path / f"part-{self._next:05d}.parquet", table)
        self._next += 1
        self.shards_written += 1
        self.rows_written += table.num_rows
        self._written_ids.append(table["id"].combine_chunks())
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows
        # Ids embedded now leave errors.parquet with the same shard that stores them.
        if self._old_errors.num_rows or self._errors_dirty:
            self._write_errors()
        fault_point("shard-written")

    def _write_errors(self) -> None:
        # Old errors stay unless their id was embedded now or failed again (new reason wins).
        new = pa.concat_tables(self._new_errors) if self._new_errors else self._old_errors.schema.empty_table()
        resolved = pa.concat_arrays(self._written_ids + [new["id"].combine_chunks()]) if (
            self._written_ids or new.num_rows) else pa.array([], pa.string())
        old = self._old_errors.filter(pc.invert(pc.is_in(self._old_errors["id"], value_set=resolved)))
        errors = pa.concat_tables([old.select(["id", "reason"]), new.select(["id", "reason"])])
        if errors.num_rows:
            write_parquet_atomic(self.store.errors_path, errors)
        elif self.store.errors_path.exists():
            self.store.errors_path.unlink()
        self._errors_dirty = False


def _drop_stale_errors(store: EmbeddingStore) -> None:
    """errors.parquet without the ids that are in a shard: a job killed between writing a shard and
    rewriting errors.parquet leaves them listed as failed. Called under the store lock."""
    errors = store.errors()
    if not errors.num_rows:
        return
    stored = store.ids_and_keys()["id"] if store.shard_paths() else pa.array([], pa.string())
    kept = errors.filter(pc.invert(pc.is_in(errors["id"], value_set=stored)))
    if kept.num_rows == errors.num_rows:
        return
    if kept.num_rows:
        write_parquet_atomic(store.errors_path, kept)
    else:
        store.errors_path.unlink()


def _check_store_folder(path: Path) -> None:
    """An output store folder is absent, empty, or a store (meta.json): anything else is someone
    else's folder and is refused before anything is written into it. A folder holding only our
    lock file and temporaries is a first job killed before its meta.json: resumed."""
    if not os.path.lexists(path) or (path / META).is_file():
        return
    if not path.is_dir():
        raise BadInput(f"{path}: exists and is not a folder; choose another --out (a new or empty folder)")
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise BadInput(f"{path}: cannot read the folder ({e.strerror}); choose another --out") from None
    others = [n for n in names if n != LOCK and not SHARD_RE.match(n) and not LEFTOVER_RE.match(n)]
    if others and not any(SHARD_RE.match(n) for n in names):  # shards without meta.json: told apart below
        raise BadInput(f"{path}: exists and is not a phrasefuse store (it holds {others[0]!r}"
                       f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}); choose another --out "
                       f"(a new or empty folder)")


def _acquire_lock(path: Path) -> int:
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise BadInput(f"{path}: cannot write to this store ({e.strerror}); make it writable or choose "
                       f"another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise BadInput(f"{path}: another job (pid {holder}) is writing this store; wait for it to finish "
                       f"or write to another --out") from None
    with contextlib.suppress(OSError):  # the pid only names the holder in messages; a full disk may refuse it
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _compatible_meta(store: EmbeddingStore, meta: dict) -> dict:
    """The existing store's meta, after refusing a job that would mix in other vectors."""
    have = store.meta
    if encoder_identity(have["encoder"]) != encoder_identity(meta["encoder"]):
        raise BadInput(f"{store.path}: holds embeddings of {describe_encoder(have['encoder'])}, not of "
                       f"{describe_encoder(meta['encoder'])}; write to another --out folder")
    if have.get("modality") != meta.get("modality"):
        raise BadInput(f"{store.path}: holds {have.get('modality')} embeddings, not {meta.get('modality')}; "
                       f"write to another --out folder")
    have_col, want_col = have.get("source", {}).get("column"), meta.get("source", {}).get("column")
    if have_col != want_col:
        raise BadInput(f"{store.path}: holds embeddings of column '{have_col}', not '{want_col}'; "
                       f"write to another --out folder")
    if have["dtype"] != meta["dtype"]:
        raise BadInput(f"{store.path}: stores {have['dtype']}, not {meta['dtype']}; drop --dtype or use another --out")
    return have


# ---------------------------------------------------------------- verification


def verify_store(store: EmbeddingStore) -> list[str]:
    """Read every shard; return one line per problem (empty: the store is sound).

    Checks: readable Parquet, schema against meta.json, no NaN/inf, no zero
    vectors, unit norms when the store says normalised, each id once, a readable errors.parquet.
    """
    return [f"{name}: {problem}" for name, problems in bad_files(store).items() for problem in problems]


def bad_files(store: EmbeddingStore) -> dict[str, list[str]]:
    """{file name: its problems} for the shards (and errors.parquet) that fail a check.

    An id stored twice is a problem of the later shard; each shard is read once, one at a time.
    """
    problems: dict[str, list[str]] = {}
    seen: list[pa.Array] = []  # ids of the earlier sound shards
    for shard in store.shard_paths():
        try:
            store._check_schema(shard, pq.read_schema(shard))
            table = pq.read_table(shard, columns=["id", "emb"])
        except (BadInput, OSError, pa.ArrowException) as e:
            problems[shard.name] = [str(e).splitlines()[0][:200]]
            continue
        found = _vector_problems(store, table)
        ids = table["id"].combine_chunks()
        earlier = pa.concat_arrays(seen) if seen else pa.array([], pa.string())
        repeated = pc.is_in(ids, value_set=earlier)
        if len(pc.unique(ids)) != len(ids) or pc.any(repeated).as_py():
            counts = pc.value_counts(ids)
            first = (ids.filter(repeated)[0] if pc.any(repeated).as_py()
                     else counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"])
            found.append(f"ids stored more than once (first: {first})")
        if found:
            problems[shard.name] = found
        else:
            seen.append(ids)
    if store.errors_path.exists():
        try:
            errors = pq.read_table(store.errors_path)
            if not {"id", "reason"} <= set(errors.column_names):
                raise ValueError("no 'id' and 'reason' columns")
        except (OSError, ValueError, pa.ArrowException) as e:
            problems[store.errors_path.name] = [f"unreadable ({str(e).splitlines()[0][:200]})"]
    return problems


def _vector_problems(store: EmbeddingStore, table: pa.Table) -> list[str]:
    emb = embeddings_to_numpy(table["emb"]).astype(np.float32)
    bad = ~np.isfinite(emb).all(axis=1)
    norms = np.linalg.norm(np.nan_to_num(emb), axis=1)
    found = []
    if bad.any():
        found.append(f"{int(bad.sum())} rows with NaN/inf (first id {table['id'][int(np.argmax(bad))]})")
    zero = norms < 1e-6
    if zero.any():
        found.append(f"{int(zero.sum())} zero vectors (first id {table['id'][int(np.argmax(zero))]})")
    tol = 1e-2 if store.dtype == "float16" else 1e-3
    off = ~bad & ~zero & (np.abs(norms - 1) > tol)
    if store.meta.get("normalized") and off.any():
        found.append(f"{int(off.sum())} vectors not unit-norm although meta says normalized")
    return found


def quarantine_bad_files(store: EmbeddingStore) -> list[dict]:
    """Move every shard (and errors.parquet) that fails `bad_files` into STORE/quarantine/.

    Holds the store lock, so no job writes meanwhile. Each move is one rename (atomic); each
    is recorded in STORE/quarantine.json. The moved shards' ids are then absent from the
    store, so the next run of the job that made it embeds exactly those rows again (and
    failed rows are retried anyway when errors.parquet is moved). Returns the new records.
    """
    store.meta  # refuse a folder that is not a store
    lock_fd = _acquire_lock(store.path)
    try:
        bad = bad_files(store)
        if not bad:
            return []
        folder = store.path / QUARANTINE
        folder.mkdir(exist_ok=True)
        log_path = store.path / QUARANTINE_LOG
        try:
            log = json.loads(log_path.read_text(encoding="utf-8")).get("quarantined", [])
        except (OSError, ValueError, AttributeError):
            log = []
        moved = []
        for name, problems in bad.items():
            source = store.path / name
            dest = folder / name
            n = 1
            while dest.exists():  # the same shard number may go bad twice
                dest, n = folder / f"{source.stem}.{n}{source.suffix}", n + 1
            try:
                rows = pq.read_metadata(source).num_rows
            except (OSError, pa.ArrowException):
                rows = None  # unreadable footer
            os.rename(source, dest)
            moved.append({"file": name, "moved_to": str(dest.relative_to(store.path)), "rows": rows,
                          "problems": problems,
                          "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        fsync_dir(folder)
        fsync_dir(store.path)
        write_json_atomic(log_path, {"quarantined": log + moved})
        return moved
    finally:
        os.close(lock_fd)
