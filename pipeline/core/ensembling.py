"""The ensemble's maths: combiners, stacking, calibration steps, burst smoothing, nested cross-validation and
the choice between them. Pure functions.

Every combiner and every calibration step is fit on the out-of-fold (OOF) predictions only, never on a test
set. The combiners: `mean`; `weighted` (simplex weights minimising OOF log loss); `geometric` (renormalised
product); `stacking` (a multinomial logistic regression on the models' OOF log-probabilities); `best` (the
best single model). Each model may be temperature-scaled before combining; the combination may then be
smoothed over bursts (the frames of one catch: `calibration.smooth`), temperature-scaled again and clipped,
with one floor and ceiling or a floor per class (`pipeline.core.calibration`); test predictions may then be
re-weighted to a target class prior. In `predict`, and so in the served model, the order is the same:
combine, smooth, temperature, prior, clip.

A *candidate* is one combiner with one choice of each step (`Candidate`); `ensemble.method`, `temperature`,
`smoothing` and `clip` each name one value or `auto`, and the candidates are every combination they allow.
`evaluate` scores every candidate three ways:
- in-sample: fit on all OOF rows and scored on them (the stacker itself is cross-fitted over the oof.csv
  folds; everything else is in-sample, slightly optimistic), which decides nothing;
- nested: for each fold, *every* parameter (temperatures, weights, model choice, stacker and its
  regularisation, smoothing weight, clip) refit on the other folds, then that fold predicted;
- with the choice: for each fold, the candidates are ranked by their nested score computed without that fold
  (on fits that left out that fold and one more), the winner is refit on the other folds and predicts it:
  the honest estimate of the whole procedure, choice included, and the headline CV.
The candidate chosen is the one with the lowest nested score (ties go to the simpler, listed first).
Smoothing of OOF rows only ever mixes rows of one fold (`smoothing_keys`), so it cannot leak either.

`Fitted` is everything learnt; `predict` applies it. The ensemble stage writes a `Fitted` into its report
(`fitted_to_json`) and the served MLflow model reads it back (`fitted_from_json`) and calls the same `predict`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from pipeline.core import calibration as cal
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.metrics import EPS, accuracy, kaggle_log_loss, normalise_rows
from pipeline.core.params import Ensemble
from pipeline.core.predictions import Predictions

METHODS: tuple[str, ...] = ("mean", "weighted", "geometric", "stacking", "best")
#: The methods from the fewest fitted parameters to the most: the order candidates are listed and ties broken.
SIMPLEST_FIRST: tuple[str, ...] = ("best", "mean", "geometric", "weighted", "stacking")
#: Clip shapes: none, one floor and ceiling for all classes, or a floor per class on top of that.
CLIPS: tuple[str, ...] = ("none", "global", "per_class")

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


_single_thread_depth = 0


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS limited to one thread, entered once however deeply nested: threadpoolctl inspects every loaded
    library each time it is entered, which costs about as much as one small stacker fit."""
    global _single_thread_depth
    if _single_thread_depth:
        _single_thread_depth += 1
        try:
            yield
        finally:
            _single_thread_depth -= 1
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        _single_thread_depth = 1
        try:
            yield
        finally:
            _single_thread_depth = 0


