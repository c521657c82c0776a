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

from pipeline.core import calibration as cal
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


# ---------------------------------------------------------------------------------------- choosing by nested CV


def _redundant_stack(seed=4, n=120):
    """One decent model and four noisy copies of it: mixing them fits noise that the scored rows hold."""
    from pipeline.core.calibration import softmax

    rng = np.random.default_rng(seed)
    y = rng.choice(K, n, p=TRAIN_SHARES)
    folds = rng.permutation(np.arange(n) % 5)
    logits = rng.normal(0, 1, (n, K))
    logits[np.arange(n), y] += 2.0
    stack = np.stack([softmax(logits)] + [softmax(logits + rng.normal(0, 1.0, (n, K))) for _ in range(4)])
    return stack, y, folds


def test_auto_chooses_by_the_nested_score_not_the_in_sample_one():
    """The demo's complaint in miniature: the weighted mean wins in-sample by fitting noise, loses nested."""
    stack, y, folds = _redundant_stack()
    preds = Predictions(tuple(f"m{j}" for j in range(5)), np.arange(len(y)).astype(str), folds, stack, {})
    ev = E.evaluate(preds, y, _cfg(method="auto", temperature=True, clip="none", stacking_c=(0.1,)))
    table = ev.candidates
    assert table["weighted+temperature"]["oof_logloss"] < table["best+temperature"]["oof_logloss"]
    assert table["weighted+temperature"]["oof_logloss_nested_cv"] > table["best+temperature"]["oof_logloss_nested_cv"]
    assert ev.chosen.name == "best+temperature" and table["best+temperature"]["chosen"]
    nested = {n: r["oof_logloss_nested_cv"] for n, r in table.items()}
    assert nested[ev.chosen.name] == min(nested.values())
    assert sum(r["chosen"] for r in table.values()) == 1
    # The headline scores the whole procedure, choice included: not below the winner's own nested score
    # here, since a fold whose choice differs costs something, and it is the loss of the OOF it reports.
    assert ev.headline == ev.with_choice == pytest.approx(kaggle_log_loss(y, ev.honest))
    assert ev.nested == nested[ev.chosen.name]


def test_nested_scores_and_the_choice_match_a_brute_force_refit():
    """Every candidate's nested OOF, and each fold's choice made without it, against plain refits."""
    stack, y, folds = synthetic_stack(n=120, seed=13, n_folds=4)
    bursts = np.arange(120) // 3
    keys = E.smoothing_keys(folds, bursts)
    cands = [E.Candidate(m, t, sm, c) for m in ("best", "weighted", "stacking") for t in (False, True)
             for sm in (False, True) for c in ("none", "per_class")]
    scores = E.score_candidates(stack, y, folds, cands, (0.1, 1.0), keys)

    def refit(c, train, held):
        # One BLAS thread, as score_candidates runs: another thread count sums in another order, and the
        # stacker's solver path drifts by ~1e-8 from it.
        with E.one_blas_thread():
            fit, _ = E.fit_ensemble(c.method, stack[:, train], y[train], folds[train], temperature=c.temperature,
                                    clip=c.clip, stacking_c=(0.1, 1.0), smoothing=c.smoothing, keys=keys[train])
            return E.predict(fit, stack[:, held], keys=keys[held])

    ids = range(4)
    for c in cands:
        expected = np.zeros((120, K))
        for k in ids:
            expected[folds == k] = refit(c, folds != k, folds == k)
        np.testing.assert_allclose(scores.nested[c], expected, rtol=1e-9, atol=1e-12)
    for k in ids:
        inner = {}
        for c in cands:
            parts = [(folds == j, refit(c, (folds != j) & (folds != k), folds == j)) for j in ids if j != k]
            inner[c] = kaggle_log_loss(np.concatenate([y[m] for m, _ in parts]), np.concatenate([p for _, p in parts]))
        assert scores.choices[k] == min(cands, key=inner.get).name
        chosen = next(c for c in cands if c.name == scores.choices[k])
        np.testing.assert_allclose(scores.with_choice[folds == k], scores.nested[chosen][folds == k])


def test_candidates_cover_every_allowed_combination_simplest_first():
    every = E.candidates(_cfg(method="auto", temperature="auto", smoothing="auto", clip="auto"))
    assert len(every) == len(E.METHODS) * 2 * 2 * len(E.CLIPS) == len({c.name for c in every})
    assert every[0] == E.Candidate("best", False, False, "none") and every[-1].method == "stacking"
    assert [c.name for c in E.candidates(_cfg())] == ["weighted+temperature+clip"]
    assert {c.clip for c in E.candidates(_cfg(clip="auto"))} == set(E.CLIPS)


# ------------------------------------------------------------------------------------------- burst smoothing


def test_smoothing_mixes_a_row_with_its_bursts_mean_only():
    proba = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]])
    groups = np.array([7, 7, 3, 7])
    mean = proba[[0, 1, 3]].mean(axis=0)
    out = cal.smooth(proba, groups, 0.5)
    np.testing.assert_allclose(out[[0, 1, 3]], 0.5 * proba[[0, 1, 3]] + 0.5 * mean)
    np.testing.assert_allclose(out[2], proba[2])  # alone in its burst
    np.testing.assert_allclose(cal.smooth(proba, groups, 1.0)[[0, 1, 3]], np.tile(mean, (3, 1)))
    np.testing.assert_allclose(cal.smooth(proba, groups, 0.0), proba)


