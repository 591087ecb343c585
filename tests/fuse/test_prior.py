"""The label prior's calibration on labelled rows (labeltext.calibrate_prior): arrays in, arrays out."""

from __future__ import annotations

import numpy as np
import pytest

from phrasefuse.fuse.labeltext import apply_prior, calibrate_prior


def prior_scores(rng, y: np.ndarray, classes: int, signal: float) -> np.ndarray:
    """Cosine-like scores: `signal` on the true class, plus noise of sd 0.1."""
    cos = 0.1 * rng.standard_normal((len(y), classes))
    cos[np.arange(len(y)), y] += signal
    return cos.astype(np.float32)


@pytest.mark.parametrize("shots", [1, 3])
@pytest.mark.parametrize("seed", range(5))
def test_a_noise_prior_is_never_kept(shots, seed):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), shots)
    fit = calibrate_prior(prior_scores(rng, y, 10, 0.0), y)
    assert fit.weight == 0.0 and fit.gain - 2 * fit.se <= 0, fit


def test_an_informative_prior_is_kept_with_its_likelihood_weight():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 3)
    fit = calibrate_prior(prior_scores(rng, y, 10, 0.15), y)
    assert fit.weight == fit.fitted > 0 and fit.gain > 2 * fit.se
    assert "the uniform guess" in fit.rule and fit.rows == 30
    sharper = calibrate_prior(prior_scores(rng, y, 10, 0.2), y)
    assert sharper.weight > fit.weight  # a sharper prior earns a larger weight


def test_against_held_out_head_probabilities():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(8), 10)
    # a head right on 60% of the rows, fairly confident; a prior that knows the class
    guess = np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, 8, len(y)))
    probs = np.full((len(y), 8), 0.3 / 7)
    probs[np.arange(len(y)), guess] = 0.7
    fit = calibrate_prior(prior_scores(rng, y, 8, 0.4), y, probs)
    assert fit.weight > 0 and fit.top1 > 0 and fit.base == "the head alone"
    assert np.mean(np.argmax(apply_prior(probs, prior_scores(rng, y, 8, 0.4), fit.weight), 1) == y) > 0.8
    # a prior that is noise against the same head: left out
    noise = calibrate_prior(prior_scores(rng, y, 8, 0.0), y, probs)
    assert noise.weight == 0.0


def test_unseen_labels_are_left_out_and_too_few_rows_keep_nothing():
    rng = np.random.default_rng(2)
    y = np.r_[np.arange(10), -1, -1]
    cos = prior_scores(rng, np.maximum(y, 0), 10, 0.5)
    assert calibrate_prior(cos, y).rows == 10
    one = calibrate_prior(cos[:1], y[:1])
    assert one.weight == 0.0 and one.rule.startswith("fewer than 2")
