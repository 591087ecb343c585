"""Read and clean a pairs table (query, image_id, optional weight) for the index build.

Cleaning never crashes on bad rows; it counts them (`PairCounts`):
  - a phrase is normalised (NFKC, lower case, runs of whitespace -> one space, trimmed),
    so "Milk  Can " and "milk can" are one query; a phrase empty after that is dropped;
  - a pair with an empty image_id names no image (its phrase may still get a text prototype);
  - a repeated (phrase, image_id) pair is kept once (the first; its weight wins);
  - an image_id that is not in the image store is dropped, as is a pair of weight 0.
What is wrong with the table itself (missing columns, a weight that is not a number >= 0)
is a BadInput naming the file and row.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.errors import BadInput
from phrasefuse.manifests import read_table
from phrasefuse.manifests.tables import where

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
    weight: np.ndarray  # (pairs,) float32, > 0
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


def read_pairs(pattern: str | os.PathLike, store_ids: pa.Array, use_weights: bool = True) -> Pairs:
    """Read the pairs table(s) `pattern` and keep the pairs whose image is in the store."""
    table = read_table(pattern, what="pairs table")
    columns = [c for c in table.column_names if not c.startswith("_")]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise BadInput(f"{pattern}: pairs table has no column {', '.join(repr(c) for c in missing)} "
                       f"(columns: {', '.join(columns) or 'none'}); it needs 'query' and 'image_id' (optional 'weight')")
    phrase = normalize_phrases(_as_text(table, "query", pattern))
    image_id = pc.utf8_trim_whitespace(_as_text(table, "image_id", pattern).fill_null(""))
    weighted = use_weights and WEIGHT in columns
    weight = _weights(table, pattern) if weighted else np.ones(table.num_rows)

    counts = PairCounts(pairs_read=table.num_rows)
    empty = pc.equal(phrase, "").to_numpy(zero_copy_only=False)
    no_id = ~empty & pc.equal(image_id, "").to_numpy(zero_copy_only=False)
    counts.empty_phrase, counts.no_image_id = int(empty.sum()), int(no_id.sum())

    # First occurrence of each (phrase, image_id) among the rows that name one.
    candidates = np.flatnonzero(~empty & ~no_id)
    keyed = pa.table({"phrase": phrase.take(candidates), "image_id": image_id.take(candidates),
                      "pos": pa.array(candidates, pa.int64())})
    first = keyed.group_by(["phrase", "image_id"], use_threads=False).aggregate([("pos", "min")])
    kept = np.sort(first["pos_min"].to_numpy())
    counts.duplicate = len(candidates) - len(kept)

    found = pc.index_in(image_id.take(kept), value_set=store_ids)
    present = found.is_valid().to_numpy(zero_copy_only=False)
    counts.missing_id = int((~present).sum())
    missing_example = image_id[int(kept[np.argmax(~present)])].as_py() if counts.missing_id else None
    positive = weight[kept] > 0
    counts.zero_weight = int((present & ~positive).sum())
    usable = present & positive
    counts.pairs_used = int(usable.sum())

    phrases = pc.unique(phrase.filter(pa.array(~empty)))
    phrases = phrases.take(pc.sort_indices(phrases))
    rows = kept[usable]
    return Pairs(
        phrases=phrases,
        phrase=pc.index_in(phrase.take(rows), value_set=phrases).to_numpy().astype(np.int64),
        image_row=found.filter(pa.array(usable)).to_numpy().astype(np.int64),
        weight=weight[rows].astype(np.float32),
        counts=counts,
        weighted=weighted,
        missing_example=missing_example,
    )


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
