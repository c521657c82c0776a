"""Ensemble stage: turn every backbone's out-of-fold predictions into one calibrated set of test predictions.

Every combiner and every calibration step is fit on the out-of-fold (OOF) predictions only, never on a test
set. The combiners: `mean`; `weighted` (simplex weights minimising OOF log loss); `geometric` (renormalised
product); `stacking` (a multinomial logistic regression on the models' OOF log-probabilities); `best` (the
best single model). Each model is temperature-scaled before combining, the combination is temperature-scaled
again and optionally clipped (`pipeline.calibration`); test predictions may then be re-weighted to a target
class prior.

How honest each reported OOF log loss is, and why it matters on a leaderboard that punishes overconfidence:
- `stacking` is cross-fitted over the same folds as the `fold` column of oof.csv: the stacker that predicts
  fold k was fit on the other folds only, so its OOF score is out-of-fold for the stacker too (its L2 strength
  is picked from `ensemble.stacking_c` on the OOF rows).
- `weighted`, the temperatures and the clip are fit on all OOF rows and scored on the same rows: a handful of
  parameters, slightly optimistic.
- `oof_logloss_nested_cv` refits *everything* (temperatures, weights, model choice, stacker, clip) on the
  other folds for each fold: the honest estimate for every method, reported beside the headline number.

`ensemble.method` picks what is written; every method and every single model is scored side by side in
`paths.ensemble_report` and `paths.metrics`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline import calibration as cal
from pipeline import tracking
from pipeline.config import FISH_CLASSES, flatten, load_section, read_params
from pipeline.io import read_json, save_figure, write_csv, write_json
from pipeline.metrics import EPS, accuracy, kaggle_log_loss, normalise_rows

METHODS: tuple[str, ...] = ("mean", "weighted", "geometric", "stacking", "best")
TEST_SETS: tuple[str, ...] = ("test_stg1", "test_stg2")

#: Stacking features are log-probabilities floored here: a few near-zero probabilities (log 1e-15 = -34.5)
#: would otherwise dominate an L2-regularised fit whose other features live in [-14, 0].
STACK_FEATURE_FLOOR = 1e-6


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Predictions:
    """Every model's predictions, row-aligned: `oof` is (m, n, k), `tests` maps to (ids, (m, t, k))."""

    models: tuple[str, ...]
    ids: np.ndarray
    folds: np.ndarray
    oof: np.ndarray
    tests: dict[str, tuple[np.ndarray, np.ndarray]]


def _read_table(path: Path, leading: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the train stage for this backbone first")
    table = pd.read_csv(path)
    expected = leading + list(FISH_CLASSES)
    if list(table.columns) != expected:
        raise ValueError(f"{path}: columns {list(table.columns)}, expected {expected}")
    if table["id"].duplicated().any():
        raise ValueError(f"{path}: duplicated id {table.loc[table['id'].duplicated(), 'id'].iloc[0]!r}")
    values = table[list(FISH_CLASSES)].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values.sum(axis=1) <= 0):
        raise ValueError(f"{path}: probabilities must be finite, non-negative and not all zero in a row")
    return table.set_index("id")