def test_oof_smoothing_never_crosses_a_fold():
    folds = np.array([0, 0, 1, 1, 2])
    bursts = np.array([5, 5, 5, 6, 5])  # burst 5 spans three folds (a random split would do this)
    keys = E.smoothing_keys(folds, bursts)
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[4]}) == 3 and keys[2] != keys[3]
    proba = np.eye(2)[[0, 1, 0, 1, 1]].astype(float) * 0.8 + 0.1
    smoothed = cal.smooth(proba, keys, 1.0)
    np.testing.assert_allclose(smoothed[2:], proba[2:])  # folds 1 and 2: each row alone in its fold's burst


def test_smoothing_is_chosen_where_bursts_are_one_catch(tmp_path):
    """Frames of a burst share their label and the models' errors are independent per frame: averaging over
    the burst helps, nested CV says so, and the test predictions of a burst move together."""
    paths, _ = write_inputs(tmp_path, burst=4)
    report = _run(tmp_path, smoothing="auto")
    chosen = report["chosen"]
    assert chosen["smoothing"] and report["fitted"]["smoothing"] > 0
    assert chosen["oof_logloss_nested_cv"] < chosen["smoothing_twin"]["oof_logloss_nested_cv"]
    assert report["bursts"]["test_stg2"]["bursts"] == 10 and report["bursts"]["train"]["images_in_bursts"] == 240
    test = pd.read_csv(Path(paths.ensemble) / "test_stg2.csv")[list(FISH_CLASSES)].to_numpy()
    spread = lambda p: np.mean([p[i : i + 4].std(axis=0).sum() for i in range(0, 40, 4)])  # noqa: E731
    _run(tmp_path, smoothing=False)
    alone = pd.read_csv(Path(paths.ensemble) / "test_stg2.csv")[list(FISH_CLASSES)].to_numpy()
    assert spread(test) < 0.5 * spread(alone)


def test_predict_smooths_only_when_given_the_bursts():
    stack, y, folds = synthetic_stack(n=120, seed=14)
    keys = E.smoothing_keys(folds, np.arange(120) // 3)
    fitted, oof = E.fit_ensemble("mean", stack, y, folds, temperature=True, clip="global", smoothing=True, keys=keys)
    assert fitted.smoothing > 0
    np.testing.assert_allclose(E.predict(fitted, stack, keys=keys), oof, rtol=1e-9, atol=1e-12)
    plain = E.predict(dataclasses.replace(fitted, smoothing=0.0), stack)
    np.testing.assert_allclose(E.predict(fitted, stack), plain)  # no bursts given: every row alone
    assert not np.allclose(E.predict(fitted, stack, keys=keys), plain)


# -------------------------------------------------------------------------------------------- per-class clip


def test_class_floors_rise_where_a_class_is_missed_with_confidence():
    """BET frames predicted as a confident ALB now and then (the hard confusion): a floor for BET pays, the
    other classes keep the global one, and the OOF loss never rises above the global clip's."""
    rng = np.random.default_rng(3)
    n = 600
    y = rng.choice(K, n, p=TRAIN_SHARES)
    logits = rng.normal(0, 0.5, (n, K))
    logits[np.arange(n), y] += 4.0
    bet, alb = FISH_CLASSES.index("BET"), FISH_CLASSES.index("ALB")
    fooled = np.flatnonzero(y == bet)[::2]
    logits[fooled, alb] += 12.0
    logits[:, bet] -= 6.0 * (np.arange(n) % 2)  # half of all rows rule BET out entirely
    proba = cal.softmax(logits)
    floor, ceiling = cal.fit_clip(proba, y)
    floors = cal.fit_class_floors(proba, y, floor, ceiling)
    assert floors[bet] > floor and floors[bet] == max(floors)
    global_loss = kaggle_log_loss(y, cal.apply_clip(proba, floor, ceiling))
    assert kaggle_log_loss(y, cal.apply_clip(proba, np.asarray(floors), ceiling)) < global_loss - 0.005


def test_fit_clip_is_the_plain_grid_search():
    """The vectorised grid search returns what a loop over the pairs with the real metric returns."""
    rng = np.random.default_rng(5)
    for seed in range(3):
        y = rng.integers(0, K, 200)
        z = rng.normal(0, 1, (200, K))
        z[np.arange(200), y] += 1.0
        proba = cal.softmax(z * (1 + 3 * seed))
        best, best_loss = (0.0, 1.0), kaggle_log_loss(y, proba)
        for f in cal.CLIP_FLOORS:
            for c in cal.CLIP_CEILINGS:
                if f >= 1 / K or c <= 1 / K or (f, c) == (0.0, 1.0):
                    continue
                loss = kaggle_log_loss(y, cal.apply_clip(proba, f, c))
                if loss < best_loss - 1e-12:
                    best, best_loss = (f, c), loss
        assert cal.fit_clip(proba, y) == best


def test_per_class_clip_goes_through_predict_and_json():
    stack, y, folds = synthetic_stack(n=300, seed=15)
    keys = E.smoothing_keys(folds, np.arange(300) // 2)
    fitted, oof = E.fit_ensemble("weighted", stack, y, folds, temperature=True, clip="per_class", smoothing=True,
                                 keys=keys)
    assert fitted.class_floors is not None and len(fitted.class_floors) == K
    np.testing.assert_allclose(E.predict(fitted, stack, keys=keys), oof, rtol=1e-9, atol=1e-12)
    back = E.fitted_from_json(json.loads(json.dumps(E.fitted_to_json(fitted))))
    assert back == fitted
    old = {k: v for k, v in E.fitted_to_json(fitted).items() if k not in ("class_floors", "smoothing")}
    assert E.fitted_from_json(old).class_floors is None and E.fitted_from_json(old).smoothing == 0.0
