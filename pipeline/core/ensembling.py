"""The ensemble's maths: combiners, stacking, calibration steps, nested cross-validation. Pure functions.

Every combiner and every calibration step is fit on the out-of-fold (OOF) predictions only, never on a test
set. The combiners: `mean`; `weighted` (simplex weights minimising OOF log loss); `geometric` (renormalised
product); `stacking` (a multinomial logistic regression on the models' OOF log-probabilities); `best` (the
best single model). Each model is temperature-scaled before combining, the combination is temperature-scaled
again and optionally clipped (`pipeline.core.calibration`); test predictions may then be re-weighted to a
target class prior.

How honest each reported OOF log loss is, and why it matters on a leaderboard that punishes overconfidence:
- `stacking` is cross-fitted over the same folds as the `fold` column of oof.csv: the stacker that predicts
  fold k was fit on the other folds only, so its OOF score is out-of-fold for the stacker too (its L2 strength
  is picked from `ensemble.stacking_c` on the OOF rows).
- `weighted`, the temperatures and the clip are fit on all OOF rows and scored on the same rows: a handful of
  parameters, slightly optimistic.
- `oof_logloss_nested_cv` refits *everything* (temperatures, weights, model choice, stacker, clip) on the
  other folds for each fold: the honest estimate for every method, reported beside the headline number.

`Fitted` is everything learnt; `predict` applies it. The ensemble stage writes a `Fitted` into its report
(`fitted_to_json`) and the served MLflow model reads it back (`fitted_from_json`) and calls the same `predict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from pipeline.core import calibration as cal
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.metrics import EPS, accuracy, kaggle_log_loss, normalise_rows
from pipeline.core.params import Ensemble
from pipeline.core.predictions import Predictions

METHODS: tuple[str, ...] = ("mean", "weighted", "geometric", "stacking", "best")

#: Stacking features are log-probabilities floored here: a few near-zero probabilities (log 1e-15 = -34.5)
#: would otherwise dominate an L2-regularised fit whose other features live in [-14, 0].
STACK_FEATURE_FLOOR = 1e-6


# --------------------------------------------------------------------------------------------- combiners


def combine_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return normalise_rows(np.tensordot(np.asarray(weights, dtype=np.float64), stack, axes=1))


def combine_geometric(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    logs = np.stack([cal.log_proba(p) for p in stack])
    return cal.softmax(np.tensordot(np.asarray(weights, dtype=np.float64), logs, axes=1))


def fit_simplex_weights(stack: np.ndarray, y: np.ndarray, tempered: bool = False) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the OOF log loss of the weighted mean.

    Without `tempered`, the loss -mean(log(q @ w)) (q: each model's probability of the true class) is convex
    in w. With it, the weights are fit jointly with the inverse temperature applied after combining, because
    the best mix before tempering is not the best one after (averaging several models makes the mean
    underconfident, and the temperature then rewards a broader mix). Either way every single model (a vertex
    of the simplex) and the uniform mix stay candidates, judged by the same criterion, so an imperfect solver
    can never make the weighted mean worse than the best single model or the plain mean.
    """
    m = stack.shape[0]
    y = np.asarray(y, dtype=np.int64)
    rows = np.arange(len(y))
    q = stack[:, rows, y].T  # (n, m)
    simplex = {
        "type": "eq",
        "fun": lambda v: v[:m].sum() - 1.0,
        "jac": lambda v: np.r_[np.ones(m), 0.0][: len(v)],
    }

    def criterion(w: np.ndarray) -> float:
        proba = combine_mean(stack, w)
        if tempered:
            proba = cal.apply_temperature(proba, cal.fit_temperature(proba, y))
        return kaggle_log_loss(y, proba)

    candidates = [np.full(m, 1.0 / m), *np.eye(m)]
    if m > 1:
        if tempered:

            def loss(v: np.ndarray) -> float:
                z = v[m] * np.log(np.maximum(np.tensordot(v[:m], stack, axes=1), EPS))
                return float(np.mean(cal.logsumexp_rows(z) - z[rows, y]))

            start, jac = np.r_[candidates[0], 1.0], None  # numerical gradient: m + 1 cheap evaluations
            bounds = [(0.0, 1.0)] * m + [cal.BETA_BOUNDS]
        else:

            def loss(v: np.ndarray) -> float:
                return float(-np.mean(np.log(np.maximum(q @ v, EPS))))

            def jac(v: np.ndarray) -> np.ndarray:
                return -np.mean(q / np.maximum(q @ v, EPS)[:, None], axis=0)

            start, bounds = candidates[0], [(0.0, 1.0)] * m
        result = minimize(
            loss,
            start,
            jac=jac,
            method="SLSQP",
            bounds=bounds,
            constraints=[simplex],
            options={"maxiter": 500, "ftol": 1e-12},
        )
        w = np.clip(result.x[:m], 0.0, None)
        if w.sum() > 0:
            candidates.insert(0, w / w.sum())
    return min(candidates, key=criterion)


