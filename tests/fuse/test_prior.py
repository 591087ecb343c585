"""The label prior: its weight on held-out rows or on the shots (labeltext.calibrate_prior), and its label texts."""

from __future__ import annotations

import numpy as np
import pytest

from phrasefuse.fuse.labeltext import (LR_CRITICAL, apply_prior, calibrate_prior, embed_texts, label_texts, label_words,
                                       mean_per_group)


def prior_scores(rng, y: np.ndarray, classes: int, signal: float) -> np.ndarray:
    """Cosine-like scores: `signal` on the true class, plus noise of sd 0.1."""
    cos = 0.1 * rng.standard_normal((len(y), classes))
    cos[np.arange(len(y)), y] += signal
    return cos.astype(np.float32)


def head_probs(rng, y: np.ndarray, classes: int, right: float) -> np.ndarray:
    """A held-out head right on a fraction `right` of the rows, with probability 0.6 on its guess."""
    guess = np.where(rng.random(len(y)) < right, y, rng.integers(0, classes, len(y)))
    probs = np.full((len(y), classes), 0.4 / (classes - 1))
    probs[np.arange(len(y)), guess] = 0.6
    return probs


@pytest.mark.parametrize("seed", range(8))
def test_a_noise_prior_is_left_out(seed):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), 5)
    fit = calibrate_prior(head_probs(rng, y, 10, 0.5), prior_scores(rng, y, 10, 0.0), y)
    assert fit.weight == 0.0 or fit.lr > LR_CRITICAL  # left out unless the test (wrongly, 5%) passes
    assert fit.weight < 5.0  # and a noise prior never gets a large weight


def test_noise_priors_are_kept_at_most_at_the_test_level():
    kept = 0
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        y = np.repeat(np.arange(10), 5)
        kept += calibrate_prior(head_probs(rng, y, 10, 0.5), prior_scores(rng, y, 10, 0.0), y).weight > 0
    assert kept <= 6  # 5% of 40 is 2; 6 leaves room for chance, not for a broken test


def test_an_informative_prior_is_kept_and_helps():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(8), 10)
    probs, cos = head_probs(rng, y, 8, 0.6), prior_scores(rng, y, 8, 0.2)
    fit = calibrate_prior(probs, cos, y)
    assert fit.weight == fit.fitted > 0 and fit.lr > LR_CRITICAL and fit.top1 > 0
    assert "shuffled across the rows" in fit.rule and fit.rows == 80
    new_probs, new_cos = head_probs(rng, y, 8, 0.6), prior_scores(rng, y, 8, 0.2)  # rows it was not fitted on
    assert np.mean(np.argmax(apply_prior(new_probs, new_cos, fit.weight), 1) == y) > \
        np.mean(np.argmax(new_probs, 1) == y) + 0.1
    sharper = calibrate_prior(probs, prior_scores(rng, y, 8, 0.4), y)
    assert sharper.weight > fit.weight  # a sharper prior earns a larger weight


def test_without_shots_given_the_prior_is_left_out():
    fit = calibrate_prior(None, np.zeros((0, 10), np.float32), np.zeros(0, np.int64))
    assert fit.weight == 0.0 and "1 labelled example per class" in fit.rule


def one_shot(seed: int, classes: int, signal: float, wrong: bool = False):
    """1 shot per class; the prior's scores, pointing at the next class when `wrong` (shuffled names)."""
    rng = np.random.default_rng(seed)
    y = np.arange(classes)
    return rng, y, prior_scores(rng, (y + 1) % classes if wrong else y, classes, signal)


def test_at_one_shot_a_noise_or_wrong_prior_is_left_out():
    kept_noise = sum(calibrate_prior(None, one_shot(200 + s, 10, 0.0)[2], np.arange(10)).weight > 0
                     for s in range(40))
    assert kept_noise <= 6  # a permutation test at 5%: 2 of 40 expected, 6 leaves room for chance
    for s in range(10):  # a confident prior pointing at the wrong classes never passes
        _, y, cos = one_shot(300 + s, 10, 0.5, wrong=True)
        assert calibrate_prior(None, cos, y).weight == 0.0


def test_at_one_shot_an_informative_prior_is_kept_and_helps():
    rng, y, cos = one_shot(4, 10, 0.3)
    fit = calibrate_prior(None, cos, y)
    assert fit.weight == fit.fitted > 0 and fit.lr > LR_CRITICAL and fit.rows == 10
    assert "never trained on the shots" in fit.rule
    test_y = np.repeat(np.arange(10), 30)  # new rows: a weak 1-shot head, and the prior on them
    probs, new_cos = head_probs(rng, test_y, 10, 0.35), prior_scores(rng, test_y, 10, 0.3)
    assert np.mean(np.argmax(apply_prior(probs, new_cos, fit.weight), 1) == test_y) > \
        np.mean(np.argmax(probs, 1) == test_y) + 0.1
    weaker = calibrate_prior(None, one_shot(4, 10, 0.15)[2], y)
    assert weaker.fitted < fit.fitted  # a weaker prior earns a smaller weight


def test_unseen_labels_are_left_out():
    rng = np.random.default_rng(3)
    y = np.r_[np.repeat(np.arange(10), 4), -1, -1]
    fit = calibrate_prior(head_probs(rng, np.maximum(y, 0), 10, 0.5), prior_scores(rng, np.maximum(y, 0), 10, 0.3), y)
    assert fit.rows == 40 and fit.weight > 0
    assert calibrate_prior(np.full((1, 10), 0.1), np.zeros((1, 10)), np.array([3])).weight == 0.0


def test_label_names_become_words_in_several_templates():
    assert [label_words(n) for n in ("car_side", "Faces_easy", "BACKGROUND_Google", "FacesEasy", "airplane",
                                     "t-shirt", "___")] == \
        ["car side", "faces easy", "background google", "faces easy", "airplane", "t shirt", "___"]
    texts = label_texts(["car_side", "cat"], None, prompts=True)
    assert texts[0][0] == "car side" and "a photo of a car side" in texts[0] and len(texts[1]) == len(texts[0]) > 1
    assert label_texts(["car_side"], None) == ["car_side"]  # names as they are unless asked
    # descriptions are embedded as written
    assert label_texts(["cat"], {"cat": "a small feline"}, prompts=True) == ["a small feline"]


def test_several_texts_of_a_label_are_averaged(tiny_clip_spec):
    single, _ = embed_texts(["a cat", "a dog"], tiny_clip_spec)
    mixed, _ = embed_texts([["a cat", "a dog"], "a dog"], tiny_clip_spec)
    assert mixed.shape == single.shape
    expected = single.sum(0) / np.linalg.norm(single.sum(0))
    np.testing.assert_allclose(mixed[0], expected, atol=1e-5)
    np.testing.assert_allclose(mixed[1], single[1], atol=1e-5)
    np.testing.assert_allclose(mean_per_group(single, [2])[0], expected, atol=1e-6)
