"""The label prior: its weight on held-out rows or on the shots (labeltext.calibrate_prior), and its label texts."""

from __future__ import annotations

import numpy as np
import pytest

from phrasefuse.fuse.labeltext import (LR_CRITICAL, apply_prior, calibrate_prior, calibrate_prior_on_training_rows,
                                       choose_prior_weight, embed_texts, label_texts, label_words, mean_per_group)


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


def held_out_and_training(seed: int, signal: float, held_out_signal: float | None = None):
    """5 shots of 10 classes: 10 held-out rows (1 per class, a head right on half of them) and the
    50 training rows; the prior's scores on both (`held_out_signal` on the held-out rows if given)."""
    rng = np.random.default_rng(seed)
    y_out, y_train = np.arange(10), np.repeat(np.arange(10), 5)
    sig = signal if held_out_signal is None else held_out_signal
    return (head_probs(rng, y_out, 10, 0.5), prior_scores(rng, y_out, 10, sig), y_out,
            prior_scores(rng, y_train, 10, signal), y_train)


def test_inconclusive_held_out_rows_fall_back_on_the_prior_alone_on_the_training_rows():
    probs, cos, y, train_cos, train_y = held_out_and_training(3, 0.3, held_out_signal=0.05)
    held_out = calibrate_prior(probs, cos, y)
    assert held_out.weight == 0.0  # 10 held-out rows of a weak signal: inconclusive
    fit = calibrate_prior_on_training_rows(held_out, probs, cos, y, train_cos, train_y)
    assert fit.weight == fit.fitted > 0 and fit.rows == 50 and "inconclusive there" in fit.rule
    weight, record = choose_prior_weight(probs, cos, y, trained=(train_cos, train_y))
    assert weight == fit.weight and record["rule"] == fit.rule and record["grid"]
    assert choose_prior_weight(probs, cos, y)[0] == 0.0  # without the training rows: no second look


def test_the_second_look_keeps_a_noise_prior_out_and_a_costly_one_too():
    kept = 0
    for seed in range(20):  # noise everywhere: the prior alone must pass its own permutation test
        probs, cos, y, train_cos, train_y = held_out_and_training(400 + seed, 0.0)
        kept += choose_prior_weight(probs, cos, y, trained=(train_cos, train_y))[0] > 0
    assert kept <= 4  # 5% of 20 is 1
    # informative on the training rows, but pointing at the wrong class on the held-out rows
    probs, _, y, train_cos, train_y = held_out_and_training(7, 0.3)
    wrong = prior_scores(np.random.default_rng(8), (y + 1) % 10, 10, 0.5)
    fit = calibrate_prior_on_training_rows(calibrate_prior(probs, wrong, y), probs, wrong, y, train_cos, train_y)
    assert fit.weight == 0.0 and fit.fitted > 0 and fit.top1 < 0


def test_a_conclusive_held_out_fit_is_kept_as_it_is():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(8), 10)
    probs, cos = head_probs(rng, y, 8, 0.6), prior_scores(rng, y, 8, 0.2)
    held_out = calibrate_prior(probs, cos, y)
    assert held_out.weight > 0
    assert calibrate_prior_on_training_rows(held_out, probs, cos, y, cos, y) is held_out


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
