"""Joining stores to a manifest, block normalisation, labels, and the choosing machinery."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.fuse.data import (BLOCK_NORM, BlockNorm, encode_labels, image_feature, load_blocks,
                                  resolve_features)
from phrasefuse.fuse.select import Trial, choose, cross_validation, sample_shots, stratified_subsample
from tests.fuse.conftest import generated_encoder, write_store


def test_missing_ids_get_zero_rows_and_indicator(tmp_path):
    ids = ["a", "b", "c", "d"]
    emb = np.eye(4, 3, dtype=np.float32) + 0.5
    write_store(tmp_path / "img", "image", ids, emb, generated_encoder("img", 3))
    write_store(tmp_path / "txt", "text", ["b", "d"], emb[[1, 3], :2], generated_encoder("txt", 2))
    features = resolve_features([str(tmp_path / "txt"), f"picture={tmp_path / 'img'}"])
    assert [f.name for f in features] == ["txt", "picture"]
    assert image_feature(features) == 1
    blocks = load_blocks(features, pa.array(["d", "a", "x", "b"]), "m.parquet")
    assert blocks.present.tolist() == [[True, True], [False, True], [False, False], [True, True]]
    assert np.array_equal(blocks.arrays[0][1], np.zeros(2)) and np.array_equal(blocks.arrays[0][0], emb[3, :2])
    norm = BlockNorm.fit(blocks.take(np.array([0, 1, 3])))
    design = norm.apply(blocks, scales=[0.5, 1.0])
    # per block: coordinates then the missing indicator (= the block's scale when missing)
    assert design.shape == (4, 2 + 1 + 3 + 1)
    assert design[:, 2].tolist() == [0.0, 0.5, 0.5, 0.0]
    assert design[:, 6].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert np.all(design[[1, 2], :2] == 0) and np.all(design[2, 3:6] == 0)
    # present training rows of a block have a root-mean-square norm of BLOCK_NORM x scale
    train = norm.apply(blocks.take(np.array([0, 1, 3])))
    assert np.sqrt(np.mean(np.sum(train[:, 3:6] ** 2, axis=1))) == pytest.approx(BLOCK_NORM, rel=1e-5)


def test_store_without_common_ids_is_refused(tmp_path):
    write_store(tmp_path / "img", "image", ["a", "b"], np.ones((2, 3), np.float32), generated_encoder("img", 3))
    with pytest.raises(BadInput, match="none of its 2 ids"):
        load_blocks(resolve_features([tmp_path / "img"]), pa.array(["x", "y"]), "m.parquet")


def test_bad_feature_arguments(tmp_path):
    write_store(tmp_path / "img", "image", ["a"], np.ones((1, 3), np.float32), generated_encoder("img", 3))
    with pytest.raises(BadInput, match="same store is given twice"):
        resolve_features([tmp_path / "img", f"other={tmp_path / 'img'}"])
    with pytest.raises(BadInput, match="no such folder"):
        resolve_features([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="not an embedding store"):
        resolve_features([tmp_path / "empty"])


def test_encode_labels():
    multi = encode_labels(pa.array([["a", "c"], [], ["z", "a"]]), ["a", "b", "c"], True)
    assert multi.y.tolist() == [[1, 0, 1], [0, 0, 0], [1, 0, 0]]
    assert multi.unknown.tolist() == [0, 0, 1]
    single = encode_labels(pa.array(["b", "z", "a"]), ["a", "b"], False)
    assert single.y.tolist() == [1, -1, 0]


def test_sample_shots_and_folds():
    y = np.repeat(np.arange(4), 10)
    rows = np.arange(40)
    shots = sample_shots(rows, y, False, 3, seed=5)
    assert np.bincount(y[shots]).tolist() == [3, 3, 3, 3]
    assert np.array_equal(shots, sample_shots(rows, y, False, 3, seed=5))
    assert not np.array_equal(shots, sample_shots(rows, y, False, 3, seed=6))
    scheme = cross_validation(shots, y, False, 3, seed=0)
    assert len(scheme.folds) == 3
    held = np.concatenate([s for _, s in scheme.folds])
    assert np.array_equal(np.sort(held), shots)  # every shot held out exactly once
    for fit_rows, score_rows in scheme.folds:
        assert np.bincount(y[score_rows], minlength=4).tolist() == [1, 1, 1, 1]  # stratified
        assert not set(fit_rows) & set(score_rows)
    assert cross_validation(sample_shots(rows, y, False, 1, 0), y, False, 1, 0).folds == []  # 1 shot: nothing to tune
    multi = np.zeros((40, 3))
    multi[:5, 0] = multi[10:30, 1] = multi[::7, 2] = 1
    picked = sample_shots(rows, multi, True, 2, seed=0)
    assert all(multi[picked, c].sum() >= 2 for c in range(3))


def test_stratified_subsample_keeps_proportions():
    y = np.r_[np.zeros(900, int), np.ones(90, int), np.full(10, 2)]
    sub = stratified_subsample(np.arange(1000), y, False, 100, seed=0)
    assert len(sub) == 100
    assert np.bincount(y[sub]).tolist() == [90, 9, 1]


def test_choose_prefers_the_simpler_unless_clearly_better():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.7).astype(float)
    same = base.copy()
    same[:4] = 1 - same[:4]  # a few flips: within noise
    better = np.maximum(base, rng.random(400) < 0.3)  # fixes ~30% of the errors
    assert choose([Trial({}, base, []), Trial({}, same, [])]) == 0
    assert choose([Trial({}, base, []), Trial({}, better, [])]) == 1
    assert choose([Trial({}, base, []), Trial({}, base.copy(), [])]) == 0  # a tie keeps the simpler
