"""Read any user table (Parquet, CSV, JSON Lines, or a glob of them) through DuckDB.

Every row keeps where it came from (`_file`, `_row`: 1-based data row within its
file) so that validation errors can name the file and the row.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from phrasefuse.errors import BadInput

# CSV is read as text so that ids like "007" stay strings; JSON and Parquet keep their types.
READERS = {
    ".parquet": "read_parquet($path)",
    ".pq": "read_parquet($path)",
    ".csv": "read_csv($path, header=true, all_varchar=true)",
    ".tsv": "read_csv($path, header=true, all_varchar=true, delim='\t')",
    ".jsonl": "read_json($path, format='newline_delimited')",
    ".ndjson": "read_json($path, format='newline_delimited')",
    ".json": "read_json($path, format='auto')",
}
FILE_COL, ROW_COL = "_file", "_row"
BATCH_ROWS = 250_000  # rows per batch when a table is streamed (iter_batches)


def expand(pattern: str | os.PathLike) -> list[Path]:
    """The files a table argument names: one path, or a glob (sorted)."""
    pattern = str(pattern)
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise BadInput(f"{pattern}: no file matches this pattern; check the path")
        return files
    path = Path(pattern)
    if not path.is_file():
        raise BadInput(f"{path}: no such file; check the path")
    return [path]


def _connect():
    """A DuckDB connection that never prints: its progress bar (shown when a query runs over 2 s, e.g.
    on a loaded machine) would go to stdout, which `--json` keeps for the one JSON document."""
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    return con


def read_table(pattern: str | os.PathLike, what: str = "table", exclude: tuple[str, ...] = ()) -> pa.Table:
    """All files of `pattern` as one Arrow table, with `_file` and `_row` columns, without the
    columns `exclude` names (never read: Parquet image bytes stay on disk).

    Files may differ in columns (missing ones become null); a column whose types
    cannot be unified across files is an error naming both files.
    """
    tables = []
    for path in expand(pattern):
        reader = _reader(path, what)
        con = _connect()
        try:
            table = _select(con, reader, path, exclude).to_arrow_table()
        except duckdb.Error as e:
            raise _cannot_read(path, what, e) from None
        finally:
            con.close()
        _refuse_reserved(path, table.column_names)
        n = table.num_rows
        table = table.append_column(FILE_COL, pa.nulls(n, pa.string()).fill_null(str(path)))
        table = table.append_column(ROW_COL, pa.array(range(1, n + 1), pa.int64()))
        tables.append(table)
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as e:
        names = ", ".join(str(t[FILE_COL][0]) for t in tables if t.num_rows)
        raise BadInput(f"{pattern}: files disagree on column types ({e}); files: {names}") from None


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _select(con, reader: str, path: Path, exclude: tuple[str, ...] = ()):
    """All rows of one file, without the columns `exclude` names (never read). A JSON column whose
    values mix types (`"label": 1` in one row and `"label": "1"` in another) comes from DuckDB as raw
    JSON text; its scalar values are read as their text instead (1, "1" -> "1"; true -> "true"; list
    items likewise), and a column that mixes lists or objects with other values is refused, naming
    it and the first such row."""
    params = {"path": str(path)}
    base = f"SELECT * FROM {reader}"
    dropped = [c for c in exclude if c in con.sql(base, params=params).columns]
    if dropped:
        base = f"SELECT * EXCLUDE ({', '.join(map(_quoted, dropped))}) FROM {reader}"
    rel = con.sql(base, params=params)
    mixed = {name: str(t) for name, t in zip(rel.columns, rel.types) if str(t) in ("JSON", "JSON[]")}
    if not mixed:
        return rel
    nested = "json_type(x) IN ('ARRAY', 'OBJECT')"
    for name, kind in mixed.items():
        col = _quoted(name)
        test = (f"json_type({col}) IN ('ARRAY', 'OBJECT')" if kind == "JSON"
                else f"list_bool_or(list_transform({col}, lambda x: {nested}))")
        row = con.sql(f"SELECT min(r) FROM (SELECT row_number() OVER () AS r, {col} FROM ({base})) WHERE {test}",
                      params=params).fetchall()[0][0]
        if row is not None:
            raise BadInput(f"{path}: row {row}: column '{name}' mixes lists or objects with other values; "
                           f"give the column one type in every row (a string, or a list of strings)")
    replace = ", ".join(f"{_quoted(n)}->>'$' AS {_quoted(n)}" if k == "JSON"
                        else f"list_transform({_quoted(n)}, lambda x: x->>'$') AS {_quoted(n)}" for n, k in mixed.items())
    return con.sql(f"SELECT * REPLACE ({replace}) FROM ({base})", params=params)


def _refuse_reserved(path: Path, columns: list[str]) -> None:
    """`_file` and `_row` are the columns phrasefuse adds (where a row came from)."""
    for name in (FILE_COL, ROW_COL):
        if name in columns:
            raise BadInput(f"{path}: column '{name}' is reserved (phrasefuse adds it to name a row's file and "
                           f"row); rename that column")


def _reader(path: Path, what: str) -> str:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise BadInput(f"{path}: unknown {what} format '{path.suffix}'; use .parquet, .csv, .tsv, .jsonl or .json")
    return reader


def _cannot_read(path: Path, what: str, e: Exception) -> BadInput:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return BadInput(f"{path}: cannot read as {what} ({first}); fix the file or its extension")


def table_columns(pattern: str | os.PathLike, what: str = "table") -> list[str]:
    """The union of the column names of the files of `pattern` (no data read)."""
    names: dict[str, None] = {}
    for path in expand(pattern):
        con = _connect()
        try:
            names.update(dict.fromkeys(con.sql(f"SELECT * FROM {_reader(path, what)}",
                                               params={"path": str(path)}).columns))
        except duckdb.Error as e:
            raise _cannot_read(path, what, e) from None
        finally:
            con.close()
    return list(names)


def iter_batches(pattern: str | os.PathLike, what: str = "table", batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """The rows of `pattern` as Arrow tables of at most `batch_rows` rows, with `_file` and `_row`,
    streamed from DuckDB: a table larger than memory is never loaded whole. A batch holds only the
    columns its file has (files may differ)."""
    for path in expand(pattern):
        con = _connect()
        try:
            stream = _select(con, _reader(path, what), path).to_arrow_reader(batch_rows)
            row = 0
            while True:
                try:
                    batch = stream.read_next_batch()
                except StopIteration:
                    break
                n = batch.num_rows
                table = pa.Table.from_batches([batch])
                _refuse_reserved(path, table.column_names)
                table = table.append_column(FILE_COL, pa.nulls(n, pa.string()).fill_null(str(path)))
                table = table.append_column(ROW_COL, pa.array(np.arange(row + 1, row + n + 1), pa.int64()))
                row += n
                yield table
        except (duckdb.Error, pa.ArrowException) as e:
            raise _cannot_read(path, what, e) from None
        finally:
            con.close()


def sql(query: str, **tables: pa.Table | pa.Array) -> pa.Table:
    """Run a DuckDB query over Arrow tables named by keyword (no copies in, Arrow out)."""
    con = _connect()
    try:
        for name, t in tables.items():
            con.register(name, pa.table({"value": t}) if isinstance(t, (pa.Array, pa.ChunkedArray)) else t)
        return con.sql(query).to_arrow_table()
    finally:
        con.close()


def where(table: pa.Table, index: int) -> str:
    """'FILE: row N' for row `index` of a table from `read_table`."""
    return f"{table[FILE_COL][index].as_py()}: row {table[ROW_COL][index].as_py()}"
