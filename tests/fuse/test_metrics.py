"""Metrics against hand-computed values on small cases (and scikit-learn where it has the same metric)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, label_ranking_average_precision_score

from phrasefuse.fuse.metrics import (average_precision, decide, example_scores, multiclass_metrics,
                                     multilabel_metrics, recall_at_precision, topk_accuracy)

VOCAB = ["a", "b", "c"]


def test_multiclass_by_hand():
    scores = np.array([[0.7, 0.2, 0.1],   # a, true a: top-1 hit
                       [0.5, 0.4, 0.1],   # a, true b: top-1 miss, top-2 hit
                       [0.1, 0.3, 0.6],   # c, true c: hit
                       [0.2, 0.5, 0.3],   # b, true c: miss (c is 2nd)
                       [0.3, 0.3, 0.4]])  # c, true: a label outside the vocabulary -> always wrong
    y = np.array([0, 1, 2, 2, -1])
    m = multiclass_metrics(scores, y, VOCAB)
    assert m["top1"] == pytest.approx(2 / 5)
    assert topk_accuracy(scores, y, 2) == pytest.approx(4 / 5)
    assert m["top5"] == pytest.approx(4 / 5)  # k capped at 3 classes; the unknown label never counts
    # per class: a 1/1, b 0/1, c 1/2
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 0.0, "c": 0.5}
    # F1: a tp1 fp1 fn0 -> 2/3; b tp0 fp1 fn1 -> 0; c tp1 fp1 fn1 -> 1/2
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 0.5) / 3)
    assert m["unknown_labels"] == 1


def test_macro_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.random((200, 5))
    y = rng.integers(0, 5, 200)
    m = multiclass_metrics(scores, y, list("vwxyz"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, scores.argmax(1), average="macro"))


def test_decide_threshold_and_cap():
    probs = np.array([[0.9, 0.8, 0.35, 0.1],
                      [0.2, 0.1, 0.05, 0.29]])
    assert decide(probs, 0.3, None).tolist() == [[True, True, True, False], [False, False, False, False]]
    assert decide(probs, 0.3, 2).tolist() == [[True, True, False, False], [False, False, False, False]]
    per_label = np.array([0.95, 0.5, 0.3, 0.25])
    assert decide(probs, per_label, None).tolist() == [[False, True, True, False], [False, False, False, True]]


def test_multilabel_micro_by_hand():
    probs = np.array([[0.9, 0.6, 0.2],
                      [0.4, 0.1, 0.8],
                      [0.1, 0.35, 0.05]])
    y = np.array([[1, 0, 0],
                  [1, 0, 1],
                  [0, 1, 1]], np.float32)
    unknown = np.array([0, 0, 1])  # row 3 also has a label the head does not know: a miss
    m = multilabel_metrics(probs, y, VOCAB, 0.3, None, unknown)
    # kept at 0.3: r1 {a, b}, r2 {a, c}, r3 {b} -> tp = a1, a2, c2, b3 = 4; fp = b1 = 1;
    # fn = c3 + the unknown label = 2
    assert m["micro_precision"] == pytest.approx(4 / 5)
    assert m["micro_recall"] == pytest.approx(4 / 6)
    assert m["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    capped = multilabel_metrics(probs, y, VOCAB, 0.3, 1, unknown)
    # at most one label: r1 a (tp), r2 c (tp), r3 b (tp) -> tp 3, fp 0, fn 3 (a2, c3, unknown)
    assert (capped["micro_precision"], capped["micro_recall"]) == (pytest.approx(1.0), pytest.approx(0.5))
    # AP per label: a: scores .9(+) .4(+) .1(-) -> 1.0; b: .6(-) .35(+) .1(-) -> 1/2;
    # c: .8(+) .2(-) .05(+) -> (1 + 2/3) / 2
    assert m["per_label_ap"] == {"a": pytest.approx(1.0), "b": pytest.approx(0.5), "c": pytest.approx(5 / 6)}
    assert m["mAP"] == pytest.approx((1 + 0.5 + 5 / 6) / 3)


def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scores = rng.integers(0, 5, 40) / 4.0  # many ties
        positive = rng.random(40) < 0.3
        if positive.any():
            assert average_precision(scores, positive) == pytest.approx(average_precision_score(positive, scores))


def test_recall_at_80_precision_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    positive = np.array([1, 1, 0, 1, 1, 0], bool)
    # precision at each cut: 1, 1, 2/3, 3/4, 4/5, 4/6 -> best recall with precision >= .8 is 4/4 at the 5th
    assert recall_at_precision(scores, positive, 0.8, 4) == pytest.approx(1.0)
    # one more positive the ranking never returns: recall out of 5
    assert recall_at_precision(scores, positive, 0.8, 5) == pytest.approx(4 / 5)
    assert recall_at_precision(scores, ~positive, 0.8, 2) == 0.0


def test_example_scores():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    assert example_scores(scores, np.array([1, 2]), False).tolist() == [1.0, 0.0]
    rng = np.random.default_rng(2)
    probs = rng.random((30, 6))
    y = (rng.random((30, 6)) < 0.3).astype(np.float32)
    y[0] = 0  # no labels: no score
    s = example_scores(probs, y, True)
    assert np.isnan(s[0])
    some = (y.sum(1) > 0) & (y.sum(1) < 6)  # scikit-learn scores rows with no (or all) labels as 1
    assert np.isnan(s[y.sum(1) == 0]).all()
    assert np.mean(s[some]) == pytest.approx(label_ranking_average_precision_score(y[some], probs[some]))