def read_predictions(pred_dir: str | Path, backbones: tuple[str, ...]) -> Predictions:
    """Load `<pred_dir>/<bb>/{oof,test_stg1,test_stg2}.csv` for every backbone, aligned on the first's ids."""
    if not backbones:
        raise ValueError("model.backbones is empty: there is nothing to ensemble")
    pred_dir = Path(pred_dir)
    oofs = [_read_table(pred_dir / bb / "oof.csv", ["id", "fold"]) for bb in backbones]
    ids = oofs[0].index.to_numpy()
    folds = oofs[0]["fold"].to_numpy(dtype=np.int64)
    for bb, table in zip(backbones[1:], oofs[1:], strict=True):
        if set(table.index) != set(ids):
            raise ValueError(f"{bb}/oof.csv covers different training images than {backbones[0]}/oof.csv")
        # One fold partition for all models: the stacker is cross-fitted over it, so it must be well defined.
        if not np.array_equal(table.loc[ids, "fold"].to_numpy(dtype=np.int64), folds):
            raise ValueError(f"{bb}/oof.csv assigns different folds than {backbones[0]}/oof.csv")
    oof = np.stack([normalise_rows(t.loc[ids, list(FISH_CLASSES)].to_numpy(np.float64)) for t in oofs])
    tests = {}
    for name in TEST_SETS:
        tables = [_read_table(pred_dir / bb / f"{name}.csv", ["id"]) for bb in backbones]
        test_ids = tables[0].index.to_numpy()
        for bb, table in zip(backbones[1:], tables[1:], strict=True):
            if set(table.index) != set(test_ids):
                raise ValueError(f"{bb}/{name}.csv covers different images than {backbones[0]}/{name}.csv")
        stack = np.stack(
            [normalise_rows(t.loc[test_ids, list(FISH_CLASSES)].to_numpy(np.float64)) for t in tables]
        )
        tests[name] = (test_ids, stack)
    return Predictions(tuple(backbones), ids, folds, oof, tests)


def train_labels(manifest: str | Path, ids: np.ndarray) -> np.ndarray:
    """Integer labels (FISH_CLASSES order) of the training images `ids`, from the manifest."""
    table = pd.read_csv(manifest, usecols=["id", "split", "label"], dtype=str, keep_default_na=False)
    labels = table[table["split"] == "train"].set_index("id")["label"]
    missing = [i for i in ids if i not in labels.index]
    if missing:
        raise ValueError(f"{len(missing)} OOF ids are not training images of {manifest}, e.g. {missing[0]!r}")
    names = labels.loc[ids]
    unknown = sorted(set(names) - set(FISH_CLASSES))
    if unknown:
        raise ValueError(f"{manifest}: unknown labels {unknown}; expected {list(FISH_CLASSES)}")
    index = {c: i for i, c in enumerate(FISH_CLASSES)}
    return names.map(index).to_numpy(dtype=np.int64)


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


def stack_features(stack: np.ndarray) -> np.ndarray:
    """(n, m * k) design matrix: every model's log-probabilities side by side."""
    return np.concatenate([cal.log_proba(p, floor=STACK_FEATURE_FLOOR) for p in stack], axis=1)


def fit_stacker(stack: np.ndarray, y: np.ndarray, c: float) -> Pipeline:
    """Multinomial logistic regression (lbfgs) on standardised log-probabilities.

    Standardising cuts lbfgs from hundreds of iterations to about a dozen, and one BLAS thread is several
    times faster than many on matrices this small.
    """
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    with threadpool_limits(1):
        return model.fit(stack_features(stack), y)


def stacker_proba(model: Pipeline, stack: np.ndarray) -> np.ndarray:
    """Stacker probabilities in FISH_CLASSES order; a class its training rows lacked gets probability 0."""
    proba = np.zeros((stack.shape[1], len(FISH_CLASSES)))
    with threadpool_limits(1):
        proba[:, model.classes_] = model.predict_proba(stack_features(stack))
    return normalise_rows(np.maximum(proba, EPS))


def stacker_parameters(model: Pipeline) -> dict[str, Any]:
    """Everything `stacker_proba` computes with, as plain lists: what the served model needs (JSON)."""
    scaler, lr = model.named_steps["standardscaler"], model.named_steps["logisticregression"]
    return {
        "classes": [FISH_CLASSES[int(c)] for c in lr.classes_],
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
        "coef": lr.coef_.tolist(),
        "intercept": lr.intercept_.tolist(),
        "feature_floor": STACK_FEATURE_FLOOR,
    }


