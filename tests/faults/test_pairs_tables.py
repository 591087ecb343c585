"""Pairs tables at `index build`: any generated table is built or refused with one clean line
naming the file (never a traceback); a valid one always builds, with the phrases it should have;
millions of duplicate rows build in bounded memory."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import re
import textwrap
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from phrasefuse.errors import BadInput
from phrasefuse.store import StoreWriter, l2_normalize, new_meta

IDS = [f"img-{i}" for i in range(12)]
GENERATED = {"spec": "random:8", "family": "random", "name": "gaussian-8", "weights_sha256": "0" * 64, "dim": 8}


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    """12 random unit vectors under IDS (the real store format; no model needed)."""
    path = tmp_path_factory.mktemp("pairs") / "img"
    emb = l2_normalize(np.random.default_rng(0).standard_normal((len(IDS), 8)).astype(np.float32))
    with StoreWriter.open(path, new_meta(modality="image", encoder=GENERATED, dtype="float32")) as writer:
        writer.add(IDS, IDS, emb)
    return path


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10)
phrase = st.one_of(st.none(), text, st.sampled_from(["cat", " Cat ", "CAT", "ﬁsh", "=cmd|' /C calc'!A0", "🚀 rocket"]))
# Mostly usable values, so that a good share of tables builds; the rest is the hostile part.
image_id = st.one_of(st.sampled_from(IDS), st.sampled_from(IDS), st.sampled_from([None, "missing", "", " img-1 ", 3]))
weight = st.one_of(st.integers(0, 5), st.floats(0, 1e6), st.integers(0, 5),
                   st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([None, -1, "3", "x", "", "1e3"]))
COLUMNS = {"query": phrase, "image_id": image_id, "weight": weight, "extra": text}


@st.composite
def pairs_tables(draw):
    columns = draw(st.lists(st.sampled_from(list(COLUMNS)), max_size=4, unique=True))
    if draw(st.booleans()):  # half the time both required columns, so that rows and weights get checked
        columns = ["query", "image_id"] + [c for c in columns if c not in ("query", "image_id")]
    base = [{c: draw(COLUMNS[c]) for c in columns} for _ in range(draw(st.integers(0, 8)))]
    rows = base * draw(st.integers(1, 3))  # duplicate rows
    return columns, rows


def write(path, fmt, columns, rows) -> bool:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([r[c] for c in columns] for r in rows)
    else:
        try:
            table = pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.string()) for c in columns})
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return False  # pyarrow cannot hold this mix of types: no one could write this Parquet file
        pq.write_table(table, path)
    return True


def expected_phrases(columns, rows, use_weights: bool) -> set[str] | None:
    """The phrases the index must hold when the table surely keeps every rule, else None (no claim).
    Surely valid: 'query' and 'image_id' columns of text, weights (when used) numbers >= 0, and at
    least one usable pair (a phrase, a stored id, its first row's weight > 0). Conservative."""
    if not rows or "query" not in columns or "image_id" not in columns:
        return None
    plain = re.compile(r" *[A-Za-z][A-Za-z ]*")  # text that no reader takes for a number or a date
    weighted = use_weights and "weight" in columns
    first: dict[tuple[str, str], float] = {}
    for r in rows:
        q, i = r["query"], r["image_id"]
        if not (isinstance(q, str) and plain.fullmatch(q)) or i not in IDS:
            return None
        w = r["weight"] if weighted else 1
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            return None
        phrase = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", q).lower()).strip()
        first.setdefault((phrase, i), w)
    return {phrase for (phrase, _), w in first.items() if w > 0} or None


@st.composite
def valid_pairs_tables(draw):
    """Valid tables: text phrases (with case and spacing noise) on stored ids, weights >= 0 (some 0),
    repeated rows, columns in any order; at least one usable pair."""
    words = st.lists(st.sampled_from(["cat", "Dog", "RED", "milk", "can"]), min_size=1, max_size=3)
    phrase = st.tuples(st.sampled_from(["", " ", "  "]), words).map(lambda t: t[0] + "  ".join(t[1]))
    columns = draw(st.permutations(["query", "image_id", "weight", "extra"]))
    base = [{"query": draw(phrase), "image_id": draw(st.sampled_from(IDS)),
             "weight": draw(st.one_of(st.integers(0, 5), st.just(0.0), st.floats(0, 1e6))), "extra": "x"}
            for _ in range(draw(st.integers(1, 8)))]
    base[0]["weight"] = 1
    rows = [{c: r[c] for c in columns} for r in base * draw(st.integers(1, 3))]
    return columns, rows


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(table=pairs_tables(), fmt=st.sampled_from(["csv", "jsonl", "parquet"]), use_weights=st.booleans())
def test_any_pairs_table_builds_or_is_refused_cleanly(image_store, tmp_path_factory, table, fmt, use_weights):
    from phrasefuse.index.build import build_index
    from phrasefuse.index.folder import PhraseIndex
    from phrasefuse.index.pairs import normalize_phrases

    columns, rows = table
    folder = tmp_path_factory.mktemp("p")
    path = folder / f"pairs.{fmt}"
    if not write(path, fmt, columns, rows):
        return
    try:
        summary = build_index(path, image_store, folder / "index", use_weights=use_weights)
    except BadInput as e:
        event(f"refused: {str(e).split('; ')[0].split(': ')[-1][:40]}")
        assert str(path) in str(e) and "\n" not in str(e)
        assert not (folder / "index").exists()  # nothing half-written
        assert expected_phrases(columns, rows, use_weights) is None, f"a valid table was refused: {e}"
        return
    event("built")
    phrases = PhraseIndex(folder / "index").table["phrase"].to_pylist()
    assert len(phrases) == len(set(phrases)) == summary.counts["phrases"] > 0
    assert all(phrases) and normalize_phrases(pa.array(phrases, pa.string())).to_pylist() == phrases  # normalised
    pairs = summary.pairs
    assert pairs["pairs_read"] == len(rows) and pairs["pairs_used"] <= len(set(map(str, rows)))
    expected = expected_phrases(columns, rows, use_weights)
    assert expected is None or set(phrases) == expected


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(table=valid_pairs_tables(), fmt=st.sampled_from(["csv", "jsonl", "parquet"]), use_weights=st.booleans())
def test_a_valid_pairs_table_builds_with_the_phrases_it_names(image_store, tmp_path_factory, table, fmt, use_weights):
    from phrasefuse.index.build import build_index
    from phrasefuse.index.folder import PhraseIndex

    columns, rows = table
    expected = expected_phrases(columns, rows, use_weights)
    assert expected  # the oracle of the test above agrees that it is valid
    folder = tmp_path_factory.mktemp("v")
    path = folder / f"pairs.{fmt}"
    assert write(path, fmt, columns, rows)
    summary = build_index(path, image_store, folder / "index", use_weights=use_weights)
    assert set(PhraseIndex(folder / "index").table["phrase"].to_pylist()) == expected
    assert summary.pairs["pairs_read"] == len(rows)


RSS_PROBE = textwrap.dedent("""
    import resource, sys
    from phrasefuse.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr)
""")


def build_peak_rss_mb(pairs, store, out) -> tuple[int, dict]:
    """Run `phrasefuse index build` in a fresh process; its exit code must be 0; (its peak RSS in MB,
    the pair counts of its JSON summary)."""
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, "index", "build", "--pairs", str(pairs), "--images",
                           str(store), "--out", str(out), "--json"], capture_output=True, text=True, timeout=300)
    code, peak = proc.stderr.split()[-2:]
    assert code == "0", proc.stderr
    return int(peak), json.loads(proc.stdout)["pairs"]


