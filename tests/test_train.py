"""Train stage on tiny generated data: outputs a user relies on, honest folds, and resume after a kill."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline import augment, config, train
from pipeline.config import FISH_CLASSES
from tests.factories import synthetic_images, tiny_params


def _prepare(root, **overrides):
    raw = tiny_params(root, **overrides)
    manifest = synthetic_images(root, raw)
    aug = config.load_section("augment", raw)
    images = np.load(raw["paths"]["images"])
    views = augment.make_views(images, (manifest.split == "train").to_numpy(), aug, seed=raw["seed"])
    np.save(raw["paths"]["views"], views)
    return train.load_settings(root / "params.yaml"), manifest


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
    assert "stg2_logloss" in report
    assert (pred_dir / "models" / "head_fold2.keras").exists()
    assert (tmp_path / s.paths.figures / "vgg16" / "confusion.png").exists()


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


def test_embeddings_are_cached_and_reused(tmp_path, monkeypatch):
    s, _ = _prepare(tmp_path)
    train.run("vgg16", s)
    monkeypatch.setattr(train, "compute_embeddings", lambda *a, **k: pytest.fail("cache was not reused"))
    train.run("vgg16", s)