def cross_fit_stacker(stack: np.ndarray, y: np.ndarray, folds: np.ndarray, c: float) -> np.ndarray:
    """Out-of-fold stacker predictions: rows of fold k come from a stacker fit on the other folds only."""
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError("stacking needs at least two folds to produce out-of-fold predictions")
    out = np.zeros((stack.shape[1], len(FISH_CLASSES)))
    for k in fold_ids:
        held = folds == k
        out[held] = stacker_proba(fit_stacker(stack[:, ~held], y[~held], c), stack[:, held])
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
    stacker: Pipeline | None
    stacking_c: float | None
    temperature: float
    clip: tuple[float, float]


def _temper(stack: np.ndarray, temperatures: tuple[float, ...]) -> np.ndarray:
    return np.stack([cal.apply_temperature(p, t) for p, t in zip(stack, temperatures, strict=True)])


def _combine(method: str, stack: np.ndarray, weights: np.ndarray | None, stacker: Any) -> np.ndarray:
    if method == "stacking":
        return stacker_proba(stacker, stack)
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
    preds: Predictions, y: np.ndarray, cfg: Any, nested: bool = True
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[Fitted, np.ndarray]]]:
    """Score every single model and every method, at every calibration step and as configured.

    Returns one report row per entry (`model:<bb>` for single models, then the methods) and, per entry, the
    configured fit with its OOF predictions.
    """
    kwargs = {"temperature": cfg.temperature, "clip": cfg.clip, "stacking_c": cfg.stacking_c}
    # A single model takes the code path of a one-model mean, so its calibrated scores are comparable.
    entries = {f"model:{bb}": ("mean", [j]) for j, bb in enumerate(preds.models)}
    entries.update({method: (method, list(range(len(preds.models)))) for method in METHODS})
    rows: dict[str, dict[str, Any]] = {}
    fits: dict[str, tuple[Fitted, np.ndarray]] = {}
    for name, (method, members) in entries.items():
        stack, names = preds.oof[members], [preds.models[j] for j in members]
        row: dict[str, Any] = {}
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
            row["stacker"] = stacker_parameters(fitted.stacker)
        row["ensemble_temperature"] = fitted.temperature
        row["clip"] = list(fitted.clip)
        row["fit"] = FIT_NOTES["single" if name.startswith("model:") else method]
        rows[name] = row
    return rows, fits


def format_table(rows: dict[str, dict[str, Any]], chosen: str) -> str:
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


# ------------------------------------------------------------------------------------------------- stage


