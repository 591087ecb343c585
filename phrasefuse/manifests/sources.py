"""Where a MANIFEST argument's rows come from: a table, a folder of images, WebDataset tar shards,
or Parquet with the image bytes inside. Every source becomes the same manifest table (`id`,
`image`, text columns, `label`, `split`, `_file`, `_row`), validated by `dataset.read_manifest`;
only how a worker reads an image's bytes differs (`image_chunks`):

  a table / a folder   `image` is a file path; the worker reads the file. A folder skips hidden files
                       and folders and the folders NAS boxes and archivers add (@eaDir, __MACOSX...).
  tar shards           `image` is the shard, `_offset` / `_size` the member's bytes in it: the scan
                       reads headers and the small members (.txt, .json, .cls) only, seeking past
                       image data, so a corpus far larger than memory is fine; workers read each
                       image member with one seek. A shard is refused (one line naming it) when a
                       key is used by two samples or the shard was cut short (no end-of-archive
                       marker); a hard-linked image member reads the member it names, a symlink is
                       an error row. A glob whose files are all .tar is read as shards.
  Parquet bytes        the image column (binary, dictionary-encoded binary, or a struct {bytes,
                       path}) is left out of the manifest table; `image_chunks` streams it back in
                       row batches, only for the pending rows. Every file of a glob must hold bytes
                       in that column, or none (one line names the first that differs).

A `Source` carries the column mapping (`--id-col`, `--image-col`, `--label-col`) with the path;
`str(source)` and `os.fspath(source)` are the path, so it passes wherever a path does.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.errors import BadInput
from phrasefuse.folders import is_phrasefuse_folder
from phrasefuse.manifests.tables import FILE_COL, ROW_COL, expand, read_table

FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}
OFFSET_COL, SIZE_COL, BYTES_COL = "_offset", "_size", "_bytes"  # where a worker finds an image's bytes
LINK_SIZE = -1  # `_size` of a sample whose image member is a link not followed (`_offset` null)
# Folders that file systems, NAS boxes and archivers make inside a user's folders (thumbnails,
# recycle bins, resource forks): never images of the dataset, like hidden files and folders.
SYSTEM_FOLDERS = frozenset(n.lower() for n in ("@eaDir", "@Recycle", "@Recently-Snapshot", "#recycle", "#snapshot",
                                                "__MACOSX", "$RECYCLE.BIN", "System Volume Information", "lost+found"))
LABELS_NOTE = b"phrasefuse.labels_note"  # schema metadata of a folder's table: why it has no `label`
SMALL_MEMBER = 16 << 20  # .txt/.json/.cls members larger than this are refused (not metadata)
CHUNK_ROWS = 2048  # Parquet-bytes rows handed to the image job at a time...
# ...and at most about this many image bytes (plus one row): a chunk is held ~3 times over (the Arrow
# batch, its rows' Python bytes in the job, the worker's copy), so 2,048 rows of 2 MB peaked at ~4.8 GB.
CHUNK_BYTES = 128 << 20
# Parquet reads: ~32 MB of rows at a time (an Arrow read of N bytes of binary values peaks at ~3x N), each
# file's pages through a buffer and without pre-buffering (pre_buffer fetched whole row groups ahead).
READ_BYTES = 32 << 20
READ_BUFFER = 8 << 20


@dataclass(frozen=True)
class Source:
    """A MANIFEST argument and its column mapping (None: the default name)."""

    path: str
    id_col: str | None = None
    image_col: str | None = None
    label_col: str | None = None

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path


def as_source(manifest: str | os.PathLike | Source) -> Source:
    return manifest if isinstance(manifest, Source) else Source(str(manifest))


def source_with(manifest: str | os.PathLike | Source, id_col: str | None = None, image_col: str | None = None,
                label_col: str | None = None) -> str | Source:
    """`manifest` with a column mapping, or as it is when none is given."""
    if id_col is None and image_col is None and label_col is None:
        return manifest
    return Source(str(manifest), id_col, image_col, label_col)


BRACE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}")
MAX_BRACE_NAMES = 1_000_000  # a million shards is a 5-billion-image corpus; more is a typo ({0..99999999})


def brace_count(pattern: str) -> int:
    """How many names `expand_braces` would give, without making them (each group multiplies)."""
    count = 1
    for m in BRACE_RE.finditer(pattern):  # groups hold no braces, so they never nest
        count *= len(m.group(3).split(",")) if m.group(3) is not None else \
            max(0, int(m.group(2)) - int(m.group(1)) + 1)
    return count


def expand_braces(pattern: str) -> list[str]:
    """'shards/{00000..00099}.tar' and 'a/{x,y}.tar' -> the names (zero padding kept), in order.
    More than MAX_BRACE_NAMES names (counted first, nothing made) is refused with one line."""
    count = brace_count(pattern)
    if count > MAX_BRACE_NAMES:
        raise BadInput(f"{pattern}: the brace range names {count:,} files, over the limit of {MAX_BRACE_NAMES:,}; "
                       f"check the range (one digit too many?) or split the corpus")
    return list(_iter_braces(pattern))


def _iter_braces(pattern: str) -> Iterator[str]:
    m = BRACE_RE.search(pattern)
    if not m:
        yield pattern
        return
    if m.group(3) is not None:
        parts: Iterator[str] = iter(m.group(3).split(","))
    else:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") else 0
        parts = (str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    head, tail = pattern[:m.start()], pattern[m.end():]
    for part in parts:
        yield from _iter_braces(head + part + tail)


def is_tar_pattern(pattern: str) -> bool:
    """The pattern names tar shards: its first name ends in .tar, or it is a glob (not ending in .tar)
    whose every file is a .tar (`shards/shard-*`)."""
    first = next(_iter_braces(pattern), pattern)  # lazily: a huge range costs nothing here
    if first.lower().endswith(".tar"):
        return True
    if not glob.has_magic(first) or os.path.isdir(first):
        return False
    files = [p for p in glob.glob(first, recursive=True) if os.path.isfile(p)]
    tars = [p for p in files if p.lower().endswith(".tar")]
    if tars and len(tars) < len(files):
        other = next(p for p in sorted(files) if not p.lower().endswith(".tar"))
        raise BadInput(f"{pattern}: matches tar shards ({sorted(tars)[0]}) and other files ({other}); "
                       f"make the pattern end in .tar (e.g. shards/shard-*.tar) or name a table")
    return bool(tars)


def source_kind(source: Source) -> str:
    """'folder', 'tar' or 'table'."""
    if os.path.isdir(source.path):
        return "folder"
    if is_tar_pattern(source.path):
        return "tar"
    return "table"


def read_source(manifest: str | os.PathLike | Source) -> tuple[pa.Table, str | None]:
    """(the source's rows as a manifest table with `_file`/`_row`, the image-bytes column or None)."""
    source = as_source(manifest)
    kind = source_kind(source)
    if kind == "folder":
        if source.id_col or source.image_col:
            raise BadInput(f"{source}: a folder of images has no columns to map; drop --id-col/--image-col")
        return folder_table(source.path), None
    if kind == "tar":
        return map_columns(tar_table(source), source, rename=False), None
    image_col = source.image_col or "image"
    bytes_col = image_col if _holds_image_bytes(source.path, image_col) else None
    table = read_table(source.path, what="manifest", exclude=(bytes_col,) if bytes_col else ())
    table = map_columns(table, source, rename_image=bytes_col is None)
    if bytes_col:
        # the file's name: `read_manifest` resolves it against the file's folder, as any image path
        table = table.append_column("image", pc.replace_substring_regex(pc.cast(table[FILE_COL], pa.string()),
                                                                        pattern=r"^.*/", replacement=""))
    return table, bytes_col


def source_columns(manifest: str | os.PathLike | Source) -> list[str]:
    """The column names a source's manifest has (after the mapping), reading as little as it can:
    a table's schemas; a folder's layout; a tar's headers and small members."""
    from phrasefuse.manifests.tables import table_columns

    source = as_source(manifest)
    if source_kind(source) != "table":
        return [c for c in read_source(source)[0].column_names if not c.startswith("_")]
    names = table_columns(source.path, what="manifest")
    renames = {source.id_col: "id", source.image_col: "image"}
    names = [renames.get(n, n) for n in names]
    if source.label_col and source.label_col in names and "label" not in names:
        names.append("label")
    return names


def map_columns(table: pa.Table, source: Source, rename: bool = True, rename_image: bool = True) -> pa.Table:
    """--id-col / --image-col rename a column to `id` / `image`; --label-col copies one to `label`
    (or `labels`, for a list), keeping the original for `fuse --label-col`. (Tars: --image-col is the
    image member's extension; Parquet bytes: the bytes column, not in `table`.)"""
    renames = {source.id_col: "id", **({source.image_col: "image"} if rename_image else {})} if rename else {}
    for old, new in renames.items():
        if old is None or old == new:
            continue
        if old not in table.column_names:
            raise BadInput(f"{source}: no column '{old}' (columns: {_columns(table)}); "
                           f"pass an existing column to --{new}-col")
        if new in table.column_names:
            table = table.drop_columns([new])
        table = table.rename_columns([new if c == old else c for c in table.column_names])
    if source.label_col and source.label_col not in ("label", "labels"):
        if source.label_col not in table.column_names:
            raise BadInput(f"{source}: no column '{source.label_col}' (columns: {_columns(table)}); "
                           f"pass an existing column to --label-col")
        col = table[source.label_col]
        name = "labels" if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) else "label"
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, col)
    return table


