"""Temperature scaling, clipping and the class-prior correction: fit on OOF, never worse where fit."""

import numpy as np
import pandas as pd
import pytest

from pipeline.core import calibration as cal
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.metrics import kaggle_log_loss

K = len(FISH_CLASSES)


def calibrated_logits(n, seed, signal=2.0):
    """Logits and labels drawn from their own softmax: softmax(z) is perfectly calibrated for y."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, signal, (n, K))
    p = cal.softmax(z)
    y = np.array([rng.choice(K, p=row) for row in p])
    return z, y


@pytest.mark.parametrize("sharpness", [0.3, 1.0, 3.0, 30.0])
@pytest.mark.parametrize("seed", range(3))
def test_temperature_never_raises_oof_loss(sharpness, seed):
    z, y = calibrated_logits(300, seed)
    proba = cal.softmax(z * sharpness)  # < 1: underconfident, > 1: overconfident
    t = cal.fit_temperature(proba, y)
    assert kaggle_log_loss(y, cal.apply_temperature(proba, t)) <= kaggle_log_loss(y, proba) + 1e-12


def test_temperature_never_raises_loss_with_hard_zeros_and_ones():
    rng = np.random.default_rng(3)
    y = rng.integers(0, K, 200)
    proba = np.eye(K)[rng.integers(0, K, 200)]  # one-hot guesses, mostly wrong: 1e-15 on the true class
    proba[:50] = np.eye(K)[y[:50]]
    t = cal.fit_temperature(proba, y)
    assert t > 1  # it must soften
    assert kaggle_log_loss(y, cal.apply_temperature(proba, t)) < kaggle_log_loss(y, proba)


def test_temperature_recovers_a_known_overconfidence():
    z, y = calibrated_logits(4000, 7)
    t = cal.fit_temperature(cal.softmax(z * 2.0), y)
    assert t == pytest.approx(2.0, rel=0.1)


def test_temperature_one_is_the_identity():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(K), size=20)
    np.testing.assert_allclose(cal.apply_temperature(proba, 1.0), proba)
    # a calibrated model keeps T close to 1
    z, y = calibrated_logits(4000, 8)
    assert cal.fit_temperature(cal.softmax(z), y) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("seed", range(4))
def test_clip_never_raises_oof_loss_and_keeps_rows_normalised(seed):
    z, y = calibrated_logits(300, seed)
    proba = cal.softmax(z * (1 + 4 * seed))
    floor, ceiling = cal.fit_clip(proba, y)
    clipped = cal.apply_clip(proba, floor, ceiling)
    assert kaggle_log_loss(y, clipped) <= kaggle_log_loss(y, proba) + 1e-12
    np.testing.assert_allclose(clipped.sum(axis=1), 1.0)


def test_clip_floors_confident_mistakes_and_leaves_good_predictions_alone():
    rng = np.random.default_rng(5)
    y = rng.integers(0, K, 400)
    guess = np.where(rng.random(400) < 0.8, y, (y + 1) % K)  # 20 % confident mistakes
    proba = np.full((400, K), 1e-9)
    proba[np.arange(400), guess] = 1.0
    floor, ceiling = cal.fit_clip(proba, y)
    assert floor > 0 and ceiling < 1
    assert kaggle_log_loss(y, cal.apply_clip(proba, floor, ceiling)) < 0.25 * kaggle_log_loss(y, proba)
    # Right and reasonably confident every time: nothing to gain, so no clipping.
    good = np.full((400, K), 0.02)
    good[np.arange(400), y] = 0.86
    assert cal.fit_clip(good, y) == (0.0, 1.0)


def test_prior_correction_by_hand():
    train = np.array([0.5, 0.5])
    target = np.array([0.2, 0.8])
    proba = np.array([[0.5, 0.5], [0.9, 0.1]])
    # p * target / train = [0.2, 0.8] and [0.36, 0.16] -> [0.6923, 0.3077]
    expected = np.array([[0.2, 0.8], [0.36 / 0.52, 0.16 / 0.52]])
    np.testing.assert_allclose(cal.apply_prior(proba, train, target), expected)
    np.testing.assert_allclose(cal.apply_prior(proba, train, None), proba)  # prior: train


def test_target_prior_settings(tmp_path):
    assert cal.target_prior("train", FISH_CLASSES) is None
    np.testing.assert_allclose(cal.target_prior("uniform", FISH_CLASSES), np.full(K, 1 / K))
    shares = tmp_path / "shares.csv"
    pd.DataFrame({"class": list(FISH_CLASSES), "share": np.arange(1, K + 1)}).to_csv(shares, index=False)
    np.testing.assert_allclose(cal.target_prior(str(shares), FISH_CLASSES), np.arange(1, K + 1) / 36)
    with pytest.raises(ValueError, match="neither"):
        cal.target_prior("uniformm", FISH_CLASSES)
    pd.DataFrame({"class": list(FISH_CLASSES[:-1]), "share": 1.0}).to_csv(shares, index=False)
    with pytest.raises(ValueError, match="missing \\['YFT'\\]"):
        cal.target_prior(str(shares), FISH_CLASSES)
    pd.DataFrame({"class": list(FISH_CLASSES), "share": [0.0] + [1.0] * (K - 1)}).to_csv(shares, index=False)
    with pytest.raises(ValueError, match="positive"):
        cal.target_prior(str(shares), FISH_CLASSES)


def test_class_shares_never_zero():
    shares = cal.class_shares(np.array([0, 0, 1]), 3)
    assert shares[2] > 0 and shares.sum() == pytest.approx(1.0)


def test_reliability_curve_and_figure(tmp_path):
    z, y = calibrated_logits(500, 2)
    proba = cal.softmax(z)
    curve = cal.reliability_curve(proba, y, n_bins=10)
    assert curve["count"].sum() == 500
    assert cal.expected_calibration_error(proba, y) < cal.expected_calibration_error(cal.softmax(5 * z), y)
    fig = cal.plot_reliability({"calibrated": (proba, y), "overconfident": (cal.softmax(5 * z), y)})
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