def _frame(ids: np.ndarray, proba: np.ndarray, folds: np.ndarray | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(proba, columns=list(FISH_CLASSES))
    if folds is not None:
        frame.insert(0, "fold", folds)
    frame.insert(0, "id", ids)
    return frame


def run(paths: Any, backbones: tuple[str, ...], cfg: Any) -> dict[str, Any]:
    """The whole stage without MLflow: read, evaluate, write predictions, metrics, report and figure."""
    preds = read_predictions(paths.predictions, backbones)
    y = train_labels(paths.manifest, preds.ids)
    train_shares = cal.class_shares(y, len(FISH_CLASSES))
    target = cal.target_prior(cfg.prior, FISH_CLASSES)
    rows, fits = evaluate(preds, y, cfg)
    fitted, oof = fits[cfg.method]

    out_dir = Path(paths.ensemble)
    write_csv(out_dir / "oof.csv", _frame(preds.ids, oof, preds.folds))
    for name, (ids, stack) in preds.tests.items():
        proba = predict(fitted, stack, None if target is None else (train_shares, target))
        write_csv(out_dir / f"{name}.csv", _frame(ids, proba))

    uncalibrated = fit_ensemble(
        cfg.method, preds.oof, y, preds.folds, temperature=False, clip=False, stacking_c=cfg.stacking_c
    )[1]
    best_single = min((n for n in rows if n.startswith("model:")), key=lambda n: rows[n]["oof_logloss_raw"])
    figure = cal.plot_reliability(
        {
            f"{best_single[6:]} (best single, raw)": (preds.oof[preds.models.index(best_single[6:])], y),
            f"{cfg.method}, uncalibrated": (uncalibrated, y),
            f"{cfg.method}, as written": (oof, y),
        }
    )
    save_figure(figure, Path(paths.figures) / "ensemble" / "reliability.png")

    metrics = {
        "cv_logloss": {
            **{bb: rows[f"model:{bb}"]["oof_logloss_raw"] for bb in backbones},
            "ensemble": rows[cfg.method]["oof_logloss"],
        },
        "cv_logloss_nested": {"ensemble": rows[cfg.method]["oof_logloss_nested_cv"]},
        "method": cfg.method,
        "methods": {m: rows[m]["oof_logloss"] for m in METHODS},
        "methods_nested": {m: rows[m]["oof_logloss_nested_cv"] for m in METHODS},
        "cv_accuracy": {
            **{bb: accuracy(y, preds.oof[j]) for j, bb in enumerate(backbones)},
            "ensemble": rows[cfg.method]["accuracy"],
        },
    }
    write_json(paths.metrics, metrics)
    report = {
        "method": cfg.method,
        "models": list(backbones),
        "n_oof": len(y),
        "folds": sorted(int(k) for k in np.unique(preds.folds)),
        "settings": dataclasses.asdict(cfg),
        "chosen": {
            "method": cfg.method,
            **{k: rows[cfg.method][k] for k in ("oof_logloss", "oof_logloss_nested_cv", "accuracy")},
        },
        "results": rows,
        "baselines": {
            "uniform": float(np.log(len(FISH_CLASSES))),
            "class_prior": kaggle_log_loss(y, np.tile(train_shares, (len(y), 1))),
        },
        "prior": {
            "setting": cfg.prior,
            "train_shares": dict(zip(FISH_CLASSES, train_shares, strict=True)),
            "target_shares": None if target is None else dict(zip(FISH_CLASSES, target, strict=True)),
            "applied_to": "test predictions only (OOF rows keep the training mix they were drawn from)",
        },
        "honesty": HONESTY,
        "table": format_table(rows, cfg.method),
        "mlflow_run_id": None,
    }
    write_json(paths.ensemble_report, report)
    return report


def log_to_mlflow(
    tracking_cfg: Any, params: dict[str, Any], report: dict[str, Any], paths: Any, model_cfg: Any = None,
    resize: str = "pad",
) -> str | None:
    """Record the finished stage in its own MLflow run; return the run id (None when tracking is off)."""
    with tracking.start_run(tracking_cfg, "ensemble", params) as run:
        if run is None:
            return None
        scores = {}
        for name, row in report["results"].items():
            scores[f"oof_logloss.{name.replace(':', '.')}"] = row["oof_logloss"]
            if row["oof_logloss_nested_cv"] is not None:
                scores[f"oof_logloss_nested.{name.replace(':', '.')}"] = row["oof_logloss_nested_cv"]
        scores["oof_logloss.chosen"] = report["chosen"]["oof_logloss"]
        tracking.log_metrics(scores)
        tracking.log_artifact(Path(paths.figures) / "ensemble", "figures")
        tracking.log_artifact(paths.metrics)
        tracking.log_dict(report, "ensemble_report.json")
        if model_cfg is not None:
            # The whole ensemble as one model that predicts from raw images, registered with an alias on the
            # version whose run has the lowest OOF log loss.
            from pipeline import serving

            serving.log_ensemble_model(
                paths.predictions, report, model_cfg.backbones, resize=resize,
                registered_model=tracking_cfg.registered_model,
            )
        return run.info.run_id


def main() -> None:
    raw = read_params()
    paths, model, cfg = (load_section(s, raw) for s in ("paths", "model", "ensemble"))
    report = run(paths, model.backbones, cfg)
    print(report["table"])
    params = {**flatten(cfg, "ensemble."), "model.backbones": list(model.backbones)}
    run_id = log_to_mlflow(
        load_section("tracking", raw), params, report, paths, model, resize=load_section("ingest", raw).resize
    )
    if run_id is not None:
        write_json(paths.ensemble_report, {**read_json(paths.ensemble_report), "mlflow_run_id": run_id})


if __name__ == "__main__":
    main()