def _columns(table: pa.Table) -> str:
    return ", ".join(c for c in table.column_names if not c.startswith("_")) or "none"


# ---------------------------------------------------------------- a folder of images

def walk_dataset(root: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk of an image folder, without the folders phrasefuse made inside it (a run's work folder,
    a store, index or head: never a dataset's images, even beside a run config kept with its images)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d.lower() not in SYSTEM_FOLDERS
                         and not is_phrasefuse_folder(os.path.join(folder, d)))  # not walked
        yield folder, dirs, files


def folder_table(folder: str) -> pa.Table:
    """Every image file under `folder` (recursively, sorted; hidden files, hidden folders,
    SYSTEM_FOLDERS and folders phrasefuse made (`folders.is_phrasefuse_folder`: a run's work folder inside it)
    skipped): id = its path relative to the folder. When every image sits one level down
    (ImageFolder: CLASS/x.jpg) that folder is the `label`; a level of split folders above (train/,
    val/, test/; validation, valid, dev read as val) gives `split`. When some images sit in class
    folders and one does not, there is no `label` and the table's LABELS_NOTE names that image
    (`Manifest.labels_note`: the message of a job that needs labels)."""
    root = os.path.abspath(folder)
    rel = sorted(os.path.relpath(os.path.join(d, f), root)
                 for d, _, files in walk_dataset(root) for f in files
                 if f.lower().endswith(FOLDER_IMAGE_EXTS) and not f.startswith("."))
    if not rel:
        raise BadInput(f"{folder}: no image files ({', '.join(FOLDER_IMAGE_EXTS)}) in this folder or below; "
                       f"check the path")
    parts = [r.split(os.sep) for r in rel]
    columns: dict[str, list] = {"id": [r.replace(os.sep, "/") for r in rel], "image": rel}
    if all(len(p) >= 2 and p[0].lower() in SPLIT_ALIASES for p in parts):
        columns["split"] = [SPLIT_ALIASES[p[0].lower()] for p in parts]
        parts = [p[1:] for p in parts]
    note = None
    if all(len(p) == 2 for p in parts):
        columns["label"] = [p[0] for p in parts]
    elif any(len(p) == 2 for p in parts):  # class folders, and a stray image elsewhere
        example = "/".join(next(p for p in parts if len(p) == 2))
        stray = next(r for r, p in zip(rel, parts) if len(p) != 2).replace(os.sep, "/")
        note = (f"no labels from the class folders: '{stray}' is not one level inside a class folder "
                f"(like '{example}'); move it into its class folder or remove it")
    table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})
    if note:
        table = table.replace_schema_metadata({LABELS_NOTE: note.encode()})
    n = table.num_rows
    table = table.append_column(FILE_COL, pa.nulls(n, pa.string()).fill_null(os.path.join(root, "")))
    return table.append_column(ROW_COL, pa.array(np.arange(1, n + 1), pa.int64()))


