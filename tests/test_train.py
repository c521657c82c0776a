"""Train stage on tiny generated data: outputs a user relies on, honest folds, and resume after a kill."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from pipeline.core.competition import FISH_CLASSES
from pipeline.stages import train
from tests.factories import ROOT
from tests.factories import train_inputs as _prepare


def test_train_stage_writes_oof_and_test_predictions(tmp_path):
    s, manifest = _prepare(tmp_path)
    report = train.run("vgg16", s)
    pred_dir = tmp_path / s.paths.predictions / "vgg16"
    oof = pd.read_csv(pred_dir / "oof.csv")
    assert list(oof.columns) == ["id", "fold", *FISH_CLASSES]
    assert set(oof["id"]) == set(manifest.loc[manifest.split == "train", "id"])
    np.testing.assert_allclose(oof[list(FISH_CLASSES)].sum(1), 1, atol=1e-4)
    for split in ("test_stg1", "test_stg2"):
        test = pd.read_csv(pred_dir / f"{split}.csv")
        assert set(test["id"]) == set(manifest.loc[manifest.split == split, "id"])
    # Grouped folds: no boat group appears in two folds.
    groups = manifest.set_index("id").loc[oof["id"], "group"].to_numpy()
    for g in np.unique(groups):
        assert oof.loc[groups == g, "fold"].nunique() == 1
    saved = json.loads((tmp_path / s.paths.train_reports / "vgg16.json").read_text())
    assert saved["cv_logloss"] == pytest.approx(report["cv_logloss"])
    assert {"boat", "none"} <= set(report["leak_check"])
    assert np.isfinite(saved["cv_logloss_unpeeked"]) and len(saved["best_epochs"]) == s.cv.n_folds
    assert all(1 <= e <= s.train.epochs for e in saved["best_epochs"])
    assert "stg2_logloss" in report
    assert (pred_dir / "models" / "head_fold2.keras").exists()
    assert (tmp_path / s.paths.figures / "vgg16" / "confusion.png").exists()


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    full, _ = _prepare(tmp_path / "full")
    train.run("vgg16", full)
    expected = pd.read_csv(tmp_path / "full" / full.paths.predictions / "vgg16" / "oof.csv")

    killed, _ = _prepare(tmp_path / "killed")
    real_run_fold = train.run_fold

    def dies_after_first_fold(k, *args, **kwargs):
        if k == 1:
            raise KeyboardInterrupt("killed")
        return real_run_fold(k, *args, **kwargs)

    monkeypatch.setattr(train, "run_fold", dies_after_first_fold)
    with pytest.raises(KeyboardInterrupt):
        train.run("vgg16", killed)
    monkeypatch.setattr(train, "run_fold", real_run_fold)
    calls = []
    monkeypatch.setattr(train, "run_fold", lambda k, *a, **kw: calls.append(k) or real_run_fold(k, *a, **kw))
    train.run("vgg16", killed)
    assert 0 not in calls[: len(calls) - 3], "fold 0 was finished before the kill and must not be retrained"
    resumed = pd.read_csv(tmp_path / "killed" / killed.paths.predictions / "vgg16" / "oof.csv")
    np.testing.assert_allclose(resumed[list(FISH_CLASSES)], expected[list(FISH_CLASSES)], atol=1e-5)


@pytest.mark.slow
def test_embeddings_are_cached_and_reused(tmp_path, monkeypatch):
    s, _ = _prepare(tmp_path)
    train.run("vgg16", s)
    monkeypatch.setattr(train, "compute_embeddings", lambda *a, **k: pytest.fail("cache was not reused"))
    train.run("vgg16", s)


@pytest.mark.slow
def test_every_model_of_the_stage_trains_under_a_multi_device_strategy(tmp_path):
    """Two virtual CPUs stand in for two GPUs: the strategy configure_devices picks must carry the stage.

    Runs in a fresh interpreter, because devices can only be split before TensorFlow starts; nothing is
    patched: configure_devices sees the two devices itself.
    """
    _prepare(tmp_path, **{"train.fine_tune.enabled": True, "train.fine_tune.epochs": 1, "train.epochs": 2,
                          "cv.n_folds": 2})
    script = textwrap.dedent("""
        import json, sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from pipeline.core.params import load
        from pipeline.stages import train
        report = train.run("vgg16", load(train.Settings, sys.argv[1]))
        print("DEVICES", json.dumps(report["devices"]), report["cv_logloss"])
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "params.yaml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("DEVICES"))
    devices = json.loads(line.split(" ", 1)[1].rsplit(" ", 1)[0])
    assert devices["strategy"] == "MirroredStrategy" and devices["replicas"] == 2
    assert np.isfinite(float(line.rsplit(" ", 1)[1]))


@pytest.mark.slow
def test_fine_tuning_trains_end_to_end_and_keeps_each_folds_model(tmp_path):
    s, _ = _prepare(tmp_path, **{"train.fine_tune.enabled": True, "train.fine_tune.epochs": 2,
                                 "train.fine_tune.unfreeze_blocks": 1})
    report = train.run("vgg16", s)
    pred_dir = tmp_path / s.paths.predictions / "vgg16"
    curves = pd.read_csv(tmp_path / s.paths.train_reports / "curves" / "vgg16.csv")
    assert np.isfinite(report["cv_logloss"]) and report["fine_tuned"]
    assert len(report["fine_tune_epochs"]) == 3 and min(report["fine_tune_epochs"]) >= 1
    assert set(curves["fold"]) == {0, 1, 2}
    oof = pd.read_csv(pred_dir / "oof.csv")
    np.testing.assert_allclose(oof[list(FISH_CLASSES)].sum(1), 1, atol=1e-4)
    # The fine-tuned classifier made the predictions, so it is what each fold keeps, and it reproduces them.
    model = keras.saving.load_model(pred_dir / "models" / "classifier_fold0.keras")
    manifest = pd.read_csv(s.paths.manifest, keep_default_na=False)
    rows = np.flatnonzero((manifest.split == "train").to_numpy())[oof.index[oof.fold == 0]]
    views = np.load(s.paths.views)
    again = np.mean([model.predict(views[v][rows], verbose=0) for v in range(s.augment.tta_views)], 0)
    np.testing.assert_allclose(again, oof.loc[oof.fold == 0, list(FISH_CLASSES)], atol=1e-4)


def test_unpeeked_out_of_fold_predictions_never_use_their_own_folds_labels(tmp_path):
    s, _ = _prepare(tmp_path)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    y = np.arange(40) % 8
    feats = rng.normal(size=(3, 40, 16)).astype(np.float32) + y[None, :, None] * 0.3
    folds = np.arange(40) % 4
    before = train.unpeeked_oof(feats, np.arange(40), y, folds, [3, 2, 4, 3], s)
    relabelled = y.copy()
    relabelled[folds == 0] = rng.permutation(relabelled[folds == 0])
    after = train.unpeeked_oof(feats, np.arange(40), relabelled, folds, [3, 2, 4, 3], s)
    np.testing.assert_allclose(after[folds == 0], before[folds == 0], atol=1e-6)
    assert not np.allclose(after[folds == 1], before[folds == 1])  # the other folds did train on those labels