def stack_features(stack: np.ndarray, floor: float = STACK_FEATURE_FLOOR) -> np.ndarray:
    """(n, m * k) design matrix: every model's log-probabilities side by side."""
    return np.concatenate([cal.log_proba(p, floor=floor) for p in stack], axis=1)


@dataclass(frozen=True)
class Stacker:
    """A fitted stacker as plain numbers: standardise the log-probability features, then a multinomial
    logistic regression. Fit with scikit-learn, predicted here, so the stage and the served model share it."""

    classes: tuple[int, ...]  # the class indices (FISH_CLASSES order) its training rows held
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[tuple[float, ...], ...]
    intercept: tuple[float, ...]
    feature_floor: float = STACK_FEATURE_FLOOR

    def proba(self, stack: np.ndarray) -> np.ndarray:
        """Probabilities in FISH_CLASSES order; a class its training rows lacked gets the floor EPS."""
        x = stack_features(stack, self.feature_floor)
        logits = (x - np.asarray(self.mean)) / np.asarray(self.scale) @ np.asarray(self.coef).T
        logits = logits + np.asarray(self.intercept)
        if logits.shape[1] == 1:  # two classes: scikit-learn's one logit is the second class's against the first
            logits = np.hstack([np.zeros_like(logits), logits])
        proba = np.zeros((stack.shape[1], len(FISH_CLASSES)))
        proba[:, list(self.classes)] = cal.softmax(logits)
        return normalise_rows(np.maximum(proba, EPS))

    def to_json(self) -> dict[str, object]:
        return {"classes": [FISH_CLASSES[c] for c in self.classes], "mean": list(self.mean),
                "scale": list(self.scale), "coef": [list(r) for r in self.coef],
                "intercept": list(self.intercept), "feature_floor": self.feature_floor}

    @classmethod
    def from_json(cls, data: dict) -> Stacker:
        return cls(tuple(FISH_CLASSES.index(c) for c in data["classes"]), tuple(data["mean"]),
                   tuple(data["scale"]), tuple(tuple(r) for r in data["coef"]), tuple(data["intercept"]),
                   float(data["feature_floor"]))


