"""Calibration of class probabilities for a log-loss leaderboard: temperature, clipping, class priors, and
smoothing over bursts of near-identical frames.

Log loss punishes a confident mistake without limit, and networks trained on a few thousand near-duplicate
frames are overconfident (NCFM.md: every strong team clipped or calibrated). Everything here is fit on
out-of-fold predictions only and is guaranteed never to raise the OOF log loss it was fit on: temperature 1
and "no clipping" are always candidates, and a fitted setting is kept only when it scores lower. The
class-prior correction is different: it is never fit, it re-weights test predictions from the training
class mix to a target mix the user declares (stage 2's boats had a different one), so it has no OOF score.

Clipping comes in two shapes: one floor and ceiling for every class (`fit_clip`, a grid search), or a floor
per class on top of that (`fit_class_floors`, coordinate descent over the same grid of floors), which is what
the strong entries did by hand (a higher floor for BET and YFT, the classes a confident ALB hides). Smoothing
(`smooth`, `fit_smoothing`) mixes each frame's prediction with the mean over its burst (the frames of one
catch, `pipeline.core.boat_groups.bursts`), as the 1st-place team averaged over visually similar frames; the
mixing weight is fit on OOF rows whose bursts never cross a fold.

All functions are pure and take (n, k) probability arrays in `FISH_CLASSES` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from pipeline.core.metrics import EPS, kaggle_log_loss, normalise_rows

#: Search range for the inverse temperature 1/T. The NLL of softmax(beta * log p) is convex in beta, so a
#: bounded Brent search finds the optimum; 0.02..20 covers "almost uniform" to "almost one-hot".
BETA_BOUNDS = (0.02, 20.0)

#: Candidate floors and ceilings for clipping. (0, 1) comes first so that a tie keeps the predictions as they
#: are; fast.ai's fisheries clip, [(1 - 0.82) / 7, 0.82], is on the grid.
CLIP_FLOORS: tuple[float, ...] = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.015, 0.02, (1 - 0.82) / 7, 0.03, 0.05)
CLIP_CEILINGS: tuple[float, ...] = (1.0, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.82, 0.8)

#: Weights of the burst mean tried by `fit_smoothing` (1: every frame of a burst gets the burst's mean).
SMOOTHING_WEIGHTS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)

#: Coordinate-descent sweeps over the classes in `fit_class_floors`; a third sweep changed nothing on the demo.
CLASS_FLOOR_SWEEPS = 2


def log_proba(proba: np.ndarray, floor: float = EPS) -> np.ndarray:
    """Natural log of row-normalised probabilities, floored so that a zero never becomes -inf."""
    return np.log(np.clip(normalise_rows(proba), floor, 1.0))


def logsumexp_rows(z: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(z))), stable; a few times faster than scipy's general version on (n, 8) arrays."""
    top = z.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(logits - logsumexp_rows(logits)[:, None])


# ------------------------------------------------------------------------------------------ temperature


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens, T < 1 sharpens; T == 1 returns the (normalised) input unchanged."""
    if temperature == 1.0:
        return normalise_rows(proba)
    return softmax(log_proba(proba) / temperature)


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the log loss of `proba` against `y`; 1.0 unless it strictly helps."""
    logp = log_proba(proba)
    y = np.asarray(y, dtype=np.int64)
    rows = np.arange(len(y))

    def nll(beta: float) -> float:
        z = beta * logp
        return float(np.mean(logsumexp_rows(z) - z[rows, y]))

    beta = float(minimize_scalar(nll, bounds=BETA_BOUNDS, method="bounded").x)
    temperature = 1.0 / beta
    # The smooth NLL above ignores Kaggle's 1e-15 clip; judge the candidate by the real metric.
    if kaggle_log_loss(y, apply_temperature(proba, temperature)) < kaggle_log_loss(y, proba):
        return temperature
    return 1.0


# --------------------------------------------------------------------------------------------- clipping


def apply_clip(proba: np.ndarray, floor: float | np.ndarray, ceiling: float) -> np.ndarray:
    """Clip every probability to [floor, ceiling], then renormalise each row (a submission must sum to 1).

    `floor` may be one number or one per class (a (k,) vector)."""
    return normalise_rows(np.clip(normalise_rows(proba), np.asarray(floor, dtype=np.float64), ceiling))


