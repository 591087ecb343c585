"""Prototypes: segment sums against naive per-query means; pairs cleaning and its counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.index.build import build_index
from phrasefuse.index.folder import PhraseIndex
from phrasefuse.index.pairs import normalize_phrases, read_pairs
from phrasefuse.index.prototypes import prototypes, segment_sums
from phrasefuse.store import l2_normalize
from tests.index.conftest import read_meta, write_random_store


def naive_prototype(emb: np.ndarray, rows: list[int], weights: list[float]) -> np.ndarray:
    unit = [emb[r] / np.linalg.norm(emb[r]) for r in rows]
    mean = sum(w * u for w, u in zip(weights, unit)) / sum(weights)
    return mean / np.linalg.norm(mean)


def test_segment_sums_match_a_loop_across_chunks():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)).astype(np.float32)
    segment = rng.integers(0, 7, size=400)  # unsorted, segment 6 may span chunk boundaries
    rows = rng.integers(0, 50, size=400)
    weights = rng.uniform(0.1, 3, size=400).astype(np.float32)
    got = segment_sums(segment, rows, emb, 9, weights, chunk=37)
    for s in range(9):
        want = sum((weights[p] * emb[rows[p]] for p in np.flatnonzero(segment == s)), np.zeros(8, np.float32))
        np.testing.assert_allclose(got[s], want, rtol=1e-4, atol=1e-4)
    assert not got[7:].any()  # segments without pairs stay zero


def test_segment_sums_into_out_add_to_what_it_holds():
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((40, 8)).astype(np.float32)
    segment, rows = rng.integers(0, 5, size=200), rng.integers(0, 40, size=200)
    start = rng.standard_normal((5, 8)).astype(np.float32)
    out = start.copy()
    got = segment_sums(segment, rows, emb, 5, chunk=23, out=out)
    assert got is out  # no second array of sums
    np.testing.assert_allclose(out, start + segment_sums(segment, rows, emb, 5), rtol=1e-5, atol=1e-5)


def test_prototypes_equal_naive_weighted_means():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((30, 16)).astype(np.float32) * 3  # not unit: prototypes normalise first
    pairs = {0: ([1, 2, 3], [1.0, 1.0, 1.0]), 1: ([4], [2.0]), 2: ([5, 6], [1.0, 9.0]), 4: ([7, 8, 9, 10], [1, 2, 3, 4])}
    segment = np.concatenate([[s] * len(r) for s, (r, _) in pairs.items()])
    rows = np.concatenate([r for r, _ in pairs.values()])
    weights = np.concatenate([w for _, w in pairs.values()]).astype(np.float32)
    protos, ok = prototypes(segment, rows, emb, 5, weights)
    assert ok.tolist() == [True, True, True, False, True]
    for s, (r, w) in pairs.items():
        np.testing.assert_allclose(protos[s], naive_prototype(emb, r, w), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(protos[ok], axis=1), 1, atol=1e-5)


def test_normalize_phrases_merges_case_and_whitespace():
    got = normalize_phrases(pa.array(["Milk Can ", "milk can", " MILK\t\tcan", "milk\u00a0can", None, "   ", "Ｍilk can"]))
    assert got.to_pylist() == ["milk can"] * 4 + ["", ""] + ["milk can"]


def test_read_pairs_counts_every_dropped_row(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("query,image_id,weight\n"
                    "Milk Can ,a,1\n"
                    "milk can,b,2\n"
                    "milk  can,a,5\n"  # duplicate of row 1 after normalisation: dropped, first weight wins
                    ",a,1\n"  # empty phrase
                    "ghost,zz,1\n"  # id not in the store
                    "text only,,1\n"  # no image id
                    "zero,c,0\n"  # weight 0
                    "cup,c,3\n")
    pairs = read_pairs(path, pa.array(["a", "b", "c"]))
    c = pairs.counts
    assert (c.pairs_read, c.empty_phrase, c.no_image_id, c.duplicate, c.missing_id, c.zero_weight, c.pairs_used) == \
        (8, 1, 1, 1, 1, 1, 3)
    assert pairs.missing_example == "zz"
    assert pairs.phrases.to_pylist() == ["cup", "ghost", "milk can", "text only", "zero"]
    assert pairs.weighted
    used = sorted(zip(pairs.phrases.take(pa.array(pairs.phrase)).to_pylist(), pairs.image_row.tolist(),
                      pairs.weight.tolist()))
    assert used == [("cup", 2, 3.0), ("milk can", 0, 1.0), ("milk can", 1, 2.0)]
    assert pairs.images_per_phrase().tolist() == [1, 0, 2, 0, 0]


@pytest.mark.parametrize("content, expected", [
    ("query,image\nx,a\n", "no column 'image_id'"),
    ("query,image_id,weight\nx,a,1\ny,b,heavy\n", "row 2: weight 'heavy' is not a number"),
    ("query,image_id,weight\nx,a,1\ny,b,-3\n", "row 2: weight '-3' is not a number >= 0"),
])
def test_bad_pairs_tables_name_file_row_and_column(tmp_path, content, expected):
    path = tmp_path / "pairs.csv"
    path.write_text(content)
    with pytest.raises(BadInput, match=expected) as err:
        read_pairs(path, pa.array(["a", "b"]))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_built_index_holds_naive_prototypes_and_honours_min_images(tmp_path):
    rng = np.random.default_rng(3)
    emb = l2_normalize(rng.standard_normal((40, 24)).astype(np.float32))
    ids = write_random_store(tmp_path / "img", emb)
    pairs = [("Red Car", 0, 2.0), ("red  car ", 1, 1.0), ("RED CAR", 2, 1.0), ("blue sky", 3, 1.0), ("blue sky", 4, 3.0),
             ("lonely", 5, 1.0), ("blue sky", 3, 7.0)]  # the last repeats a pair: dropped
    pq.write_table(pa.table({"query": [q for q, _, _ in pairs], "image_id": [ids[i] for _, i, _ in pairs],
                             "weight": [w for _, _, w in pairs]}), tmp_path / "pairs.parquet")
    summary = build_index(tmp_path / "pairs.parquet", tmp_path / "img", tmp_path / "index", min_images=2)

    index = PhraseIndex(tmp_path / "index")
    table = index.table
    assert table["phrase"].to_pylist() == ["blue sky", "red car"]  # "lonely" has 1 image < --min-images 2
    assert table["images"].to_pylist() == [2, 3] and set(table["source"].to_pylist()) == {"image"}
    stored = index.faiss_index.reconstruct_n(0, index.faiss_index.ntotal)
    np.testing.assert_allclose(stored[0], naive_prototype(emb, [3, 4], [1.0, 3.0]), atol=1e-5)
    np.testing.assert_allclose(stored[1], naive_prototype(emb, [0, 1, 2], [2.0, 1.0, 1.0]), atol=1e-5)
    meta = read_meta(tmp_path / "index")
    assert meta["counts"]["phrases_below_min_images"] == 1 and meta["pairs"]["counts"]["duplicate"] == 1
    assert meta["pairs"]["weighted"] and summary.counts["phrases"] == 2
    assert meta["index"]["kind"] == "flat" and meta["recall_at_10"] == 1.0

    # --no-weights: plain means
    build_index(tmp_path / "pairs.parquet", tmp_path / "img", tmp_path / "index", min_images=2, use_weights=False)
    stored = PhraseIndex(tmp_path / "index").faiss_index.reconstruct_n(0, 2)
    np.testing.assert_allclose(stored[0], naive_prototype(emb, [3, 4], [1.0, 1.0]), atol=1e-5)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_tiny_positive_weights_keep_their_phrase_and_their_proportions():
    # Weights such as 1e-300 round to 0 in float32; scaled per phrase first, they keep their ratio.
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((2, 16)).astype(np.float32)
    protos, ok = prototypes(np.array([0, 1, 1]), np.array([0, 0, 1]), emb, 2, np.array([1e-307, 3e-300, 1e-300]))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    expected = 3 * unit[0] + unit[1]
    assert ok.all()
    np.testing.assert_allclose(protos[0], unit[0], atol=1e-6)
    np.testing.assert_allclose(protos[1], expected / np.linalg.norm(expected), atol=1e-6)
