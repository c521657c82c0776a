"""The competition metric, computed exactly as Kaggle does, and a few companions.

Kaggle's multi-class log loss divides each row by its sum, clips every probability to [1e-15, 1 - 1e-15]
and averages -log p(true class). Everything that reports a "log loss" in this project goes through
`kaggle_log_loss`, and the tests hold it to scikit-learn's `log_loss`.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-15


def normalise_rows(proba: np.ndarray) -> np.ndarray:
    """Divide each row by its sum, as Kaggle does before scoring."""
    proba = np.asarray(proba, dtype=np.float64)
    sums = proba.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise ValueError("a row of probabilities sums to zero or less; it cannot be normalised")
    return proba / sums


def kaggle_log_loss(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Multi-class log loss of integer labels `y_true` against an (n, k) probability matrix."""
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.clip(normalise_rows(proba), EPS, 1 - EPS)
    if proba.shape[0] != y_true.shape[0]:
        raise ValueError(f"{y_true.shape[0]} labels but {proba.shape[0]} prediction rows")
    return float(-np.mean(np.log(proba[np.arange(len(y_true)), y_true])))


def accuracy(y_true: np.ndarray, proba: np.ndarray) -> float:
    return float(np.mean(np.argmax(proba, axis=1) == np.asarray(y_true)))


def prior_log_loss(y_train: np.ndarray, y_eval: np.ndarray, n_classes: int) -> float:
    """The score of predicting the training class shares for every image: the baseline to beat."""
    shares = np.bincount(y_train, minlength=n_classes) / len(y_train)
    return kaggle_log_loss(y_eval, np.tile(shares, (len(y_eval), 1)))
