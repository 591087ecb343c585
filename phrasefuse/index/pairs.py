"""Read and clean a pairs table (query, image_id, optional weight) for the index build.

Cleaning never crashes on bad rows; it counts them (`PairCounts`):
  - a phrase is normalised (NFKC, lower case, runs of whitespace -> one space, trimmed),
    so "Milk  Can " and "milk can" are one query; a phrase empty after that is dropped;
  - a pair with an empty image_id names no image (its phrase may still get a text prototype);
  - a repeated (phrase, image_id) pair is kept once (the first; its weight wins);
  - an image_id that is not in the image store is dropped, as is a pair of weight 0; image_ids are
    compared exactly with the store's ids (as manifests keep them: " a" is not "a").
What is wrong with the table itself (missing columns, a weight that is not a number >= 0)
is a BadInput naming the file and row.

The table is streamed in batches (manifests.tables.iter_batches) and only the distinct
pairs are kept, so millions of duplicate rows, or a table larger than memory, cost memory
in proportion to the distinct pairs, not to the rows.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.errors import BadInput
from phrasefuse.manifests.tables import BATCH_ROWS, iter_batches, table_columns, where

REQUIRED = ("query", "image_id")
WEIGHT = "weight"


@dataclass
class PairCounts:
    pairs_read: int = 0
    empty_phrase: int = 0  # dropped: nothing left after normalisation
    no_image_id: int = 0  # dropped: empty image_id (the phrase may get a text prototype)
    duplicate: int = 0  # dropped: (phrase, image_id) seen on an earlier row
    missing_id: int = 0  # dropped: image_id not in the image store
    zero_weight: int = 0  # dropped: weight 0
    pairs_used: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Pairs:
    """The usable pairs, as arrays over `phrases` (every distinct non-empty phrase, sorted)."""

    phrases: pa.Array  # string, distinct, sorted
    phrase: np.ndarray  # (pairs,) int64 index into `phrases`
    image_row: np.ndarray  # (pairs,) int64 row of the image in the store's id array
    weight: np.ndarray  # (pairs,) float64, > 0
    counts: PairCounts
    weighted: bool = False  # the table's weight column was used
    missing_example: str | None = None  # one image_id absent from the store, for messages

    def images_per_phrase(self) -> np.ndarray:
        return np.bincount(self.phrase, minlength=len(self.phrases))


def normalize_phrases(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """NFKC, lower case, whitespace runs -> one space, trimmed; null -> ''."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = pc.cast(texts, pa.string()).fill_null("")
    texts = pc.utf8_normalize(texts, form="NFKC")
    texts = pc.utf8_lower(texts)
    texts = pc.replace_substring_regex(texts, pattern=r"\s+", replacement=" ")
    return pc.utf8_trim_whitespace(texts)


def pairs_columns(pattern: str | os.PathLike, use_weights: bool = True) -> bool:
    """Check that the pairs table has its columns; True when its weight column is used."""
    columns = [c for c in table_columns(pattern, what="pairs table") if not c.startswith("_")]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise BadInput(f"{pattern}: pairs table has no column {', '.join(repr(c) for c in missing)} "
                       f"(columns: {', '.join(columns) or 'none'}); it needs 'query' and 'image_id' (optional 'weight')")
    return use_weights and WEIGHT in columns


@dataclass
class CleanBatch:
    """One batch of a pairs table, cleaned: rows with a phrase (`phrase`, `image_id` ('' for none), `weight`)."""

    phrase: pa.Array
    image_id: pa.Array
    weight: np.ndarray
    rows: int  # rows read
    empty_phrase: int
    no_image_id: int
    named: int  # rows with a phrase and an image_id


def clean_batch(batch: pa.Table, pattern, weighted: bool) -> CleanBatch:
    """Normalise one batch of pairs; rows without an image_id stay (as image_id '') so their phrase is known."""
    n = batch.num_rows
    phrase = normalize_phrases(_as_text(batch, "query", pattern))
    # Ids are compared exactly, as manifests keep them: " a" is not "a" (only a blank id is no id).
    image_id = _as_text(batch, "image_id", pattern).fill_null("")
    image_id = pc.if_else(pc.equal(pc.utf8_trim_whitespace(image_id), ""), "", image_id)
    weight = _weights(batch, pattern) if weighted else np.ones(n)
    empty = pc.equal(phrase, "").to_numpy(zero_copy_only=False)
    no_id = ~empty & pc.equal(image_id, "").to_numpy(zero_copy_only=False)
    keep = pa.array(~empty)
    return CleanBatch(phrase.filter(keep), image_id.filter(keep), weight[~empty].astype(np.float64), n,
                      int(empty.sum()), int(no_id.sum()), int((~empty & ~no_id).sum()))