def fit_stacker(stack: np.ndarray, y: np.ndarray, c: float) -> Stacker:
    """Multinomial logistic regression (lbfgs) on standardised log-probabilities.

    Standardising cuts lbfgs from hundreds of iterations to about a dozen, and one BLAS thread is several
    times faster than many on matrices this small.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = stack_features(stack)
    with one_blas_thread():
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
    smoothing: float = 0.0  # weight of the burst mean (0: no smoothing)
    class_floors: tuple[float, ...] | None = None  # a floor per class, replacing clip[0], when fitted


@dataclass(frozen=True)
class Candidate:
    """One combiner with one choice of every calibration step: what `ensemble.method: auto` chooses among."""

    method: str
    temperature: bool
    smoothing: bool
    clip: str  # one of CLIPS

    @property
    def name(self) -> str:
        steps = [self.method]
        steps += ["temperature"] if self.temperature else []
        steps += ["smoothing"] if self.smoothing else []
        steps += {"none": [], "global": ["clip"], "per_class": ["class_clip"]}[self.clip]
        return "+".join(steps)

    def to_json(self) -> dict[str, object]:
        return {"method": self.method, "temperature": self.temperature, "smoothing": self.smoothing,
                "clip": self.clip}


def candidates(cfg: Ensemble) -> list[Candidate]:
    """Every candidate the settings allow (`auto`: every value), simplest first."""
    methods = SIMPLEST_FIRST if cfg.method == "auto" else (cfg.method,)
    temps = (False, True) if cfg.temperature == "auto" else (bool(cfg.temperature),)
    smooths = (False, True) if cfg.smoothing == "auto" else (bool(cfg.smoothing),)
    clips = CLIPS if cfg.clip == "auto" else (cfg.clip,)
    return [Candidate(m, t, sm, c) for m in methods for t in temps for sm in smooths for c in clips]


def smoothing_keys(folds: np.ndarray, bursts: np.ndarray | None) -> np.ndarray:
    """One key per OOF row such that rows share a key only when they share a burst *and* a fold: the rows of
    one fold were predicted by models that never saw it, and mixing in another fold's rows would leak."""
    folds = np.asarray(folds, dtype=np.int64)
    if bursts is None:
        return np.arange(len(folds))
    bursts = np.asarray(bursts, dtype=np.int64)
    return folds * (int(bursts.max(initial=0)) + 1) + bursts


def _temper(stack: np.ndarray, temperatures: tuple[float, ...]) -> np.ndarray:
    return np.stack([cal.apply_temperature(p, t) for p, t in zip(stack, temperatures, strict=True)])


def _combine(method: str, stack: np.ndarray, weights: np.ndarray | None, stacker: Stacker | None) -> np.ndarray:
    if method == "stacking":
        return stacker.proba(stack)
    if method == "geometric":
        return combine_geometric(stack, weights)
    return combine_mean(stack, weights)


@dataclass(frozen=True)
class _Combiner:
    """A fitted combiner, and its predictions of the rows it was fit on (cross-fitted for stacking)."""

    method: str
    temperatures: tuple[float, ...]
    weights: tuple[float, ...] | None
    stacker: Stacker | None
    stacking_c: float | None
    oof: np.ndarray


def _fit_combiner(method: str, stack: np.ndarray, y: np.ndarray, folds: np.ndarray, temperature: bool,
                  stacking_c: tuple[float, ...]) -> _Combiner:
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
    weights = None if weights is None else tuple(float(w) for w in weights)
    return _Combiner(method, temps, weights, stacker, c, combined)


@dataclass(frozen=True)
class _Post:
    """The fitted steps after combining, and the rows' predictions after them."""

    temperature: float
    smoothing: float
    clip: tuple[float, float]
    class_floors: tuple[float, ...] | None
    oof: np.ndarray


def _fit_post(combined: np.ndarray, y: np.ndarray, keys: np.ndarray, temperature: bool, smoothing: bool,
              clips: set[str]) -> dict[str, _Post]:
    """Smoothing, temperature and every clip shape in `clips`, fit in that order on the combined rows; the
    clip shapes share the steps before them, so asking for all three costs little more than one."""
    if smoothing:
        weight, t = cal.fit_smoothing(combined, y, keys, temperature)
        base = cal.apply_temperature(cal.smooth(combined, keys, weight), t)
    else:
        weight, t = 0.0, (cal.fit_temperature(combined, y) if temperature else 1.0)
        base = cal.apply_temperature(combined, t)
    out = {}
    if "none" in clips:
        out["none"] = _Post(t, weight, (0.0, 1.0), None, base)
    if clips & {"global", "per_class"}:
        bounds = cal.fit_clip(base, y)
        if "global" in clips:
            out["global"] = _Post(t, weight, bounds, None, cal.apply_clip(base, *bounds))
        if "per_class" in clips:
            floors = cal.fit_class_floors(base, y, *bounds)
            out["per_class"] = _Post(t, weight, bounds, floors, cal.apply_clip(base, floors, bounds[1]))
    return out


def _fitted(comb: _Combiner, post: _Post) -> Fitted:
    return Fitted(comb.method, comb.temperatures, comb.weights, comb.stacker, comb.stacking_c,
                  post.temperature, post.clip, post.smoothing, post.class_floors)


def _clip_shape(clip: bool | str) -> str:
    if isinstance(clip, bool):
        return "global" if clip else "none"
    if clip not in CLIPS:
        raise ValueError(f"unknown clip {clip!r}; choose one of {list(CLIPS)}")
    return clip


