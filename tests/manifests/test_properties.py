"""Properties: any generated manifest is either read, or refused with BadInput naming the file (never a
traceback); a valid one is always read, as written; a refusal only ever meets a manifest that breaks a rule."""

import csv
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from phrasefuse.errors import BadInput
from phrasefuse.manifests import read_manifest

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
scalar = st.one_of(st.none(), text, st.integers(-5, 5), st.sampled_from(["train", "val", "test", "", "=cmd()"]))
cell = st.one_of(scalar, st.lists(st.one_of(st.none(), text), max_size=3))
columns = st.lists(st.sampled_from(["id", "image", "label", "labels", "split", "title", "tags"]),
                   min_size=0, max_size=5, unique=True)


@st.composite
def manifests(draw):
    cols = draw(columns)
    n = draw(st.integers(0, 6))
    rows = [{c: draw(cell) for c in cols} for _ in range(n)]
    if draw(st.booleans()):  # half the time, valid unique ids, so the other columns get checked too
        cols = ["id"] + [c for c in cols if c != "id"]
        rows = [{"id": f"row-{i}", **{c: v for c, v in r.items() if c != "id"}} for i, r in enumerate(rows)]
    return cols, rows



def write_manifest(path, fmt, cols, rows) -> bool:
    """Write the rows as `fmt`; False when pyarrow cannot hold the mix of types (no one could write it)."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) or "", encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows:
                w.writerow(["|".join(map(str, v)) if isinstance(v, list) else v for v in r.values()])
    else:
        try:
            table = pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.string()) for c in cols})
        except (pa.ArrowException, TypeError, ValueError):
            return False
        pq.write_table(table, path)
    return True


PLAIN = re.compile(r"[a-z][a-z0-9 _-]*")  # a string no reader takes for a number, a date or a list
PATH = re.compile(r"[a-z0-9_-]+(/[a-z0-9_-]+)*\.jpg")  # a path inside the manifest's folder


def plainly_valid(cols, rows) -> bool:
    """Whether the manifest surely keeps every rule (so must be read): rows, unique non-empty string
    ids, and every other column of the kind it must be. Conservative: False says nothing."""
    def plain(v):
        return isinstance(v, str) and PLAIN.fullmatch(v) is not None

    if not rows or "id" not in cols:
        return False
    ids = [r["id"] for r in rows]
    if not all(plain(i) and i.strip() for i in ids) or len(set(ids)) != len(ids):
        return False
    for r in rows:
        for c, v in r.items():
            if c == "split" and v not in ("train", "val", "test"):
                return False
            if c == "labels" and not (isinstance(v, list) and v and all(plain(x) for x in v)):
                return False
            if c == "image" and not (isinstance(v, str) and PATH.fullmatch(v)):
                return False
            if c in ("label", "title") and not plain(v):
                return False
            if c == "tags" and not (plain(v) or (isinstance(v, list) and v and all(plain(x) for x in v))):
                return False
    return all(len({type(r[c]) for r in rows}) == 1 for c in cols)  # one type per column


plain_text = st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)


@st.composite
def valid_manifests(draw):
    """Valid manifests: unique ids, relative image paths, a label or labels, a split, text columns."""
    n = draw(st.integers(1, 6))
    ids = draw(st.lists(plain_text, min_size=n, max_size=n, unique=True))
    multilabel = draw(st.booleans())
    rows = []
    for i in ids:
        row = {"id": i, "image": f"images/{i}.jpg"}
        if multilabel:
            row["labels"] = draw(st.lists(plain_text, min_size=1, max_size=3))
        else:
            row["label"] = draw(plain_text)
        row["split"] = draw(st.sampled_from(["train", "val", "test"]))
        row["title"] = draw(plain_text)
        rows.append(row)
    return list(rows[0]), rows

@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(manifest=manifests(), fmt=st.sampled_from(["jsonl", "csv", "parquet"]))
def test_read_or_refuse_cleanly(tmp_path_factory, manifest, fmt):
    cols, rows = manifest
    path = tmp_path_factory.mktemp("m") / f"m.{fmt}"
    if not write_manifest(path, fmt, cols, rows):
        return  # pyarrow cannot hold this mix of types: not a manifest anyone could write
    try:
        m = read_manifest(path)
    except BadInput as e:
        event(f"refused: {str(e).split(': ')[-1][:30]}")
        assert str(path) in str(e) and "\n" not in str(e)
        assert not plainly_valid(cols, rows), f"a valid manifest was refused: {e}"
        return
    event("read")
    ids = m.table["id"].to_pylist()
    assert len(ids) == len(set(ids)) and all(isinstance(i, str) and i.strip() for i in ids)
    assert set(m.table["split"].to_pylist()) <= {"train", "val", "test"}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(manifest=valid_manifests(), fmt=st.sampled_from(["jsonl", "csv", "parquet"]))
def test_a_valid_manifest_is_read_as_written(tmp_path_factory, manifest, fmt):
    cols, rows = manifest
    assert plainly_valid(cols, rows)  # the oracle of the test above agrees
    path = tmp_path_factory.mktemp("m") / f"m.{fmt}"
    assert write_manifest(path, fmt, cols, rows)
    m = read_manifest(path)
    assert m.table["id"].to_pylist() == [r["id"] for r in rows]
    assert m.table["split"].to_pylist() == [r["split"] for r in rows]
    if "label" in cols:
        assert m.table["label"].to_pylist() == [r["label"] for r in rows]
    else:
        assert m.table["labels"].to_pylist() == [r["labels"] for r in rows]
    assert m.table["title"].to_pylist() == [r["title"] for r in rows]