def read_pairs(pattern: str | os.PathLike, store_ids: pa.Array, use_weights: bool = True) -> Pairs:
    """Read the pairs table(s) `pattern` and keep the pairs whose image is in the store (all in memory;
    `index build` streams them instead: streaming.py)."""
    weighted = pairs_columns(pattern, use_weights)
    counts = PairCounts()
    named = 0  # rows with a phrase and an image_id
    first = FirstOfEachPair()
    for batch in iter_batches(pattern, what="pairs table"):
        clean = clean_batch(batch, pattern, weighted)
        counts.empty_phrase += clean.empty_phrase
        counts.no_image_id += clean.no_image_id
        named += clean.named
        first.add(pa.table({"phrase": clean.phrase, "image_id": clean.image_id,
                            "weight": pa.array(clean.weight, pa.float64())}))
        counts.pairs_read += clean.rows
    distinct = first.result()

    phrases = pc.unique(distinct["phrase"])
    phrases = phrases.take(pc.sort_indices(phrases))
    pairs = distinct.filter(pc.not_equal(distinct["image_id"], ""))  # in order of first occurrence
    counts.duplicate = named - pairs.num_rows
    found = pc.index_in(pairs["image_id"], value_set=store_ids)
    present = found.is_valid().to_numpy(zero_copy_only=False)
    counts.missing_id = int((~present).sum())
    missing_example = pairs["image_id"][int(np.argmax(~present))].as_py() if counts.missing_id else None
    weight = pairs["weight"].to_numpy()
    positive = weight > 0
    counts.zero_weight = int((present & ~positive).sum())
    usable = present & positive
    counts.pairs_used = int(usable.sum())
    used = pairs.filter(pa.array(usable))
    return Pairs(
        phrases=phrases,
        phrase=pc.index_in(used["phrase"], value_set=phrases).to_numpy().astype(np.int64),
        image_row=found.filter(pa.array(usable)).to_numpy().astype(np.int64),
        weight=weight[usable].astype(np.float64),  # float32 would round a weight such as 1e-300 to 0
        counts=counts,
        weighted=weighted,
        missing_example=missing_example,
    )


class FirstOfEachPair:
    """The first row of each distinct (phrase, image_id), over batches added in row order.

    Batches are collapsed when what is held outgrows twice the distinct pairs found so far,
    so memory follows the distinct pairs (not the rows) and the cost stays linear.
    """

    def __init__(self) -> None:
        self._parts: list[pa.Table] = []
        self._held = 0
        self._distinct = 0

    def add(self, rows: pa.Table) -> None:
        self._parts.append(rows)
        self._held += rows.num_rows
        if self._held > max(2 * self._distinct, BATCH_ROWS):
            self._collapse()

    def _collapse(self) -> None:
        if not self._parts:
            return
        rows = pa.concat_tables(self._parts)
        # use_threads=False keeps row order, so "first" is the earliest row (its weight wins).
        first = rows.group_by(["phrase", "image_id"], use_threads=False).aggregate([("weight", "first")])
        first = pa.table({"phrase": first["phrase"], "image_id": first["image_id"], "weight": first["weight_first"]})
        self._parts, self._held, self._distinct = [first], first.num_rows, first.num_rows

    def result(self) -> pa.Table:
        self._collapse()
        if not self._parts:
            return pa.table({"phrase": pa.array([], pa.string()), "image_id": pa.array([], pa.string()),
                             "weight": pa.array([], pa.float64())})
        return self._parts[0]


def _as_text(table: pa.Table, name: str, pattern) -> pa.Array:
    column = table[name].combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.cast(column, pa.string())
    if pa.types.is_integer(column.type) or pa.types.is_null(column.type):
        return pc.cast(column, pa.string())  # JSON ids such as 17 are strings elsewhere
    raise BadInput(f"{pattern}: column '{name}' has type {column.type}; expected text (one {name} per row)")


def _weights(table: pa.Table, pattern) -> np.ndarray:
    column = table[WEIGHT].combine_chunks()
    try:
        values = pc.cast(column, pa.float64())
    except pa.ArrowException:
        bad = _first_unparsable(column)
        raise BadInput(f"{where(table, bad)}: weight {column[bad].as_py()!r} is not a number; "
                       f"fix it or pass --no-weights") from None
    valid = values.is_valid().to_numpy(zero_copy_only=False)
    weight = values.fill_null(np.nan).to_numpy(zero_copy_only=False)
    bad = ~valid | ~np.isfinite(weight) | (weight < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise BadInput(f"{where(table, i)}: weight {column[i].as_py()!r} is not a number >= 0; "
                       f"fix it or pass --no-weights")
    return weight


def _first_unparsable(column: pa.Array) -> int:
    # Only on the error path: find the row that does not cast (CSV weights are text).
    for i, value in enumerate(column.to_pylist()):
        try:
            float(value)
        except (TypeError, ValueError):
            return i
    return 0
