"""Ensemble combiners and the ensemble stage, on generated per-model predictions.

The honesty properties are the point: the weighted mean can never lose to the best single model on the rows
it was fit on, and every stacking (and nested) prediction of a row comes from a fit that never saw its fold.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import ensembling as E
from pipeline.core.calibration import class_shares
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.manifest import read_manifest, train_labels
from pipeline.core.metrics import kaggle_log_loss
from pipeline.core.params import Ensemble, load
from pipeline.core.predictions import Predictions, read_predictions
from pipeline.stages import ensemble
from tests.factories import MODELS, TRAIN_SHARES, K, synthetic_stack, write_inputs


def _fit_loss(method, stack, y, folds, **flags):
    return kaggle_log_loss(y, E.fit_ensemble(method, stack, y, folds, **flags)[1])


# ---------------------------------------------------------------------------------------------- combiners


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tempered", [False, True])
def test_weighted_mean_never_worse_than_best_single_model(seed, tempered):
    stack, y, folds = synthetic_stack(seed=seed)
    if seed == 3:  # one good model among pure noise: the weights must find it
        stack[1:] = np.random.default_rng(9).dirichlet(np.ones(K), size=(2, len(y)))
    flags = {"temperature": tempered, "clip": False}
    weighted = _fit_loss("weighted", stack, y, folds, **flags)
    singles = [_fit_loss("mean", stack[[j]], y, folds, **flags) for j in range(len(stack))]
    assert weighted <= min(singles) + 1e-12
    assert weighted <= _fit_loss("mean", stack, y, folds, **flags) + 1e-12
    w = E.fit_simplex_weights(stack, y, tempered=tempered)
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    if seed == 3:
        assert w[0] > 0.9


def test_weighted_mean_beats_every_single_model_on_complementary_models():
    stack, y, folds = synthetic_stack(seed=11)
    raw_singles = [kaggle_log_loss(y, p) for p in stack]
    assert _fit_loss("weighted", stack, y, folds, temperature=True, clip=True) < min(raw_singles) - 0.05


def test_geometric_and_mean_by_hand():
    a = np.array([[0.8, 0.2], [0.5, 0.5]])
    b = np.array([[0.2, 0.8], [0.9, 0.1]])
    stack = np.stack([a, b])
    np.testing.assert_allclose(E.combine_mean(stack, np.array([0.5, 0.5])), [[0.5, 0.5], [0.7, 0.3]])
    g = np.sqrt(a * b)
    np.testing.assert_allclose(
        E.combine_geometric(stack, np.array([0.5, 0.5])), g / g.sum(axis=1, keepdims=True)
    )


def test_best_picks_the_lowest_oof_loss():
    stack, y, folds = synthetic_stack(seed=2)
    fitted, _ = E.fit_ensemble("best", stack, y, folds, temperature=False, clip=False)
    assert fitted.weights == tuple(np.eye(3)[int(np.argmin([kaggle_log_loss(y, p) for p in stack]))])


@pytest.mark.parametrize("method", ["mean", "weighted", "geometric", "best"])
def test_predict_reproduces_the_fitted_oof_predictions(method):
    stack, y, folds = synthetic_stack(seed=4)
    fitted, oof = E.fit_ensemble(method, stack, y, folds, temperature=True, clip=True)
    np.testing.assert_allclose(E.predict(fitted, stack), oof, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", E.METHODS)
def test_calibration_never_raises_the_oof_loss_of_a_method(method):
    stack, y, folds = synthetic_stack(seed=5)
    losses = [_fit_loss(method, stack, y, folds, temperature=t, clip=c) for t, c in E.STEPS.values()]
    # Clipping acts on the same combined predictions as the step before it, so it can only help.
    assert losses[2] <= losses[1] + 1e-12
    # Per-model temperatures change what is combined (and the weights or stacker refit on it), so only the
    # best single model is guaranteed not to lose from them; the report shows every step for the others.
    if method == "best":
        assert losses[1] <= losses[0] + 1e-12


# ----------------------------------------------------------------------------------------------- honesty


def _row_index(stack):
    """Map each row (across all models) to its index; the generated rows are all distinct."""
    index = {stack[:, i].tobytes(): i for i in range(stack.shape[1])}
    assert len(index) == stack.shape[1]
    return index


def test_stacking_predicts_each_fold_with_a_model_that_never_saw_it(monkeypatch):
    stack, y, folds = synthetic_stack(n=200, seed=6)
    index = _row_index(stack)
    fit = E.fit_stacker
    seen = []

    class Spy:
        """A fitted stacker that remembers the rows it was fit on and records the rows it scores."""

        def __init__(self, model, rows):
            self.model, self.rows = model, rows

        def proba(self, s):
            seen.append((self.rows, {index[s[:, i].tobytes()] for i in range(s.shape[1])}))
            return self.model.proba(s)

    def spy_fit(s, yy, c):
        return Spy(fit(s, yy, c), {index[s[:, i].tobytes()] for i in range(s.shape[1])})

    monkeypatch.setattr(E, "fit_stacker", spy_fit)
    E.cross_fit_stacker(stack, y, folds, 1.0)
    assert len(seen) == len(np.unique(folds))
    predicted = set()
    for trained_on, scored in seen:
        assert not trained_on & scored
        (fold,) = set(folds[sorted(scored)])  # one fold scored per stacker
        assert trained_on == set(np.flatnonzero(folds != fold))
        predicted |= scored
    assert predicted == set(range(len(y)))


def test_stacking_oof_is_not_the_optimistic_in_sample_score():
    # Uninformative models and many features: an in-sample fit finds structure that is not there.
    rng = np.random.default_rng(0)
    n = 160
    y = rng.choice(K, n, p=TRAIN_SHARES)
    folds = np.arange(n) % 4
    stack = rng.dirichlet(np.ones(K), size=(4, n))
    in_sample = kaggle_log_loss(y, E.fit_stacker(stack, y, 100.0).proba(stack))
    fitted, oof = E.fit_ensemble(
        "stacking", stack, y, folds, temperature=False, clip=False, stacking_c=(100.0,)
    )
    reported = kaggle_log_loss(y, oof)
    prior = kaggle_log_loss(y, np.tile(class_shares(y, K), (n, 1)))
    assert in_sample < prior - 0.2  # the optimism a non-cross-fitted stacker would report
    assert reported > prior  # honest: noise cannot beat the class prior out of fold
    # ...and it is exactly the cross-fitted stacker's output (temperature 1 only renormalises the inputs).
    np.testing.assert_allclose(oof, E.cross_fit_stacker(E._temper(stack, (1.0,) * 4), y, folds, 100.0))


def test_nested_cv_refits_everything_without_the_scored_fold(monkeypatch):
    stack, y, folds = synthetic_stack(n=150, seed=7, n_folds=3)
    index = _row_index(stack)
    fit = E.fit_ensemble
    trained = []

    def spy(method, s, yy, ff, **kw):
        trained.append({index[s[:, i].tobytes()] for i in range(s.shape[1])})
        return fit(method, s, yy, ff, **kw)

    monkeypatch.setattr(E, "fit_ensemble", spy)
    out = E.nested_oof("stacking", stack, y, folds, temperature=True, clip=True, stacking_c=(0.1, 1.0))
    assert out.shape == (150, K)
    assert [rows for rows in trained] == [set(np.flatnonzero(folds != k)) for k in range(3)]


def test_stacking_regularisation_is_the_lowest_cross_fitted_loss_of_the_grid():
    stack, y, folds = synthetic_stack(n=160, seed=12, n_folds=4)
    grid = (0.001, 0.1, 10.0)
    losses = {c: kaggle_log_loss(y, E.cross_fit_stacker(stack, y, folds, c)) for c in grid}
    c, oof = E.select_stacking_c(stack, y, folds, grid)
    assert losses[c] == min(losses.values())
    np.testing.assert_allclose(oof, E.cross_fit_stacker(stack, y, folds, c))
    fitted, _ = E.fit_ensemble("stacking", stack, y, folds, temperature=False, clip=False, stacking_c=grid)
    assert fitted.stacking_c == c
    # The stacker kept for the test sets is the fit on every OOF row at the chosen strength.
    np.testing.assert_allclose(fitted.stacker.proba(stack), E.fit_stacker(stack, y, c).proba(stack))


def test_stacking_needs_folds():
    stack, y, _ = synthetic_stack(n=50)
    with pytest.raises(ValueError, match="two folds"):
        E.cross_fit_stacker(stack, y, np.zeros(50, dtype=int), 1.0)
    assert E.nested_oof("stacking", stack, y, np.arange(50) % 2, temperature=False, clip=False) is None


# -------------------------------------------------------------------------------------------------- stage


def _cfg(**changes):
    base = {
        "method": "weighted",
        "temperature": True,
        "smoothing": False,
        "clip": "global",
        "prior": "train",
        "stacking_c": (0.01, 0.1, 1.0),
    }
    return Ensemble(**{**base, **changes})


def _run(root, **changes) -> dict:
    """The stage on the inputs `write_inputs` left in `root`, with `ensemble` settings changed."""
    s = load(ensemble.Settings, root / "params.yaml")
    return ensemble.run(dataclasses.replace(s, ensemble=_cfg(**changes)))


def test_stage_writes_predictions_metrics_report_and_figure(tmp_path):
    paths, _ = write_inputs(tmp_path)
    report = _run(tmp_path)

    oof = pd.read_csv(Path(paths.ensemble) / "oof.csv")
    assert list(oof.columns) == ["id", "fold", *FISH_CLASSES] and len(oof) == 240
    for name, n in (("test_stg1", 40), ("test_stg2", 40)):
        test = pd.read_csv(Path(paths.ensemble) / f"{name}.csv")
        assert list(test.columns) == ["id", *FISH_CLASSES] and len(test) == n
        np.testing.assert_allclose(test[list(FISH_CLASSES)].sum(axis=1), 1.0)
    assert (Path(paths.figures) / "ensemble" / "reliability.png").stat().st_size > 1000

    metrics = json.loads(Path(paths.metrics).read_text())
    assert set(metrics["cv_logloss"]) == {*MODELS, "ensemble"}
    assert metrics["method"] == "weighted" and metrics["candidate"] == "weighted+temperature+clip"
    # One basis: single models raw out of fold, the ensemble its nested CV (one candidate: nothing to choose).
    assert metrics["cv_logloss"]["ensemble"] == metrics["cv_logloss_nested"]["ensemble"]
    assert metrics["cv_logloss_in_sample"]["ensemble"] <= metrics["cv_logloss"]["ensemble"]
    assert metrics["cv_logloss"]["ensemble"] <= min(metrics["cv_logloss"][bb] for bb in MODELS)
    assert set(metrics["cv_accuracy"]) == {*MODELS, "ensemble"}

    saved = json.loads(Path(paths.ensemble_report).read_text())
    assert "mlflow_run_id" not in saved and saved["chosen"]["method"] == "weighted"  # outputs are pure
    assert saved["fitted"]["method"] == "weighted" and len(saved["fitted"]["model_temperatures"]) == len(MODELS)
    assert set(saved["results"]) == {*(f"model:{bb}" for bb in MODELS), "weighted"}
    assert list(saved["candidates"]) == ["weighted+temperature+clip"] and saved["candidates"][
        "weighted+temperature+clip"]["chosen"]
    assert "in-sample" in saved["results"]["weighted"]["fit"]
    row = saved["results"]["weighted"]
    assert set(row["weights"]) == set(MODELS) and sum(row["weights"].values()) == pytest.approx(1.0)
    assert report["table"].count("\n") >= len(MODELS) + 1
    assert saved["pool"]["n_train"] == 240 and saved["pool"]["key"] == f"{saved['pool']['data']}-" \
        f"{saved['pool']['folds']}"
    # The written OOF file is what the headline CV scores: each fold predicted by a fit that never saw it.
    y = train_labels(read_manifest(paths.manifest), oof["id"].to_numpy())
    assert kaggle_log_loss(y, oof[list(FISH_CLASSES)].to_numpy()) == pytest.approx(
        saved["chosen"]["cv_logloss"], rel=1e-6
    )
    baselines = saved["baselines"]
    assert baselines["class_prior_oof"] > baselines["class_prior"]  # fit on the scored rows, the prior flatters


def test_prior_correction_changes_test_predictions_only(tmp_path):
    paths, _ = write_inputs(tmp_path)
    _run(tmp_path, method="mean")
    before = {n: pd.read_csv(Path(paths.ensemble) / f"{n}.csv") for n in ("oof", "test_stg2")}
    _run(tmp_path, method="mean", prior="uniform")
    after = {n: pd.read_csv(Path(paths.ensemble) / f"{n}.csv") for n in ("oof", "test_stg2")}
    pd.testing.assert_frame_equal(before["oof"], after["oof"])
    cols = list(FISH_CLASSES)
    # A uniform target raises the rare classes (LAG: 1.8 % of train) relative to ALB (45 %).
    ratio = lambda t: (t["LAG"] / t["ALB"]).to_numpy()  # noqa: E731
    assert np.all(ratio(after["test_stg2"]) > ratio(before["test_stg2"]))
    np.testing.assert_allclose(after["test_stg2"][cols].sum(axis=1), 1.0)


def test_inputs_that_disagree_are_refused(tmp_path):
    paths, _ = write_inputs(tmp_path)
    oof_file = Path(paths.predictions) / "resnet50" / "oof.csv"
    oof = pd.read_csv(oof_file)
    oof.loc[0, "fold"] = (oof.loc[0, "fold"] + 1) % 4
    oof.to_csv(oof_file, index=False)
    with pytest.raises(ValueError, match="different folds"):
        read_predictions(paths.predictions, tuple(MODELS))
    with pytest.raises(FileNotFoundError, match="run the train stage"):
        read_predictions(paths.predictions, ("vgg16", "densenet"))


def test_main_records_an_mlflow_run_tagged_with_the_reports_digest(tmp_path, monkeypatch):
    paths, _ = write_inputs(tmp_path, backbones=("vgg16", "resnet50"), **{"ensemble.method": "stacking"})
    monkeypatch.chdir(tmp_path)
    ensemble.main([])
    report = json.loads(Path(paths.ensemble_report).read_text())
    import mlflow

    from pipeline.core import tracking
    from pipeline.core.files import file_digest

    s = load(ensemble.Settings, tmp_path / "params.yaml")
    run_id = tracking.find_run(s.tracking, tracking.REPORT_TAG, file_digest(paths.ensemble_report))
    assert run_id, "the ensemble run is found by the digest of the report it wrote"
    run = mlflow.MlflowClient(tracking.tracking_uri()).get_run(run_id)
    assert run.info.run_name.startswith("ensemble")
    assert run.data.params["ensemble.method"] == "stacking"
    assert run.data.metrics["oof_logloss.chosen"] == pytest.approx(report["chosen"]["oof_logloss_in_sample"])
    assert run.data.metrics["cv_logloss"] == pytest.approx(report["chosen"]["cv_logloss"])
    assert run.data.tags[tracking.POOL_TAG] == report["pool"]["key"]
    assert "oof_logloss.stacking" in run.data.metrics and "oof_logloss.model.vgg16" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient(tracking.tracking_uri()).list_artifacts(run_id)}
    assert {"figures", "ensemble_report.json"} <= artifacts


def test_clip_without_temperature_is_scored_as_configured():
    stack, y, folds = synthetic_stack(n=200, seed=8)
    preds = Predictions(tuple(MODELS), np.arange(200).astype(str), folds, stack, {})
    ev = E.evaluate(preds, y, _cfg(method="mean", temperature=False, clip="global"), nested=False)
    assert ev.fitted.model_temperatures == (1.0, 1.0, 1.0) and ev.fitted.temperature == 1.0
    row = ev.candidates["mean+clip"]
    assert row["oof_logloss"] <= kaggle_log_loss(y, E.combine_mean(stack, np.full(3, 1 / 3))) + 1e-12
    assert row["oof_logloss_nested_cv"] is None and ev.nested is None
    assert ev.headline_basis.startswith("in-sample")


def test_the_stackers_own_prediction_is_scikit_learns():
    """The stacker is fit by scikit-learn and predicted by `Stacker.proba` (so the served model needs no
    pickled estimator): the two must agree, a stacker that saw only some classes included."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(2)
    for n_classes in (8, 5, 2):
        y = rng.integers(0, n_classes, 120)
        stack = rng.dirichlet(np.ones(K), size=(2, 120))
        stack[:, np.arange(120), y] += 0.5
        x = E.stack_features(stack)
        scaler = StandardScaler().fit(x)
        reference = LogisticRegression(C=0.3, max_iter=2000).fit(scaler.transform(x), y)
        fresh = rng.dirichlet(np.ones(K), size=(2, 30))
        expected = np.full((30, K), 1e-15)
        expected[:, reference.classes_] = reference.predict_proba(scaler.transform(E.stack_features(fresh)))
        got = E.fit_stacker(stack, y, 0.3).proba(fresh)
        np.testing.assert_allclose(got, expected / expected.sum(1, keepdims=True), rtol=1e-6, atol=1e-9)
        if n_classes < K:
            assert got[:, n_classes:].max() < 1e-12  # an unseen class gets the floor only


def test_a_fitted_ensemble_survives_its_json_round_trip():
    stack, y, folds = synthetic_stack(n=200, seed=3)
    fresh = synthetic_stack(n=50, seed=4)[0]
    for method in E.METHODS:
        fitted, _ = E.fit_ensemble(method, stack, y, folds, temperature=True, clip=True, stacking_c=(0.1, 1.0))
        back = E.fitted_from_json(json.loads(json.dumps(E.fitted_to_json(fitted))))
        np.testing.assert_allclose(E.predict(back, fresh), E.predict(fitted, fresh), rtol=1e-12, atol=1e-15)
