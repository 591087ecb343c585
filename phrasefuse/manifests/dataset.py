"""The dataset manifest: read, validate, resolve image paths, assign splits.

Columns (docs/formats.md, Manifest): `id` (unique string, required), `image` (path,
relative to the manifest file's folder unless absolute), text columns, `label`
(string) or `labels` (list of strings; in CSV/TSV one string separated by `|`),
`split` (train/val/test; missing or null: assigned by a hash of `id`, stratified by label).

Validation refuses the whole manifest before any work, naming file, row and
column. A manifest whose images will be opened (`require_image`) must keep them
inside its own folder (a folder source: that folder itself): a path that resolves elsewhere (`../`, an absolute path
elsewhere, a symlink pointing out) is refused unless `allow_outside_paths` (the
CLI's `--allow-outside-paths`), so a manifest from elsewhere cannot make a job read
arbitrary files. Absolute paths are judged like relative ones: fine when they
resolve inside the manifest's folder. Per-row problems that only show when the row is used (a missing image
file, an empty text) are not manifest errors: the jobs record them in the
store's errors.parquet and go on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.errors import BadInput
from phrasefuse.manifests.sources import LABELS_NOTE, SPLIT_ALIASES, Source, read_source
from phrasefuse.manifests.tables import FILE_COL, ROW_COL, sql, where

SPLITS = ("train", "val", "test")
# Hash split: bucket = first 32 bits of md5(id) mod 100; < 80 train, < 90 val, else test.
SPLIT_PERCENT = {"train": 80, "val": 10, "test": 10}
LABELS_SEPARATOR = "|"


@dataclass
class Manifest:
    """A validated manifest. `table` has one row per item, `id` as string,
    `image` resolved to an absolute path (when present), `split` filled in."""

    source: str
    table: pa.Table
    image_bytes: str | None = None  # the files' column holding image bytes (Parquet), not in `table`
    labels_note: str | None = None  # a folder without `label`: why (a stray image outside the class folders)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> pa.Array:
        return self.table["id"].combine_chunks()

    def column(self, name: str) -> pa.ChunkedArray:
        if name not in self.table.column_names:
            cols = ", ".join(c for c in self.table.column_names if not c.startswith("_"))
            raise BadInput(f"{self.source}: no column '{name}' (columns: {cols}); pass an existing column")
        return self.table[name]

    def where(self, index: int) -> str:
        return where(self.table, index)

    def head(self, limit: int | None) -> "Manifest":
        return self if limit is None else replace(self, table=self.table.slice(0, max(0, limit)))


def read_manifest(pattern: str | os.PathLike | Source, *, require_image: bool = False,
                  allow_outside_paths: bool = False) -> Manifest:
    """Read and validate a dataset manifest (a table, a folder of images, WebDataset tars, Parquet
    with image bytes: `sources.read_source`); raises BadInput naming file, row and column.

    With `require_image` (the images will be read), image paths must resolve inside the folder
    of their manifest file unless `allow_outside_paths`."""
    table, image_bytes = read_source(pattern)
    source = str(pattern)
    note = (table.schema.metadata or {}).get(LABELS_NOTE)
    if table.num_rows == 0:
        raise BadInput(f"{source}: the manifest has no rows; add rows with at least an 'id' column")
    table = _validate_ids(source, table)
    if "image" in table.column_names:
        table = _resolve_images(source, table, confine=require_image and not allow_outside_paths)
    elif require_image:
        raise BadInput(f"{source}: no 'image' column (columns: {_user_columns(table)}); add a column of image paths")
    for name in ("label", "labels"):
        if name in table.column_names:
            table = _validate_labels(source, table, name)
    table = _assign_splits(source, table)
    return Manifest(source, table, image_bytes, note.decode() if note else None)


def hash_split(ids: pa.Array) -> pa.Array:
    """Deterministic train/val/test by md5(id), computed in DuckDB (stable across versions)."""
    return sql(
        f"""SELECT CASE WHEN b < {SPLIT_PERCENT['train']} THEN 'train'
                        WHEN b < {SPLIT_PERCENT['train'] + SPLIT_PERCENT['val']} THEN 'val'
                        ELSE 'test' END AS split
            FROM (SELECT ('0x' || left(md5(value), 8))::UBIGINT % 100 AS b FROM ids)""",
        ids=ids)["split"].combine_chunks()


def stratified_hash_split(ids: pa.Array, groups: pa.Array) -> pa.Array:
    """hash_split, stratified by label (`groups`: one label per row, null for none): a label with at
    least 3 rows gives round(10%) of them, and at least one, to val and to test (those whose md5
    buckets are highest, so most rows keep their hash_split split); smaller labels and unlabelled
    rows keep hash_split. A bare hash left one of 8 classes without test rows in a trial."""
    train, val = SPLIT_PERCENT["train"], SPLIT_PERCENT["train"] + SPLIT_PERCENT["val"]
    return sql(
        f"""SELECT CASE WHEN g IS NULL OR n < 3 THEN (CASE WHEN b < {train} THEN 'train' WHEN b < {val} THEN 'val'
                                                       ELSE 'test' END)
                        WHEN r < greatest(1, round(n * {SPLIT_PERCENT['test']} / 100.0)) THEN 'test'
                        WHEN r < greatest(1, round(n * {SPLIT_PERCENT['test']} / 100.0))
                               + greatest(1, round(n * {SPLIT_PERCENT['val']} / 100.0)) THEN 'val'
                        ELSE 'train' END AS split
            FROM (SELECT i, g, b, count(*) OVER (PARTITION BY g) AS n,
                         row_number() OVER (PARTITION BY g ORDER BY b DESC, h DESC, id) - 1 AS r
                  FROM (SELECT i, g, id, h, h % 100 AS b
                        FROM (SELECT i, g, id, ('0x' || left(md5(id), 8))::UBIGINT AS h FROM rows)))
            ORDER BY i""",
        rows=pa.table({"i": np.arange(len(ids)), "id": ids, "g": groups}))["split"].combine_chunks()


def _label_groups(table: pa.Table) -> pa.Array | None:
    """Each row's label for a stratified split ('label', else the first of 'labels'); None without labels."""
    if "label" in table.column_names:
        return table["label"].combine_chunks()
    if "labels" in table.column_names:
        return sql("SELECT l[1] AS g FROM t ORDER BY i", t=pa.table({
            "i": np.arange(table.num_rows), "l": table["labels"].combine_chunks()}))["g"].combine_chunks()
    return None