def test_two_million_duplicate_pairs_build_in_bounded_memory(image_store, tmp_path):
    distinct = pa.table({"query": [f"Phrase {i % 7}" for i in range(100)], "image_id": [IDS[i % 12] for i in range(100)],
                         "weight": np.ones(100)})
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    pq.write_table(pa.concat_tables([distinct] * 200), small)  # 20,000 rows
    pq.write_table(pa.concat_tables([distinct] * 20_000), large, row_group_size=100_000)  # 2,000,000 rows
    distinct_pairs = len({(i % 7, i % 12) for i in range(100)})
    base, small_counts = build_peak_rss_mb(small, image_store, tmp_path / "i1")
    peak, large_counts = build_peak_rss_mb(large, image_store, tmp_path / "i2")
    # Every row but the first of each distinct pair is counted a duplicate, in the summary too.
    assert (small_counts["duplicate"], small_counts["pairs_used"]) == (20_000 - distinct_pairs, distinct_pairs)
    assert (large_counts["duplicate"], large_counts["pairs_used"]) == (2_000_000 - distinct_pairs, distinct_pairs)
    # Loaded whole, 2 M rows take ~350 MB more than 20 k; streamed, what is held is the distinct pairs.
    print(f"peak RSS of index build: {base} MB (20 k rows), {peak} MB (2 M rows)")
    assert peak - base < 150, (base, peak)
    meta = json.loads((tmp_path / "i2" / "meta.json").read_text())
    assert meta["pairs"]["counts"]["pairs_read"] == 2_000_000
    assert meta["pairs"]["counts"]["pairs_used"] == distinct_pairs
    assert meta["pairs"]["counts"]["duplicate"] == 2_000_000 - distinct_pairs
