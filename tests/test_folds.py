"""Folds: deterministic, stratified, and never sharing a boat when grouped."""

import numpy as np
import pytest

from pipeline.core.folds import assign_folds


def _data(seed=0, n=240, n_groups=12):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n)
    labels = rng.choice(4, n, p=[0.5, 0.2, 0.2, 0.1])
    return labels, groups


def test_grouped_folds_never_share_a_group():
    labels, groups = _data()
    folds = assign_folds(labels, groups, 5, "boat", seed=1)
    assert (folds >= 0).all()
    for g in np.unique(groups):
        assert len(np.unique(folds[groups == g])) == 1, f"group {g} is split across folds"


def test_folds_are_deterministic_and_seed_dependent():
    labels, groups = _data()
    a = assign_folds(labels, groups, 5, "boat", seed=1)
    b = assign_folds(labels, groups, 5, "boat", seed=1)
    c = assign_folds(labels, groups, 5, "none", seed=2)
    d = assign_folds(labels, groups, 5, "none", seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(c, d)


def test_random_folds_are_stratified():
    labels, groups = _data(n=1000)
    folds = assign_folds(labels, groups, 5, "none", seed=0)
    overall = np.bincount(labels) / len(labels)
    for k in range(5):
        share = np.bincount(labels[folds == k], minlength=4) / (folds == k).sum()
        np.testing.assert_allclose(share, overall, atol=0.02)


def test_every_class_in_every_training_fold():
    labels, groups = _data()
    folds = assign_folds(labels, groups, 5, "boat", seed=0)
    for k in range(5):
        assert set(labels[folds != k]) == set(labels)


def test_too_few_groups_is_a_clear_error():
    labels, _ = _data()
    with pytest.raises(ValueError, match="boat groups"):
        assign_folds(labels, np.zeros(len(labels)), 5, "boat", seed=0)