def fit_ensemble(
    method: str,
    stack: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    *,
    temperature: bool,
    clip: bool | str,
    stacking_c: tuple[float, ...] = (1.0,),
    smoothing: bool = False,
    keys: np.ndarray | None = None,
) -> tuple[Fitted, np.ndarray]:
    """Fit `method` and its calibration on OOF rows; return the fit and its final OOF predictions.

    `clip`: True / "global" (one floor and ceiling), "per_class" (a floor per class too), False / "none".
    `keys`: the rows' smoothing groups (`smoothing_keys`); None: every row alone, so smoothing does nothing.
    The OOF predictions are in-sample for every fitted parameter except the stacker, which is cross-fitted.
    """
    shape = _clip_shape(clip)
    keys = np.arange(len(y)) if keys is None else np.asarray(keys)
    comb = _fit_combiner(method, stack, y, folds, temperature, stacking_c)
    post = _fit_post(comb.oof, y, keys, temperature, smoothing, {shape})[shape]
    return _fitted(comb, post), post.oof


def predict(
    fitted: Fitted,
    stack: np.ndarray,
    prior_ratio: tuple[np.ndarray, np.ndarray | None] | None = None,
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """Apply a fitted ensemble to new rows; `prior_ratio` = (train shares, target shares) re-weights them.

    `keys` groups the rows into bursts for the fitted smoothing (a test set's `burst` column); without
    them every row stands alone, so smoothing, which needs a burst's other frames, does nothing.
    """
    weights = None if fitted.weights is None else np.asarray(fitted.weights)
    proba = _combine(fitted.method, _temper(stack, fitted.model_temperatures), weights, fitted.stacker)
    if fitted.smoothing and keys is not None:
        proba = cal.smooth(proba, keys, fitted.smoothing)
    proba = cal.apply_temperature(proba, fitted.temperature)
    if prior_ratio is not None:
        # Before the clip, so that the floor and ceiling chosen on OOF still bound what is submitted.
        proba = cal.apply_prior(proba, *prior_ratio)
    floor = fitted.clip[0] if fitted.class_floors is None else np.asarray(fitted.class_floors)
    return cal.apply_clip(proba, floor, fitted.clip[1])


def fitted_to_json(fitted: Fitted) -> dict[str, object]:
    """A `Fitted` as plain JSON, for the ensemble report and the served model."""
    return {
        "method": fitted.method,
        "model_temperatures": list(fitted.model_temperatures),
        "weights": None if fitted.weights is None else list(fitted.weights),
        "stacker": None if fitted.stacker is None else fitted.stacker.to_json(),
        "stacking_c": fitted.stacking_c,
        "temperature": fitted.temperature,
        "smoothing": fitted.smoothing,
        "clip": list(fitted.clip),
        "class_floors": None if fitted.class_floors is None else dict(zip(FISH_CLASSES, fitted.class_floors,
                                                                          strict=True)),
    }


def fitted_from_json(data: dict) -> Fitted:
    """The inverse of `fitted_to_json` (a report written before smoothing and per-class floors reads as
    neither)."""
    floors = data.get("class_floors")
    return Fitted(
        method=data["method"],
        model_temperatures=tuple(float(t) for t in data["model_temperatures"]),
        weights=None if data["weights"] is None else tuple(float(w) for w in data["weights"]),
        stacker=None if data["stacker"] is None else Stacker.from_json(data["stacker"]),
        stacking_c=data["stacking_c"],
        temperature=float(data["temperature"]),
        clip=(float(data["clip"][0]), float(data["clip"][1])),
        smoothing=float(data.get("smoothing", 0.0)),
        class_floors=None if floors is None else tuple(float(floors[c]) for c in FISH_CLASSES),
    )


def nested_oof(
    method: str, stack: np.ndarray, y: np.ndarray, folds: np.ndarray, keys: np.ndarray | None = None, **kwargs
) -> np.ndarray | None:
    """OOF predictions in which fold k's every parameter was fit on the other folds; None if impossible."""
    fold_ids = np.unique(folds)
    # Stacking needs two folds inside each outer training split for its own cross-fitting.
    if len(fold_ids) < (3 if method == "stacking" else 2):
        return None
    keys = np.arange(len(y)) if keys is None else np.asarray(keys)
    out = np.zeros(stack.shape[1:])
    for k in fold_ids:
        held = folds == k
        fitted, _ = fit_ensemble(method, stack[:, ~held], y[~held], folds[~held], keys=keys[~held], **kwargs)
        out[held] = predict(fitted, stack[:, held], keys=keys[held])
    return out


# ------------------------------------------------------------------------------------ every candidate


@dataclass(frozen=True)
class Scores:
    """Every candidate's fit on all rows and its in-sample, nested and choice-included OOF predictions."""

    candidates: tuple[Candidate, ...]
    fitted: dict[Candidate, Fitted]
    in_sample: dict[Candidate, np.ndarray]
    nested: dict[Candidate, np.ndarray | None]
    chosen: Candidate
    with_choice: np.ndarray | None  # each fold predicted by the candidate ranked best without it
    choices: dict[int, str]  # fold -> the candidate chosen without it


def score_candidates(
    stack: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    cands: list[Candidate],
    stacking_c: tuple[float, ...],
    keys: np.ndarray | None = None,
    nested: bool = True,
) -> Scores:
    """Fit every candidate on all rows, on all rows but each fold, and on all but each pair of folds.

    Fits that leave out folds j and k predict both: fold j for the selection made without fold k, and the
    other way round, so ranking the candidates without each fold costs one fit per pair, not per ordered
    pair. Candidates sharing a combiner and its temperatures share that fit, and the clip shapes share the
    steps before them. A stacking candidate is skipped where fewer than two folds remain to cross-fit it.
    """
    folds = np.asarray(folds)
    keys = np.arange(len(y)) if keys is None else np.asarray(keys)
    fold_ids = [int(k) for k in np.unique(folds)]
    exclusions: list[tuple[int, ...]] = [()]
    if nested and len(fold_ids) >= 2:
        exclusions += [(k,) for k in fold_ids]
        if len(fold_ids) >= 3:
            exclusions += list(itertools.combinations(fold_ids, 2))
    plan: dict[tuple[str, bool], dict[bool, set[str]]] = {}
    for c in cands:
        plan.setdefault((c.method, c.temperature), {}).setdefault(c.smoothing, set()).add(c.clip)

    fitted: dict[Candidate, Fitted] = {}
    in_sample: dict[Candidate, np.ndarray] = {}
    held_out: dict[tuple[tuple[int, ...], Candidate], np.ndarray] = {}
    with one_blas_thread():
        for excl in exclusions:
            train = ~np.isin(folds, excl)
            held = ~train
            for (method, temperature), smoothings in plan.items():
                if method == "stacking" and len(np.unique(folds[train])) < 2:
                    continue
                comb = _fit_combiner(method, stack[:, train], y[train], folds[train], temperature, stacking_c)
                for smoothing, clips in smoothings.items():
                    posts = _fit_post(comb.oof, y[train], keys[train], temperature, smoothing, clips)
                    for clip, post in posts.items():
                        cand = Candidate(method, temperature, smoothing, clip)
                        fit = _fitted(comb, post)
                        if not excl:
                            fitted[cand], in_sample[cand] = fit, post.oof
                        else:
                            held_out[excl, cand] = predict(fit, stack[:, held], keys=keys[held])

    def assemble(pick) -> np.ndarray | None:
        """OOF rows fold by fold from the held-out predictions `pick(k)` names; None if one is missing."""
        out = np.zeros((len(y), stack.shape[2]))
        for k in fold_ids:
            key = pick(k)
            if key not in held_out:
                return None
            out[folds == k] = held_out[key]
        return out

    nested_oofs = {c: assemble(lambda k, c=c: ((k,), c)) if nested else None for c in cands}
    scored = [c for c in cands if nested_oofs[c] is not None]
    losses = {c: kaggle_log_loss(y, nested_oofs[c]) for c in scored}
    # No nested score anywhere (one fold, or nested off): fall back on the in-sample score.
    chosen = min(scored, key=losses.get) if scored else min(cands, key=lambda c: kaggle_log_loss(y, in_sample[c]))

    with_choice, choices = None, {}
    if nested and len(fold_ids) >= 3:
        for k in fold_ids:
            others = [j for j in fold_ids if j != k]
            inner = {}
            for c in cands:
                parts = [(j, (tuple(sorted((j, k))), c)) for j in others]
                if all(key in held_out for _, key in parts):
                    rows = np.concatenate([np.flatnonzero(folds == j) for j, _ in parts])
                    inner[c] = kaggle_log_loss(
                        y[rows],
                        np.concatenate([held_out[key][folds[np.isin(folds, key[0])] == j] for j, key in parts]),
                    )
            choices[k] = min(inner, key=inner.get) if inner else None
        if all(c is not None for c in choices.values()):
            with_choice = assemble(lambda k: ((k,), choices[k]))
        choices = {k: c.name for k, c in choices.items() if c is not None}
    return Scores(tuple(cands), fitted, in_sample, nested_oofs, chosen, with_choice, choices)


# -------------------------------------------------------------------------------------------- evaluation

FIT_NOTES = {
    "mean": "no weights; temperatures, smoothing and clip fit on all OOF rows",
    "weighted": "weights, temperatures, smoothing and clip fit on all OOF rows and scored on them (in-sample, "
    "slightly optimistic): see oof_logloss_nested_cv",
    "geometric": "no weights; temperatures, smoothing and clip fit on all OOF rows",
    "stacking": "stacker cross-fitted over the oof.csv folds (each fold scored by a stacker that never saw "
    "it); its regularisation, temperatures, smoothing and clip chosen on all OOF rows",
    "best": "model chosen, temperatures, smoothing and clip fit on all OOF rows",
    "single": "the model's own OOF predictions; temperature and clip fit on all OOF rows",
}

HONESTY = (
    "oof_logloss: fit on all OOF rows and scored on them (in-sample; the stacker alone is cross-fitted), "
    "it decides nothing. oof_logloss_nested_cv: every parameter refit on the other folds for each fold; the "
    "candidate with the lowest is chosen. headline (cv_logloss_with_choice): for each fold the candidates are "
    "ranked without it, and the winner, refit on the other folds, predicts it: the choice is scored too. "
    "Smoothing of OOF rows never crosses a fold."
)

STEPS = {"uncalibrated": (False, False), "temperature": (True, False), "temperature_clip": (True, True)}


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` found: report rows, every candidate's scores, and the chosen one's fit."""

    rows: dict[str, dict[str, object]]  # `model:<name>` per single model, then one per method
    candidates: dict[str, dict[str, object]]  # candidate name -> its scores, simplest first
    chosen: Candidate
    fitted: Fitted  # the chosen candidate, fit on every OOF row: what predicts the test sets
    in_sample: np.ndarray  # its OOF predictions, in-sample
    honest: np.ndarray  # the OOF predictions the headline scores
    headline: float
    headline_basis: str
    nested: float | None  # the chosen candidate's own nested score
    with_choice: float | None
    choices: dict[int, str]


def _model_row(stack: np.ndarray, y: np.ndarray, folds: np.ndarray, name: str) -> dict[str, object]:
    """A single model: its raw OOF score, the in-sample calibration steps, and a nested calibrated score."""
    row: dict[str, object] = {"oof_logloss_raw": kaggle_log_loss(y, stack[0])}
    for step, (temperature, clip) in STEPS.items():
        fit, oof = fit_ensemble("mean", stack, y, folds, temperature=temperature, clip=clip)
        row[f"oof_logloss_{step}"] = kaggle_log_loss(y, oof)
    row["accuracy"] = accuracy(y, stack[0])
    held = nested_oof("mean", stack, y, folds, temperature=True, clip=True)
    row["oof_logloss_nested_cv"] = None if held is None else kaggle_log_loss(y, held)
    row["model_temperatures"] = {name: fit.model_temperatures[0]}
    row["ensemble_temperature"] = fit.temperature
    row["clip"] = list(fit.clip)
    row["fit"] = FIT_NOTES["single"]
    return row


def evaluate(
    preds: Predictions, y: np.ndarray, cfg: Ensemble, nested: bool = True, bursts: np.ndarray | None = None
) -> Evaluation:
    """Score every single model, and every candidate the settings allow; choose by the nested score.

    `bursts` is the OOF rows' burst column (None: no frame has a near duplicate, so smoothing does nothing).
    """
    keys = smoothing_keys(preds.folds, bursts)
    rows = {f"model:{m}": _model_row(preds.oof[[j]], y, preds.folds, m) for j, m in enumerate(preds.models)}
    cands = candidates(cfg)
    scores = score_candidates(preds.oof, y, preds.folds, cands, tuple(cfg.stacking_c), keys, nested)
    table: dict[str, dict[str, object]] = {}
    for c in cands:
        held = scores.nested[c]
        table[c.name] = {
            **c.to_json(),
            "oof_logloss": kaggle_log_loss(y, scores.in_sample[c]),
            "oof_logloss_nested_cv": None if held is None else kaggle_log_loss(y, held),
            "accuracy_nested_cv": None if held is None else accuracy(y, held),
        }
        table[c.name]["chosen"] = c == scores.chosen
    names = list(preds.models)
    for method in [m for m in METHODS if any(c.method == m for c in cands)]:
        mine = [c for c in cands if c.method == method]
        best = min(mine, key=lambda c: (table[c.name]["oof_logloss_nested_cv"] is None,
                                        table[c.name]["oof_logloss_nested_cv"] or 0.0))
        fit = scores.fitted[best]
        row: dict[str, object] = {}
        for step, (temperature, clip) in STEPS.items():
            twin = Candidate(method, temperature, False, "global" if clip else "none")
            if twin in scores.in_sample:
                row[f"oof_logloss_{step}"] = kaggle_log_loss(y, scores.in_sample[twin])
        row["best_candidate"] = best.name
        row["oof_logloss"] = table[best.name]["oof_logloss"]
        row["accuracy"] = accuracy(y, scores.in_sample[best])
        row["oof_logloss_nested_cv"] = table[best.name]["oof_logloss_nested_cv"]
        row["model_temperatures"] = dict(zip(names, fit.model_temperatures, strict=True))
        if fit.weights is not None and len(names) > 1:
            row["weights"] = dict(zip(names, fit.weights, strict=True))
        if fit.stacking_c is not None:
            row["stacking_c"] = fit.stacking_c
            row["stacker"] = fit.stacker.to_json()
        row["ensemble_temperature"] = fit.temperature
        row["smoothing"] = fit.smoothing
        row["clip"] = list(fit.clip)
        row["fit"] = FIT_NOTES[method]
        rows[method] = row

    chosen = scores.chosen
    own = scores.nested[chosen]
    if scores.with_choice is not None:
        honest, basis = scores.with_choice, "nested CV, the choice among the candidates included"
    elif own is not None:
        honest, basis = own, "nested CV of the chosen candidate (too few folds to score the choice too)"
    else:
        honest, basis = scores.in_sample[chosen], "in-sample (too few folds for a nested estimate)"
    return Evaluation(
        rows=rows,
        candidates=table,
        chosen=chosen,
        fitted=scores.fitted[chosen],
        in_sample=scores.in_sample[chosen],
        honest=honest,
        headline=kaggle_log_loss(y, honest),
        headline_basis=basis,
        nested=None if own is None else kaggle_log_loss(y, own),
        with_choice=None if scores.with_choice is None else kaggle_log_loss(y, scores.with_choice),
        choices=scores.choices,
    )


def format_table(evaluation: Evaluation) -> str:
    """The side-by-side table printed by the stage: single models, then every candidate by nested score."""
    header = f"{'model / candidate':<44}{'raw':>8}{'in-sample':>11}{'nested':>9}{'acc':>7}"
    lines = [header, "-" * len(header)]
    for name, row in evaluation.rows.items():
        if name.startswith("model:"):
            nested = row["oof_logloss_nested_cv"]
            lines.append(f"{name:<44}{row['oof_logloss_raw']:>8.4f}{row['oof_logloss_temperature_clip']:>11.4f}"
                         f"{'-' if nested is None else format(nested, '.4f'):>9}{row['accuracy']:>7.3f}")
    ranked = sorted(evaluation.candidates.items(),
                    key=lambda item: (item[1]["oof_logloss_nested_cv"] is None, item[1]["oof_logloss_nested_cv"]
                                      or item[1]["oof_logloss"]))
    for name, row in ranked:
        nested, acc = row["oof_logloss_nested_cv"], row["accuracy_nested_cv"]
        mark = " <- chosen" if row["chosen"] else ""
        lines.append(f"{name:<44}{'':>8}{row['oof_logloss']:>11.4f}"
                     f"{'-' if nested is None else format(nested, '.4f'):>9}"
                     f"{'' if acc is None else format(acc, '.3f'):>7}{mark}")
    lines.append(f"headline CV {evaluation.headline:.4f} ({evaluation.headline_basis}).")
    lines.append("raw: the model's own OOF; in-sample: fit and scored on all OOF rows (decides nothing); nested: "
                 "every parameter refit without the scored fold (decides the choice).")
    return "\n".join(lines)