# ---------------------------------------------------------------- WebDataset tar shards


def tar_shards(pattern: str) -> list[Path]:
    """The shards a tar argument names: one tar, a glob, or a brace range (each must exist)."""
    shards: list[Path] = []
    for name in expand_braces(pattern):
        shards.extend(expand(name))
    return shards


def tar_table(source: Source) -> pa.Table:
    """One row per sample (`__key__`) of every shard: id, image (the shard), `_offset`/`_size` of its
    image member, `txt`, the .json's top-level text fields, `label` (.cls)."""
    tables = [scan_shard(shard, source.image_col, source.label_col) for shard in tar_shards(source.path)]
    return pa.concat_tables(tables, promote_options="permissive")


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def scan_shard(shard: Path, image_ext: str | None = None, label_field: str | None = None) -> pa.Table:
    """A shard's samples, reading headers and the small members only (image data is seeked past)."""
    image_exts = (image_ext.lower().lstrip("."),) if image_ext else TAR_IMAGE_EXTS
    samples: dict[str, dict] = {}
    images: dict[str, tuple[int, int]] = {}  # image members' (offset, size) by name: hard links point back
    current, exts = None, set()  # the sample being read and its members' extensions
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                tar.members.clear()  # headers are not kept: a shard's size does not matter
                if not (member.isfile() or member.islnk() or member.issym()):
                    continue
                key, ext = _split_name(member.name)
                if not ext or posixpath.basename(key).startswith("."):
                    continue
                # WebDataset reads a sample as consecutive members of one key: a key met again, or an
                # extension twice in one sample, is a second sample under the same key (never merged).
                if key != current and key in samples or key == current and ext in exts:
                    raise BadInput(f"{shard}: key '{key}' is used by two samples ({posixpath.basename(member.name)} "
                                   f"again at byte {member.offset}); give each sample its own key")
                if key != current:
                    current, exts = key, set()
                exts.add(ext)
                sample = samples.setdefault(key, {})
                if ext in image_exts and "_offset" not in sample:
                    if member.isfile():
                        sample["_offset"], sample["_size"] = member.offset_data, member.size
                        images[member.name] = (member.offset_data, member.size)
                    elif member.islnk() and member.linkname in images:  # a hard link: the data is earlier
                        sample["_offset"], sample["_size"] = images[member.linkname]
                    else:  # a symlink (or a hard link to nothing in this shard): an error row that says so
                        sample["_size"] = LINK_SIZE
                elif member.isfile() and (ext in ("txt", "json", "cls") or ext == label_field):
                    sample.update(_small_member(shard, key, ext, tar, member))
            _check_end_of_archive(shard, f, tar.offset)
    except (tarfile.TarError, EOFError) as e:
        raise BadInput(f"{shard}: not a readable tar ({e}); fix or remove this shard "
                       f"(compressed tars: decompress them first)") from None
    except OSError as e:
        raise BadInput(f"{shard}: cannot read ({e.strerror or e}); check the file") from None
    return _samples_table(shard, samples, label_field)