def _losses(variants: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kaggle's log loss of each of a stack of (n, k) predictions, at once (`kaggle_log_loss` per variant)."""
    rows = np.arange(len(y))
    true = variants[:, rows, y] / variants.sum(axis=2)
    return -np.mean(np.log(np.clip(true, EPS, 1 - EPS)), axis=1)


def _clipped(proba: np.ndarray, floors: np.ndarray, ceilings: np.ndarray) -> np.ndarray:
    """(g, n, k) stack: `proba` clipped to each (floors[g], ceilings[g]); floors[g] may be per class."""
    floors = np.asarray(floors, dtype=np.float64)
    floors = floors[:, None, None] if floors.ndim == 1 else floors[:, None, :]
    return np.clip(normalise_rows(proba)[None], floors, np.asarray(ceilings, dtype=np.float64)[:, None, None])


def fit_clip(
    proba: np.ndarray,
    y: np.ndarray,
    floors: Sequence[float] = CLIP_FLOORS,
    ceilings: Sequence[float] = CLIP_CEILINGS,
) -> tuple[float, float]:
    """The (floor, ceiling) pair of the grid with the lowest log loss; (0, 1), i.e. no clipping, on ties."""
    k = proba.shape[1]
    y = np.asarray(y, dtype=np.int64)
    # A floor above 1/k or a ceiling below it cannot leave a valid probability vector.
    pairs = [(f, c) for f in floors for c in ceilings if f < 1.0 / k < c and (f, c) != (0.0, 1.0)]
    best, best_loss = (0.0, 1.0), kaggle_log_loss(y, proba)
    if not pairs:
        return best
    grid = np.array(pairs)
    for pair, loss in zip(pairs, _losses(_clipped(proba, grid[:, 0], grid[:, 1]), y), strict=True):
        if loss < best_loss - 1e-12:  # in grid order, as a plain loop over the pairs would
            best, best_loss = pair, loss
    return best


def fit_class_floors(
    proba: np.ndarray,
    y: np.ndarray,
    floor: float,
    ceiling: float,
    grid: Sequence[float] = CLIP_FLOORS,
    sweeps: int = CLASS_FLOOR_SWEEPS,
) -> tuple[float, ...]:
    """One floor per class, starting from the global `floor` (at the global `ceiling`): coordinate descent
    over `grid`, a class's floor moving only when that strictly lowers the log loss, so the result is never
    worse on these rows than the global clip it started from."""
    k = proba.shape[1]
    y = np.asarray(y, dtype=np.int64)
    floors = np.full(k, float(floor))
    best = kaggle_log_loss(y, apply_clip(proba, floors, ceiling))
    values = [v for v in grid if v < min(ceiling, 1.0 / k)]
    for _ in range(sweeps):
        moved = False
        for c in range(k):
            # Every value of this class's floor at once; the others stay where they are.
            trials = np.tile(floors, (len(values), 1))
            trials[:, c] = values
            losses = _losses(_clipped(proba, trials, np.full(len(values), ceiling)), y)
            for value, loss in zip(values, losses, strict=True):
                if loss < best - 1e-12:
                    floors[c], best, moved = value, loss, True
        if not moved:
            break
    return tuple(float(f) for f in floors)


# ----------------------------------------------------------------------------------------- burst smoothing


def smooth(proba: np.ndarray, groups: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) * p + weight * (mean of p over the row's group); rows alone in their group are unchanged.

    `groups` holds one key per row: the burst for a test set, (fold, burst) for OOF rows, so that smoothing
    never mixes rows that different models predicted.
    """
    proba = normalise_rows(proba)
    if weight == 0.0:
        return proba
    _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    sums = np.zeros((len(counts), proba.shape[1]))
    np.add.at(sums, inverse, proba)
    return (1.0 - weight) * proba + weight * sums[inverse] / counts[inverse, None]


def fit_smoothing(
    proba: np.ndarray, y: np.ndarray, groups: np.ndarray, temperature: bool,
    weights: Sequence[float] = SMOOTHING_WEIGHTS,
) -> tuple[float, float]:
    """The smoothing weight (from `weights`, none of them 0) with the lowest log loss, and the temperature fit
    after it (1.0 without `temperature`): a burst's mean is less confident than its frames, so the temperature
    that suits smoothed predictions is not the one that suits raw ones."""
    best = None
    for weight in weights:
        smoothed = smooth(proba, groups, weight)
        t = fit_temperature(smoothed, y) if temperature else 1.0
        loss = kaggle_log_loss(y, apply_temperature(smoothed, t))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, weight, t)
    return best[1], best[2]


# ----------------------------------------------------------------------------------------- class prior


def class_shares(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Class shares of integer labels; an absent class gets half a count so that no share is zero."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    counts[counts == 0] = 0.5
    return counts / counts.sum()


def read_prior_file(path: str | Path, classes: Sequence[str]) -> np.ndarray:
    """Target shares from a CSV with columns `class,share` (any positive scale; renormalised here)."""
    table = pd.read_csv(path)
    if list(table.columns) != ["class", "share"]:
        raise ValueError(
            f"{path}: expected the header 'class,share', got {','.join(map(str, table.columns))}"
        )
    shares = dict(
        zip(table["class"].astype(str), pd.to_numeric(table["share"], errors="coerce"), strict=True)
    )
    missing = [c for c in classes if c not in shares]
    unknown = sorted(set(shares) - set(classes))
    if missing or unknown:
        raise ValueError(f"{path}: classes missing {missing}, unknown {unknown}; expected {list(classes)}")
    values = np.array([shares[c] for c in classes], dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{path}: every share must be a positive number, got {values.tolist()}")
    return values / values.sum()


def target_prior(setting: str, classes: Sequence[str]) -> np.ndarray | None:
    """`ensemble.prior` → target class shares; None for `train` (the model's own prior: no correction)."""
    if setting == "train":
        return None
    if setting == "uniform":
        return np.full(len(classes), 1.0 / len(classes))
    if not Path(setting).is_file():
        raise ValueError(
            f"ensemble.prior: {setting!r} is neither 'train', 'uniform' nor an existing CSV file "
            "of class shares"
        )
    return read_prior_file(setting, classes)


def apply_prior(proba: np.ndarray, train_shares: np.ndarray, target_shares: np.ndarray | None) -> np.ndarray:
    """Bayes' rule for a shifted class mix: p_k * target_k / train_k, renormalised per row."""
    if target_shares is None:
        return normalise_rows(proba)
    return normalise_rows(normalise_rows(proba) * (np.asarray(target_shares) / np.asarray(train_shares)))


# ---------------------------------------------------------------------------------------- reliability


def reliability_curve(proba: np.ndarray, y: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Top-label reliability: per confidence bin, the mean confidence, the accuracy and the row count."""
    proba = normalise_rows(proba)
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            rows.append(
                (edges[b], edges[b + 1], confidence[mask].mean(), correct[mask].mean(), int(mask.sum()))
            )
    return pd.DataFrame(rows, columns=["lo", "hi", "confidence", "accuracy", "count"])


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    curve = reliability_curve(proba, y, n_bins)
    return float(
        np.sum(curve["count"] * np.abs(curve["confidence"] - curve["accuracy"])) / curve["count"].sum()
    )


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], n_bins: int = 10):
    """A reliability diagram (left) and confidence histogram (right) for each labelled (proba, y) pair."""
    import matplotlib

    matplotlib.use("Agg")  # stages run headless
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for label, (proba, y) in curves.items():
        curve = reliability_curve(proba, y, n_bins)
        loss = kaggle_log_loss(y, proba)
        ece = expected_calibration_error(proba, y, n_bins)
        ax.plot(
            curve["confidence"],
            curve["accuracy"],
            marker="o",
            label=f"{label} (OOF {loss:.3f}, ECE {ece:.3f})",
        )
        hist.hist(normalise_rows(proba).max(axis=1), bins=n_bins, range=(0, 1), histtype="step", label=label)
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("Reliability on out-of-fold predictions")
    ax.legend(fontsize=8, loc="upper left")
    hist.set(xlabel="confidence", ylabel="images", title="Confidence histogram")
    hist.legend(fontsize=8)
    fig.tight_layout()
    return fig
