"""Export a store to, and import a store from, the embedding ecosystem's `.npy` + Parquet layout.

The layout (clip-retrieval's output, what embedding readers and index builders read)::

    DIR/img_emb/img_emb_00000.npy           (n, dim) float16, one file per store shard
    DIR/metadata/metadata_00000.parquet     id, key (+ the store's extra columns), the same n rows in order
    DIR/meta.json                           phrasefuse only: the store's meta (readers ignore it)

Text stores use `text_emb/text_emb_{N}.npy`. File numbers are zero-padded so that the names
sort in row order (embedding readers sort names); import pairs the files by number, padded or not.

Export writes the folder whole or not at all (`folders.atomic_folder`). Import goes shard by
shard through `StoreWriter`: an interrupted import resumes (ids already in the store are
skipped), and a store imported under one encoder identity refuses vectors of another.
The identity of imported vectors comes from exactly one of (`import_npy` parameters):
  like     an existing store's identity (e.g. the store the vectors will be compared with);
  encoder  a phrasefuse encoder spec, loaded once to compute its weights checksum;
  manual   family / name / weights_sha256 given by hand (a model phrasefuse cannot load);
  DIR/meta.json, when DIR was written by `phrasefuse export`.
Every input file is checked before anything is written: 2-D float arrays, one dim, as many
metadata rows as array rows, an id column, unique ids, no NaN/inf or zero row.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from phrasefuse.errors import BadInput
from phrasefuse.folders import atomic_folder, write_atomic, write_json_atomic, write_parquet_atomic
from phrasefuse.store import EmbeddingStore, StoreWriter, embeddings_to_numpy, encoder_identity, new_meta

EXPORT_FORMAT = "phrasefuse-npy-export"
EXPORT_VERSION = 1
EMB_FOLDERS = {"image": "img_emb", "text": "text_emb"}  # modality -> folder (and file prefix)
METADATA = "metadata"
NUMBERED = re.compile(r"^(?P<prefix>.+)_(?P<n>\d+)\.(?P<ext>npy|parquet)$")
CHECK_ROWS = 65_536  # rows per chunk when scanning an array (memory stays bounded)


@dataclass
class InteropSummary:
    what: str  # "export" or "import"
    source: str
    out: str
    rows: int = 0  # rows written
    files: int = 0  # .npy files written or read
    present: int = 0  # import: ids already in the store, skipped
    dim: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        skipped = f", {self.present} already in store" if self.what == "import" else ""
        return (f"{self.what}: {self.rows} rows of dim {self.dim} in {self.files} .npy files{skipped}; "
                f"{self.seconds:.1f} s: {self.source} -> {self.out}")

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- export


def export_npy(store_path: str | os.PathLike, out: str | os.PathLike) -> InteropSummary:
    """Write store `store_path` as DIR/{img,text}_emb/*.npy (float16) + DIR/metadata/*.parquet."""
    start = time.perf_counter()
    store = EmbeddingStore(store_path)
    meta = store.meta
    prefix = EMB_FOLDERS.get(meta.get("modality"))
    if prefix is None:
        raise BadInput(f"{store.meta_path}: modality {meta.get('modality')!r} has no .npy layout "
                       f"(expected image or text)")
    summary = InteropSummary("export", str(store_path), str(out), dim=store.dim)
    with atomic_folder(out, EXPORT_FORMAT, "npy export") as tmp:
        (tmp / prefix).mkdir()
        (tmp / METADATA).mkdir()
        for number, table in enumerate(store.iter_tables()):  # one shard in memory at a time
            emb = embeddings_to_numpy(table["emb"]).astype(np.float16, copy=False)
            write_atomic(tmp / prefix / f"{prefix}_{number:05d}.npy",
                         lambda path, emb=emb: _save_npy(path, emb))
            write_parquet_atomic(tmp / METADATA / f"{METADATA}_{number:05d}.parquet", table.drop_columns(["emb"]))
            summary.rows += table.num_rows
            summary.files += 1
        write_json_atomic(tmp / "meta.json", {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION,
                                              "rows": summary.rows, "store": meta})
    summary.seconds = time.perf_counter() - start
    return summary


def _save_npy(path: str, emb: np.ndarray) -> None:
    # Serialized in memory (one shard), then written by Python: np.save into a file uses tofile(), whose
    # short write on a full disk is an OSError without errno ("N requested and M written"); Python's
    # write says ENOSPC. (A file object also keeps np.save from appending ".npy" to a temporary name.)
    buffer = io.BytesIO()
    np.save(buffer, emb, allow_pickle=False)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


# ---------------------------------------------------------------- import


@dataclass
class _Pair:
    number: int
    npy: Path
    metadata: Path
    rows: int


def import_npy(folder: str | os.PathLike, out: str | os.PathLike, *, modality: str | None = None,
               like: str | os.PathLike | None = None, encoder: str | None = None,
               encoder_family: str | None = None, encoder_name: str | None = None,
               weights_sha256: str | None = None, id_col: str = "id", dtype: str | None = None,
               shard_size: int = 10_000) -> InteropSummary:
    """Turn DIR/{img,text}_emb/*.npy + DIR/metadata/*.parquet into the store `out` (see the module doc)."""
    start = time.perf_counter()
    folder = Path(folder)
    if shard_size < 1:
        raise BadInput(f"--shard-size {shard_size}: must be at least 1")
    modality = _modality(folder, modality)
    pairs = _pairs(folder, EMB_FOLDERS[modality])
    dim, npy_dtype = _check_arrays(pairs)
    ids = _check_metadata(pairs, id_col)
    identity, source_column = _identity(folder, modality, dim, like=like, encoder=encoder, family=encoder_family,
                                        name=encoder_name, weights_sha256=weights_sha256)
    dtype = dtype or ("float16" if npy_dtype == np.float16 else "float32")
    meta = new_meta(modality=modality, encoder=identity, dtype=dtype,
                    source={"imported_from": str(folder), "column": source_column})
    summary = InteropSummary("import", str(folder), str(out), dim=dim, files=len(pairs))
    with StoreWriter.open(out, meta, shard_size) as writer:
        done = writer.store.ids_and_keys()["id"]
        summary.present = int(pc.sum(pc.is_in(ids, value_set=done)).as_py() or 0)
        for pair in pairs:
            metadata = pq.read_table(pair.metadata)
            keys = _keys(metadata, id_col)
            emb = np.load(pair.npy, mmap_mode="r", allow_pickle=False)
            for offset in range(0, pair.rows, shard_size):  # a slice of the mapped file at a time
                chunk_ids = metadata[id_col].slice(offset, shard_size).cast(pa.string())
                todo = pc.invert(pc.is_in(chunk_ids, value_set=done)).to_numpy(zero_copy_only=False)
                if not todo.any():
                    continue
                vectors = unit_rows(np.asarray(emb[offset:offset + shard_size])[todo], pair.npy, offset)
                writer.add(chunk_ids.filter(pa.array(todo)), keys.slice(offset, shard_size).filter(pa.array(todo)),
                           vectors)
                summary.rows += len(vectors)
            del emb  # closes the mapping
        writer.flush()
    summary.seconds = time.perf_counter() - start
    return summary


def unit_rows(x: np.ndarray, source: Path, first_row: int = 0) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32. In float64 and after dividing by each row's largest
    magnitude: finite float32 vectors whose squared norm overflows (x1e20) or underflows (x1e-25)
    in float32 keep their direction instead of becoming zero. Checked after normalising."""
    x64 = np.asarray(x, dtype=np.float64)
    scale = np.abs(x64).max(axis=1, keepdims=True, initial=0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x64 = x64 / scale
        x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
    out = x64.astype(np.float32)
    bad = ~np.isfinite(out).all(axis=1) | (np.abs(np.linalg.norm(out, axis=1) - 1) > 1e-3)
    if bad.any():
        raise BadInput(f"{source}: row {first_row + int(np.argmax(bad))} cannot be normalised to unit length "
                       f"(zero, NaN or infinite); fix or drop that row")
    return out


def _modality(folder: Path, modality: str | None) -> str:
    if not folder.is_dir():
        raise BadInput(f"{folder}: not a folder; pass a folder with img_emb/ (or text_emb/) and metadata/")
    found = [m for m, sub in EMB_FOLDERS.items() if (folder / sub).is_dir()]
    if modality is not None:
        if modality not in EMB_FOLDERS:
            raise BadInput(f"--modality {modality}: expected image or text")
        if modality not in found:
            raise BadInput(f"{folder}: no {EMB_FOLDERS[modality]}/ folder for --modality {modality}")
        return modality
    if not found:
        raise BadInput(f"{folder}: no img_emb/ or text_emb/ folder; pass the folder a batch inference or "
                       f"'phrasefuse export' wrote")
    if len(found) > 1:
        raise BadInput(f"{folder}: holds both img_emb/ and text_emb/; choose one with --modality image|text")
    return found[0]


def _numbered(folder: Path, prefix: str, ext: str) -> dict[int, Path]:
    files: dict[int, Path] = {}
    for path in sorted(folder.glob(f"*.{ext}")) if folder.is_dir() else []:
        m = NUMBERED.match(path.name)
        if not m or m["prefix"] != prefix:
            raise BadInput(f"{path}: unexpected file name; expected {prefix}_N.{ext}")
        n = int(m["n"])
        if n in files:
            raise BadInput(f"{path}: number {n} is also {files[n].name}; keep one")
        files[n] = path
    return files


def _pairs(folder: Path, prefix: str) -> list[_Pair]:
    """The (npy, metadata) files by number; each npy needs its metadata file and vice versa."""
    arrays = _numbered(folder / prefix, prefix, "npy")
    metadata = _numbered(folder / METADATA, METADATA, "parquet")
    if not arrays:
        raise BadInput(f"{folder / prefix}: no {prefix}_N.npy files")
    for n, path in arrays.items():
        if n not in metadata:
            raise BadInput(f"{path}: no matching {folder / METADATA / f'{METADATA}_{n}.parquet'}; "
                           f"every array needs the metadata (ids) of its rows")
    for n, path in metadata.items():
        if n not in arrays:
            raise BadInput(f"{path}: no matching {prefix}_{n}.npy; remove it or add its array")
    return [_Pair(n, arrays[n], metadata[n], 0) for n in sorted(arrays)]


def _check_arrays(pairs: list[_Pair]) -> tuple[int, np.dtype]:
    """(dim, dtype) of the arrays, after checking each: 2-D floats, one dim, no NaN/inf or zero row."""
    dim = dtype = None
    for pair in pairs:
        try:
            emb = np.load(pair.npy, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise BadInput(f"{pair.npy}: not a readable .npy array ({str(e).splitlines()[0][:160]})") from None
        if emb.ndim != 2:
            raise BadInput(f"{pair.npy}: array of shape {emb.shape}; expected 2-D (rows, dim)")
        if emb.dtype not in (np.float16, np.float32, np.float64):
            raise BadInput(f"{pair.npy}: dtype {emb.dtype}; expected float16, float32 or float64")
        if dim is None:
            dim, dtype = emb.shape[1], emb.dtype
        elif emb.shape[1] != dim:
            raise BadInput(f"{pair.npy}: dim {emb.shape[1]}, but {pairs[0].npy.name} has dim {dim}; "
                           f"one folder holds one encoder's vectors")
        for offset in range(0, len(emb), CHECK_ROWS):
            chunk = np.asarray(emb[offset:offset + CHECK_ROWS])  # its own dtype: float64 may exceed float32
            bad = ~np.isfinite(chunk).all(axis=1)
            if bad.any():
                raise BadInput(f"{pair.npy}: row {offset + int(np.argmax(bad))} has NaN/inf values "
                               f"({int(bad.sum())} such rows in this chunk); fix or drop those rows")
            zero = np.abs(chunk).max(axis=1, initial=0) == 0
            if zero.any():
                raise BadInput(f"{pair.npy}: row {offset + int(np.argmax(zero))} is a zero vector "
                               f"(no direction to compare); fix or drop those rows")
        pair.rows = len(emb)
        del emb
    return int(dim), dtype


def _check_metadata(pairs: list[_Pair], id_col: str) -> pa.ChunkedArray:
    """All ids (in file order), after checking row counts, the id column and uniqueness."""
    ids = []
    for pair in pairs:
        try:
            schema = pq.read_schema(pair.metadata)
            rows = pq.read_metadata(pair.metadata).num_rows
        except (OSError, pa.ArrowException) as e:
            raise BadInput(f"{pair.metadata}: not a readable Parquet file ({str(e).splitlines()[0][:160]})") from None
        if id_col not in schema.names:
            raise BadInput(f"{pair.metadata}: no '{id_col}' column (has: {', '.join(schema.names)}); "
                           f"name the id column with --id-col")
        if rows != pair.rows:
            raise BadInput(f"{pair.metadata}: {rows} rows, but {pair.npy.name} has {pair.rows}; "
                           f"the metadata must list the array's rows in the same order")
        column = pq.read_table(pair.metadata, columns=[id_col])[id_col]
        try:
            column = column.cast(pa.string())
        except pa.ArrowException:
            raise BadInput(f"{pair.metadata}: column '{id_col}' of type {column.type} is not usable as ids") from None
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column.fill_null(""))), 0)
        if pc.any(empty).as_py():  # as manifests: an empty (or all-space) id names nothing
            row = int(np.argmax(empty.to_numpy(zero_copy_only=False)))
            raise BadInput(f"{pair.metadata}: row {row} has no '{id_col}' (missing or empty); every row needs an id")
        ids.append(column)
    all_ids = pa.chunked_array([c for column in ids for c in column.chunks], pa.string())
    counts = pc.value_counts(all_ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        raise BadInput(f"{pairs[0].metadata.parent}: id {dup[0]['values']} appears {dup[0]['counts']} times "
                       f"({len(dup)} duplicated ids); ids must be unique")
    return all_ids


def _keys(metadata: pa.Table, id_col: str) -> pa.Array:
    """Content keys: the metadata's `key` column when it has one (a phrasefuse export), else the ids."""
    column = metadata["key"] if "key" in metadata.column_names and id_col != "key" else metadata[id_col]
    column = column.cast(pa.string())
    return pc.coalesce(column, metadata[id_col].cast(pa.string())).combine_chunks()


def _identity(folder: Path, modality: str, dim: int, *, like, encoder, family, name,
              weights_sha256) -> tuple[dict, str]:
    """(encoder identity, source column) from exactly one of --like, --encoder, the manual flags, DIR/meta.json."""
    manual = any(v is not None for v in (family, name, weights_sha256))
    given = [flag for flag, on in (("--like", like is not None), ("--encoder", encoder is not None),
                                   ("--encoder-name", manual)) if on]
    if len(given) > 1:
        raise BadInput(f"{' and '.join(given)}: give the encoder identity one way only")
    default_column = "image" if modality == "image" else "text"
    if like is not None:
        store = EmbeddingStore(like)
        identity, column = dict(store.meta["encoder"]), store.meta.get("source", {}).get("column", default_column)
        if store.meta.get("modality") != modality:
            raise BadInput(f"--like {like}: a {store.meta.get('modality')} store, but {folder} holds {modality} "
                           f"embeddings; pass a {modality} store")
        what = f"--like {like}"
    elif encoder is not None:
        identity, column, what = _spec_identity(encoder, modality), default_column, f"--encoder {encoder}"
    elif manual:
        if not name or not weights_sha256:
            raise BadInput("--encoder-name and --weights-sha256 are both needed to name the encoder by hand "
                           "(the checksum, or any tag that tells these weights apart from others)")
        identity = {"spec": f"{family or 'external'}:{name}", "family": family or "external", "name": name,
                    "weights_sha256": weights_sha256, "dim": dim}
        column, what = default_column, "--encoder-name"
    else:
        exported = _exported_meta(folder)
        if exported is None:
            raise BadInput(f"{folder}: which encoder made these vectors? pass --like STORE, --encoder SPEC, or "
                           f"--encoder-name NAME --weights-sha256 SHA")
        identity = dict(exported["encoder"])
        column, what = exported.get("source", {}).get("column", default_column), f"{folder / 'meta.json'}"
    if int(identity.get("dim") or 0) != dim:
        raise BadInput(f"{what}: encoder of dim {identity.get('dim')}, but the arrays in {folder} have dim {dim}; "
                       f"name the encoder that made them")
    return {"spec": identity.get("spec"), **encoder_identity(identity)}, column


def _spec_identity(spec: str, modality: str) -> dict:
    from phrasefuse.extract.encoders import load_encoder

    return load_encoder(spec, modality, "cpu").identity


def _exported_meta(folder: Path) -> dict | None:
    """The store meta that `phrasefuse export` left in DIR/meta.json, if any."""
    path = folder / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: unreadable ({e}); remove it and name the encoder with --like or --encoder") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or not isinstance(meta.get("store"), dict) \
            or not isinstance(meta["store"].get("encoder"), dict):
        raise BadInput(f"{path}: not a phrasefuse export meta; remove it and name the encoder with --like or --encoder")
    return meta["store"]