# ---------------------------------------------------------------- checks


def _user_columns(table: pa.Table) -> str:
    return ", ".join(c for c in table.column_names if not c.startswith("_")) or "none"


def _validate_ids(source: str, table: pa.Table) -> pa.Table:
    if "id" not in table.column_names:
        raise BadInput(f"{source}: no 'id' column (columns: {_user_columns(table)}); add a unique string id per row")
    ids = table["id"]
    if pa.types.is_integer(ids.type):
        ids = pc.cast(ids, pa.string())
    elif not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise BadInput(f"{source}: column 'id' has type {ids.type}; ids must be strings (or integers)")
    ids = pc.cast(ids, pa.string())
    bad = pc.or_(pc.is_null(ids), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(ids.fill_null(""))), 0))
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise BadInput(f"{where(table, i)}: column 'id' is empty; give every row a unique id")
    table = table.set_column(table.column_names.index("id"), "id", ids)
    dup = sql(
        f"""SELECT id, list({ROW_COL} ORDER BY {FILE_COL}, {ROW_COL}) AS rows,
                   list({FILE_COL} ORDER BY {FILE_COL}, {ROW_COL}) AS files
            FROM manifest GROUP BY id HAVING count(*) > 1 LIMIT 1""",
        manifest=table.select(["id", FILE_COL, ROW_COL])).to_pylist()
    if dup:
        ident, rows, files = dup[0]["id"], dup[0]["rows"], dup[0]["files"]
        raise BadInput(f"{files[1]}: row {rows[1]}: id '{ident}' is duplicated (first at {files[0]} row {rows[0]}); "
                       f"ids must be unique")
    return table


def _resolve_images(source: str, table: pa.Table, confine: bool = False) -> pa.Table:
    image = table["image"]
    if pa.types.is_null(image.type):
        image = pc.cast(image, pa.string())
    if not (pa.types.is_string(image.type) or pa.types.is_large_string(image.type)):
        raise BadInput(f"{source}: column 'image' has type {image.type}; expected paths as strings")
    image = pc.cast(image, pa.string())
    # Relative paths are relative to the folder of the manifest file the row came from.
    files = pc.unique(table[FILE_COL])
    folders = pa.array([os.path.join(os.path.abspath(os.path.dirname(f)), "") for f in files.to_pylist()])
    folder = pc.take(folders, pc.index_in(table[FILE_COL], value_set=files))
    resolved = pc.if_else(pc.starts_with(image, "/"), image, pc.binary_join_element_wise(folder, image, ""))
    if confine:
        _refuse_outside_paths(table, image.combine_chunks(), resolved.combine_chunks())
    return table.set_column(table.column_names.index("image"), "image", resolved)