def _check_end_of_archive(shard: Path, f, offset: int) -> None:
    """tarfile stops quietly at a missing or unreadable header; a whole tar has a zero block there (its
    end-of-archive marker). Without it the shard was cut short (a copy or a writer stopped half-way)
    and the samples after the cut would be lost without a word."""
    f.seek(offset)
    block = f.read(512)
    if len(block) == 512 and not block.strip(b"\0"):
        return
    what = ("ends without the end-of-archive marker" if len(block) < 512 else "has an unreadable header")
    raise BadInput(f"{shard}: the tar {what} at byte {offset} (cut short?): samples after it would be lost; "
                   f"copy or write the shard again")


def _small_member(shard: Path, key: str, ext: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict:
    """The columns one .txt / .json / .cls member gives its sample."""
    if member.size > SMALL_MEMBER:
        raise BadInput(f"{shard}: sample '{key}': {posixpath.basename(member.name)} is {member.size} bytes; "
                       f"a .{ext} member is metadata (at most {SMALL_MEMBER >> 20} MB)")
    data = tar.extractfile(member).read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{shard}: sample '{key}': {posixpath.basename(member.name)} is not UTF-8 text; "
                       f"fix or remove the member") from None
    if ext == "txt":
        return {"txt": text}
    if ext == "cls":
        return {"_cls": text.strip()}
    if ext != "json":
        return {f"_label_{ext}": text.strip()}
    try:
        fields = json.loads(text)
    except ValueError as e:
        raise BadInput(f"{shard}: sample '{key}': {key}.json is not valid JSON ({e}); fix or remove the member") \
            from None
    if not isinstance(fields, dict):
        return {}
    return {name: value for name, value in fields.items()
            if name not in ("id", "image") and not name.startswith("_")
            and (isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)))}