def fit_stacker(stack: np.ndarray, y: np.ndarray, c: float) -> Stacker:
    """Multinomial logistic regression (lbfgs) on standardised log-probabilities.

    Standardising cuts lbfgs from hundreds of iterations to about a dozen, and one BLAS thread is several
    times faster than many on matrices this small.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    x = stack_features(stack)
    with threadpool_limits(1):
        scaler = StandardScaler().fit(x)
        model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x), y)
    return Stacker(tuple(int(k) for k in model.classes_), tuple(scaler.mean_.tolist()),
                   tuple(scaler.scale_.tolist()), tuple(tuple(r) for r in model.coef_.tolist()),
                   tuple(model.intercept_.tolist()))


def cross_fit_stacker(stack: np.ndarray, y: np.ndarray, folds: np.ndarray, c: float) -> np.ndarray:
    """Out-of-fold stacker predictions: rows of fold k come from a stacker fit on the other folds only."""
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError("stacking needs at least two folds to produce out-of-fold predictions")
    out = np.zeros((stack.shape[1], len(FISH_CLASSES)))
    for k in fold_ids:
        held = folds == k
        out[held] = fit_stacker(stack[:, ~held], y[~held], c).proba(stack[:, held])
    return out


def select_stacking_c(
    stack: np.ndarray, y: np.ndarray, folds: np.ndarray, grid: tuple[float, ...]
) -> tuple[float, np.ndarray]:
    """The regularisation with the lowest cross-fitted OOF log loss, and that OOF prediction.

    On a few hundred images and eight classes (LAG: ~2 % of rows), an L2 strength that suits 4,000 rows
    overfits badly (the demo's stacker: OOF 3.46 at C = 1, 1.60 at C = 0.003), so C is chosen, like the
    weights of the weighted mean, on the OOF rows; the nested estimate chooses it without the scored fold.
    """
    if not grid:
        raise ValueError("ensemble.stacking_c is empty: give at least one inverse regularisation strength")
    scored = [(c, cross_fit_stacker(stack, y, folds, c)) for c in grid]
    return min(scored, key=lambda item: kaggle_log_loss(y, item[1]))


# ------------------------------------------------------------------------------------ fit and predict


@dataclass(frozen=True)
class Fitted:
    """Everything learnt from OOF rows that is needed to predict new rows."""

    method: str
    model_temperatures: tuple[float, ...]
    weights: tuple[float, ...] | None
    stacker: Stacker | None
    stacking_c: float | None
    temperature: float
    clip: tuple[float, float]


def _temper(stack: np.ndarray, temperatures: tuple[float, ...]) -> np.ndarray:
    return np.stack([cal.apply_temperature(p, t) for p, t in zip(stack, temperatures, strict=True)])


def _combine(method: str, stack: np.ndarray, weights: np.ndarray | None, stacker: Stacker | None) -> np.ndarray:
    if method == "stacking":
        return stacker.proba(stack)
    if method == "geometric":
        return combine_geometric(stack, weights)
    return combine_mean(stack, weights)


def fit_ensemble(
    method: str,
    stack: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    *,
    temperature: bool,
    clip: bool,
    stacking_c: tuple[float, ...] = (1.0,),
) -> tuple[Fitted, np.ndarray]:
    """Fit `method` and its calibration on OOF rows; return the fit and its final OOF predictions.

    The OOF predictions are in-sample for every fitted parameter except the stacker, which is cross-fitted.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; choose one of {list(METHODS)}")
    m = stack.shape[0]
    temps = tuple(cal.fit_temperature(p, y) if temperature else 1.0 for p in stack)
    tempered = _temper(stack, temps)
    weights, stacker, c = None, None, None
    if method == "stacking":
        c, combined = select_stacking_c(tempered, y, folds, tuple(stacking_c))
        stacker = fit_stacker(tempered, y, c)  # for the test sets: fit on every OOF row
    else:
        if method in ("mean", "geometric"):
            weights = np.full(m, 1.0 / m)
        elif method == "weighted":
            weights = fit_simplex_weights(tempered, y, tempered=temperature)
        else:  # best
            weights = np.eye(m)[int(np.argmin([kaggle_log_loss(y, p) for p in tempered]))]
        combined = _combine(method, tempered, weights, None)
    t_ens = cal.fit_temperature(combined, y) if temperature else 1.0
    combined = cal.apply_temperature(combined, t_ens)
    bounds = cal.fit_clip(combined, y) if clip else (0.0, 1.0)
    weights = None if weights is None else tuple(float(w) for w in weights)
    fitted = Fitted(method, temps, weights, stacker, c, t_ens, bounds)
    return fitted, cal.apply_clip(combined, *bounds)


def predict(
    fitted: Fitted, stack: np.ndarray, prior_ratio: tuple[np.ndarray, np.ndarray | None] | None = None
) -> np.ndarray:
    """Apply a fitted ensemble to new rows; `prior_ratio` = (train shares, target shares) re-weights them."""
    weights = None if fitted.weights is None else np.asarray(fitted.weights)
    proba = _combine(fitted.method, _temper(stack, fitted.model_temperatures), weights, fitted.stacker)
    proba = cal.apply_temperature(proba, fitted.temperature)
    if prior_ratio is not None:
        # Before the clip, so that the floor and ceiling chosen on OOF still bound what is submitted.
        proba = cal.apply_prior(proba, *prior_ratio)
    return cal.apply_clip(proba, *fitted.clip)


def fitted_to_json(fitted: Fitted) -> dict[str, object]:
    """A `Fitted` as plain JSON, for the ensemble report and the served model."""
    return {
        "method": fitted.method,
        "model_temperatures": list(fitted.model_temperatures),
        "weights": None if fitted.weights is None else list(fitted.weights),
        "stacker": None if fitted.stacker is None else fitted.stacker.to_json(),
        "stacking_c": fitted.stacking_c,
        "temperature": fitted.temperature,
        "clip": list(fitted.clip),
    }


def fitted_from_json(data: dict) -> Fitted:
    """The inverse of `fitted_to_json`."""
    return Fitted(
        method=data["method"],
        model_temperatures=tuple(float(t) for t in data["model_temperatures"]),
        weights=None if data["weights"] is None else tuple(float(w) for w in data["weights"]),
        stacker=None if data["stacker"] is None else Stacker.from_json(data["stacker"]),
        stacking_c=data["stacking_c"],
        temperature=float(data["temperature"]),
        clip=(float(data["clip"][0]), float(data["clip"][1])),
    )


def nested_oof(
    method: str, stack: np.ndarray, y: np.ndarray, folds: np.ndarray, **kwargs
) -> np.ndarray | None:
    """OOF predictions in which fold k's every parameter was fit on the other folds; None if impossible."""
    fold_ids = np.unique(folds)
    # Stacking needs two folds inside each outer training split for its own cross-fitting.
    if len(fold_ids) < (3 if method == "stacking" else 2):
        return None
    out = np.zeros(stack.shape[1:])
    for k in fold_ids:
        held = folds == k
        fitted, _ = fit_ensemble(method, stack[:, ~held], y[~held], folds[~held], **kwargs)
        out[held] = predict(fitted, stack[:, held])
    return out


# -------------------------------------------------------------------------------------------- evaluation

FIT_NOTES = {
    "mean": "no weights; temperatures and clip fit on all OOF rows",
    "weighted": "weights, temperatures and clip fit on all OOF rows and scored on them (in-sample, slightly "
    "optimistic): see oof_logloss_nested_cv",
    "geometric": "no weights; temperatures and clip fit on all OOF rows",
    "stacking": "stacker cross-fitted over the oof.csv folds (each fold scored by a stacker that never saw "
    "it); its regularisation, temperatures and clip chosen on all OOF rows",
    "best": "model chosen, temperatures and clip fit on all OOF rows",
    "single": "the model's own OOF predictions; temperature and clip fit on all OOF rows",
}

HONESTY = (
    "stacking: cross-fitted over the oof.csv folds, so its OOF score is out-of-fold for the stacker too "
    "(its regularisation is chosen on the OOF rows). "
    "weighted, temperatures and clip: fit on all OOF rows and scored on them (in-sample, slightly "
    "optimistic). "
    "oof_logloss_nested_cv: every parameter refit on the other folds for each fold (the honest estimate)."
)

STEPS = {"uncalibrated": (False, False), "temperature": (True, False), "temperature_clip": (True, True)}


def evaluate(
    preds: Predictions, y: np.ndarray, cfg: Ensemble, nested: bool = True
) -> tuple[dict[str, dict[str, object]], dict[str, tuple[Fitted, np.ndarray]]]:
    """Score every single model and every method, at every calibration step and as configured.

    Returns one report row per entry (`model:<bb>` for single models, then the methods) and, per entry, the
    configured fit with its OOF predictions.
    """
    kwargs = {"temperature": cfg.temperature, "clip": cfg.clip, "stacking_c": cfg.stacking_c}
    # A single model takes the code path of a one-model mean, so its calibrated scores are comparable.
    entries = {f"model:{bb}": ("mean", [j]) for j, bb in enumerate(preds.models)}
    entries.update({method: (method, list(range(len(preds.models)))) for method in METHODS})
    rows: dict[str, dict[str, object]] = {}
    fits: dict[str, tuple[Fitted, np.ndarray]] = {}
    for name, (method, members) in entries.items():
        stack, names = preds.oof[members], [preds.models[j] for j in members]
        row: dict[str, object] = {}
        if name.startswith("model:"):
            row["oof_logloss_raw"] = kaggle_log_loss(y, stack[0])
        steps = {}  # (temperature, clip) -> (fitted, oof); the configured pair is usually one of the steps
        for step, flags in STEPS.items():
            steps[flags] = fit_ensemble(
                method, stack, y, preds.folds, temperature=flags[0], clip=flags[1], stacking_c=cfg.stacking_c
            )
            row[f"oof_logloss_{step}"] = kaggle_log_loss(y, steps[flags][1])
        configured = (cfg.temperature, cfg.clip)
        if configured not in steps:
            steps[configured] = fit_ensemble(method, stack, y, preds.folds, **kwargs)
        fitted, oof = steps[configured]
        fits[name] = (fitted, oof)
        row["oof_logloss"] = kaggle_log_loss(y, oof)
        row["accuracy"] = accuracy(y, oof)
        held_out = nested_oof(method, stack, y, preds.folds, **kwargs) if nested else None
        row["oof_logloss_nested_cv"] = None if held_out is None else kaggle_log_loss(y, held_out)
        row["model_temperatures"] = dict(zip(names, fitted.model_temperatures, strict=True))
        if fitted.weights is not None and len(names) > 1:
            row["weights"] = dict(zip(names, fitted.weights, strict=True))
        if fitted.stacking_c is not None:
            row["stacking_c"] = fitted.stacking_c
            row["stacker"] = fitted.stacker.to_json()
        row["ensemble_temperature"] = fitted.temperature
        row["clip"] = list(fitted.clip)
        row["fit"] = FIT_NOTES["single" if name.startswith("model:") else method]
        rows[name] = row
    return rows, fits


def format_table(rows: dict[str, dict[str, object]], chosen: str) -> str:
    """The side-by-side OOF log loss table printed by the stage."""
    header = f"{'model / method':<22}{'raw':>9}{'+temp':>9}{'+clip':>9}{'config':>9}{'nested':>9}{'acc':>8}"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        nested = row["oof_logloss_nested_cv"]
        mark = " <- written" if name == chosen else ""
        lines.append(
            f"{name:<22}{row['oof_logloss_uncalibrated']:>9.4f}{row['oof_logloss_temperature']:>9.4f}"
            f"{row['oof_logloss_temperature_clip']:>9.4f}{row['oof_logloss']:>9.4f}"
            f"{'-' if nested is None else format(nested, '.4f'):>9}{row['accuracy']:>8.3f}{mark}"
        )
    lines.append(
        "raw: no calibration; +temp: temperature scaling; +clip: and clipping; config: as params.yaml "
        "says; nested: every parameter refit without the scored fold (honest)."
    )
    return "\n".join(lines)