def _refuse_outside_paths(table: pa.Table, image: pa.Array, resolved: pa.Array) -> None:
    """BadInput naming the first row whose image resolves (.., symlinks) outside its manifest's folder."""
    # Folders are few: resolve each distinct (manifest file, image folder) once, then map back.
    folder = pc.replace_substring_regex(resolved, pattern=r"/[^/]*$", replacement="/").fill_null("/")
    key = pc.binary_join_element_wise(table[FILE_COL].combine_chunks(), folder, "\0")
    distinct = pc.unique(key)
    roots = {}
    inside = []
    for k in distinct.to_pylist():
        file, image_folder = k.split("\0", 1)
        # dirname first: a folder source's `_file` is "FOLDER/", whose folder is FOLDER itself (abspath
        # first would strip the slash and confine to FOLDER's parent)
        root = roots.setdefault(file, os.path.realpath(os.path.abspath(os.path.dirname(file))))
        try:
            inside.append(_inside(os.path.realpath(image_folder), root))
        except ValueError:  # a NUL byte: no file can be opened there; reading it makes an error row
            inside.append(True)
    ok = np.asarray(inside, dtype=bool)[pc.index_in(key, value_set=distinct).to_numpy()]
    # A file that is itself a symlink may point anywhere: one lstat per row (the job opens it anyway).
    present = pc.is_valid(resolved).to_numpy(zero_copy_only=False)
    paths, files = resolved.to_pylist(), table[FILE_COL].to_pylist()
    for i in np.flatnonzero(ok & present):
        if os.path.islink(paths[i]):
            ok[i] = _inside(os.path.realpath(paths[i]), roots[files[i]])
    bad = ~ok & present  # rows without a path are row errors when the image is read
    if bad.any():
        i = int(np.argmax(bad))
        raise BadInput(f"{where(table, i)}: image '{image[i].as_py()}' resolves outside the manifest's folder "
                       f"{roots[files[i]]}; move it inside, or pass --allow-outside-paths if you trust this manifest")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _validate_labels(source: str, table: pa.Table, name: str) -> pa.Table:
    col = table[name]
    if name == "label":
        if pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
            col = pc.cast(col, pa.string())
        elif pa.types.is_null(col.type):
            col = pc.cast(col, pa.string())
        elif not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise BadInput(f"{source}: column 'label' has type {col.type}; expected one string per row "
                           f"(use 'labels' for a list)")
        col = pc.cast(col, pa.string())
    else:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            # CSV/TSV: "cat|dog"; empty string means no labels.
            col = sql(f"SELECT list_filter(string_split(trim(value), '{LABELS_SEPARATOR}'), lambda x: trim(x) <> '') "
                      f"AS l FROM labels", labels=col)["l"]
        elif pa.types.is_null(col.type):
            col = pc.cast(col, pa.list_(pa.string()))
        elif not ((pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) and
                  (pa.types.is_string(col.type.value_type) or pa.types.is_null(col.type.value_type))):
            raise BadInput(f"{source}: column 'labels' has type {col.type}; expected a list of strings "
                           f"(in CSV: one string separated by '{LABELS_SEPARATOR}')")
        col = pc.cast(col, pa.list_(pa.string()))
    return table.set_column(table.column_names.index(name), name, col)


def _assign_splits(source: str, table: pa.Table) -> pa.Table:
    groups = _label_groups(table)
    ids = table["id"].combine_chunks()
    by_hash = hash_split(ids) if groups is None else stratified_hash_split(ids, groups)
    if "split" not in table.column_names:
        return table.append_column("split", by_hash)
    split = table["split"]
    if pa.types.is_null(split.type):
        split = pc.cast(split, pa.string())
    if not (pa.types.is_string(split.type) or pa.types.is_large_string(split.type)):
        raise BadInput(f"{source}: column 'split' has type {split.type}; expected one of {', '.join(SPLITS)}")
    split = pc.cast(split, pa.string()).combine_chunks()
    aliases = pa.array(list(SPLIT_ALIASES))  # validation, valid, dev... read as val
    where_alias = pc.index_in(pc.utf8_lower(split), value_set=aliases)
    split = pc.if_else(pc.is_valid(where_alias), pa.array(list(SPLIT_ALIASES.values())).take(where_alias), split)
    bad = pc.and_(pc.is_valid(split), pc.invert(pc.is_in(split, value_set=pa.array(SPLITS))))
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise BadInput(f"{where(table, i)}: column 'split' is '{split[i].as_py()}'; expected one of "
                       f"{', '.join(SPLITS)} (or leave it empty for a hash split)")
    return table.set_column(table.column_names.index("split"), "split", pc.coalesce(split, by_hash))
