"""The competition metric against scikit-learn's log loss, including Kaggle's normalisation and clipping."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import log_loss

from pipeline.core.metrics import EPS, accuracy, kaggle_log_loss, normalise_rows, prior_log_loss

K = 8
LABELS = list(range(K))


def _sk(y, proba):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on rows that do not sum to one after our clip
        return log_loss(y, proba, labels=LABELS)


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_probability_vectors(seed):
    rng = np.random.default_rng(seed)
    proba = rng.dirichlet(np.full(K, 0.5), size=200)
    y = rng.integers(0, K, 200)
    assert kaggle_log_loss(y, proba) == pytest.approx(_sk(y, proba), rel=1e-12)


def test_rows_not_summing_to_one_are_normalised_first():
    rng = np.random.default_rng(1)
    proba = rng.uniform(0.01, 3.0, size=(100, K))  # sums anywhere in (0.08, 24)
    y = rng.integers(0, K, 100)
    expected = _sk(y, proba / proba.sum(axis=1, keepdims=True))
    assert kaggle_log_loss(y, proba) == pytest.approx(expected, rel=1e-12)
    # ...and scaling a row by any positive factor does not change the score.
    assert kaggle_log_loss(y, proba * rng.uniform(0.1, 10, size=(100, 1))) == pytest.approx(
        expected, rel=1e-12
    )


def test_extreme_values_are_clipped_at_kaggles_epsilon():
    y = np.array([0, 1, 2, 3])
    proba = np.zeros((4, K))
    proba[0, 0] = 1.0  # certain and right
    proba[1, 0] = 1.0  # certain and wrong: the true class has probability 0
    proba[2, 2] = 1e-300  # true class tiny but not zero
    proba[2, 5] = 1.0
    proba[3, 3] = 0.5
    proba[3, 4] = 0.5
    expected = _sk(y, np.clip(normalise_rows(proba), EPS, 1 - EPS))
    assert kaggle_log_loss(y, proba) == pytest.approx(expected, rel=1e-12)
    # By hand: -log(1 - 1e-15), -log(1e-15) twice, -log(0.5), averaged.
    by_hand = (-np.log(1 - EPS) - 2 * np.log(EPS) - np.log(0.5)) / 4
    assert kaggle_log_loss(y, proba) == pytest.approx(by_hand, rel=1e-12)
    # A single confident mistake costs 34.5 nats: why the ensemble clips and tempers.
    assert kaggle_log_loss(y[1:2], proba[1:2]) == pytest.approx(-np.log(EPS))


def test_uniform_and_prior_baselines():
    y = np.array([0, 0, 0, 1, 4, 7])
    assert kaggle_log_loss(y, np.full((6, K), 1 / K)) == pytest.approx(np.log(8))  # 2.079, as NCFM.md says
    y_train = np.array([0, 0, 1, 1])
    expected = _sk(y[:4], np.tile([0.5, 0.5, 0, 0, 0, 0, 0, 0], (4, 1)))
    assert prior_log_loss(y_train, y[:4], K) == pytest.approx(expected, rel=1e-12)


def test_zero_rows_and_shape_mismatch_are_refused():
    with pytest.raises(ValueError, match="sums to zero"):
        kaggle_log_loss(np.array([0]), np.zeros((1, K)))
    with pytest.raises(ValueError, match="labels"):
        kaggle_log_loss(np.array([0, 1]), np.full((3, K), 1 / K))


def test_accuracy():
    assert accuracy(np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]])) == 0.5