def _samples_table(shard: Path, samples: dict[str, dict], label_field: str | None) -> pa.Table:
    n = len(samples)
    names = list(dict.fromkeys(k for s in samples.values() for k in s))
    columns = {"id": pa.array(list(samples), pa.string()),
               # every row names its shard, also a sample without an image (its error row says of which tar)
               "image": pa.nulls(n, pa.string()).fill_null(str(shard.resolve()))}
    for name in names:
        values = [s.get(name) for s in samples.values()]
        if name in (OFFSET_COL, SIZE_COL):
            columns[name] = pa.array(values, pa.int64())
        elif any(isinstance(v, list) for v in values):
            columns[name] = pa.array([v if isinstance(v, list) or v is None else [v] for v in values],
                                     pa.list_(pa.string()))
        else:
            columns[name] = pa.array(values, pa.string())
    label = columns.pop(f"_label_{label_field}", None) if label_field else None
    cls = columns.pop("_cls", None)
    if label is None and label_field and label_field in columns:
        label = columns[label_field]
    if label is not None or cls is not None:
        columns["label"] = label if label is not None else cls
    for name in (OFFSET_COL, SIZE_COL):
        columns.setdefault(name, pa.nulls(n, pa.int64()))
    table = pa.table(columns)
    table = table.append_column(FILE_COL, pa.nulls(n, pa.string()).fill_null(str(shard)))
    return table.append_column(ROW_COL, pa.array(np.arange(1, n + 1), pa.int64()))


# ---------------------------------------------------------------- Parquet with image bytes


def _holds_image_bytes(pattern: str, column: str) -> bool:
    """True when `column` of the (first) Parquet file holds bytes: binary, or a struct with `bytes`."""
    files = expand(pattern)
    if not any(p.suffix.lower() in (".parquet", ".pq") for p in files):
        return False
    import pyarrow.parquet as pq

    kinds = []  # per file: its column's type when it holds bytes, else why not (footers only)
    for path in files:
        try:
            schema = pq.read_schema(path) if path.suffix.lower() in (".parquet", ".pq") else None
        except (OSError, pa.ArrowException):
            return False  # read_table says what is wrong with the file
        if schema is None:
            kinds.append((path, False, f"is {path.suffix} (no image bytes)"))
        elif column not in schema.names:
            kinds.append((path, False, f"has no column '{column}'"))
        else:
            t = schema.field(column).type
            kinds.append((path, _bytes_type(t) is not None, f"has column '{column}' of type {t}"))
    holds = [k for k in kinds if k[1]]
    if holds and len(holds) < len(kinds):
        (first, _, has), (other, _, why) = holds[0], next(k for k in kinds if not k[1])
        raise BadInput(f"{other}: {why}, but {first} {has} (image bytes); the files of one manifest hold "
                       f"either image bytes or image paths: pass them as two manifests")
    return bool(holds)


def _bytes_type(t: pa.DataType) -> str | None:
    if pa.types.is_dictionary(t):  # a deduplicating writer, a pandas categorical: decoded when read
        t = t.value_type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and \
            (pa.types.is_binary(t.field("bytes").type) or pa.types.is_large_binary(t.field("bytes").type)):
        return "struct"
    return None


