"""Property: any generated manifest is either read, or refused with BadInput naming the file; never a traceback."""

import csv
import json

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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=manifests(), fmt=st.sampled_from(["jsonl", "csv", "parquet"]))
def test_read_or_refuse_cleanly(tmp_path_factory, manifest, fmt):
    cols, rows = manifest
    path = tmp_path_factory.mktemp("m") / f"m.{fmt}"
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
            return  # pyarrow cannot hold this mix of types: not a manifest anyone could write
        pq.write_table(table, path)
    try:
        m = read_manifest(path)
    except BadInput as e:
        event(f"refused: {str(e).split(': ')[-1][:30]}")
        assert str(path) in str(e) and "\n" not in str(e)
        return
    event("read")
    ids = m.table["id"].to_pylist()
    assert len(ids) == len(set(ids)) and all(isinstance(i, str) and i.strip() for i in ids)
    assert set(m.table["split"].to_pylist()) <= {"train", "val", "test"}