def image_chunks(todo: pa.Table, image_bytes: str | None, rows: int = CHUNK_ROWS,
                 max_bytes: int = CHUNK_BYTES) -> Iterator[pa.Table]:
    """The pending rows with what a worker needs to read each image: (id, image[, _offset, _size])
    in one piece for files and tar members, or (id, image, _bytes) streamed from the Parquet files
    for the pending rows only (a file's other rows and columns are never held), in chunks of at most
    `rows` rows whose bytes start within `max_bytes` (`byte_chunks`): memory follows the bytes, not
    the row count."""
    if image_bytes is None:
        yield todo.select([c for c in ("id", "image", OFFSET_COL, SIZE_COL) if c in todo.column_names])
        return
    for file in pc.unique(todo[FILE_COL]).to_pylist():
        yield from byte_chunks(_pending_bytes(todo, file, image_bytes, rows, max_bytes), rows, max_bytes)


def _pending_bytes(todo: pa.Table, file: str, image_bytes: str, rows: int, max_bytes: int) -> Iterator[pa.Table]:
    """(id, image, _bytes) of `todo`'s rows of one Parquet file, read a few rows at a time."""
    import pyarrow.parquet as pq

    mine = todo.filter(pc.equal(todo[FILE_COL], file))
    want, ids = mine[ROW_COL].to_numpy() - 1, mine["id"].combine_chunks()
    start = 0
    parquet = pq.ParquetFile(file, buffer_size=READ_BUFFER, pre_buffer=False)
    read_rows = _rows_within(parquet.metadata, image_bytes, rows, min(max_bytes, READ_BYTES))
    for batch in parquet.iter_batches(columns=[image_bytes], batch_size=read_rows, use_threads=False):
        n = batch.num_rows
        inside = np.flatnonzero((want >= start) & (want < start + n))
        if len(inside):
            at = want[inside] - start
            whole = len(at) == n and bool((at == np.arange(n)).all())  # every row, in order: no copy
            values = batch.column(0) if whole else batch.column(0).take(pa.array(at))
            if pa.types.is_dictionary(values.type):
                values = values.dictionary_decode()
            if pa.types.is_struct(values.type):
                values = pc.struct_field(values, "bytes")
            yield pa.table({"id": ids.take(pa.array(inside)),
                            "image": pa.nulls(len(inside), pa.string()).fill_null(f"{file}:{image_bytes}"),
                            BYTES_COL: pc.cast(values, pa.binary())})
        start += n


def _rows_within(metadata, column: str, rows: int, max_bytes: int) -> int:
    """Rows per Parquet read: `rows`, fewer when the row groups' mean uncompressed bytes per row of
    `column` (its leaves: a struct's bytes and path) say that many would pass `max_bytes`. A mean,
    so a read may pass it when row sizes vary; `byte_chunks` then splits what was read."""
    widest = 0.0
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        size = sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
                   if group.column(j).path_in_schema == column
                   or group.column(j).path_in_schema.startswith(column + "."))
        widest = max(widest, size / max(1, group.num_rows))
    return max(1, min(rows, int(max_bytes // widest) if widest else rows))


def byte_chunks(pieces: Iterable[pa.Table], rows: int, max_bytes: int) -> Iterator[pa.Table]:
    """Consecutive `pieces` (their `_bytes` column) regrouped into chunks of at most `rows` rows: a row
    joins the chunk while the chunk's bytes before it are under `max_bytes`, so a chunk holds at most
    `max_bytes` plus one row (a row is at most the image size limit: larger ones are error rows)."""
    held: list[pa.Table] = []
    held_rows = held_bytes = 0
    for piece in pieces:
        while piece.num_rows:
            sizes = pc.fill_null(pc.binary_length(piece[BYTES_COL]), 0).to_numpy().astype(np.int64)
            starts = held_bytes + np.cumsum(sizes) - sizes  # bytes of the chunk before each row
            fit = min(int(np.searchsorted(starts, max_bytes, side="left")), rows - held_rows)
            if fit == piece.num_rows:
                held.append(piece)
                held_rows, held_bytes = held_rows + fit, held_bytes + int(sizes.sum())
                break
            if fit:
                held.append(piece.slice(0, fit))
            yield pa.concat_tables(held)  # never empty: an empty chunk takes at least one row
            held, held_rows, held_bytes = [], 0, 0
            piece = piece.slice(fit)
    if held_rows:
        yield pa.concat_tables(held)
