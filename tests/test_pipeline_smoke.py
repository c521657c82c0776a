"""The whole fisheries graph through DVC on a tiny demo, in a temporary copy of the project.

This is what a competitor does after cloning: `dvc repro`, here as `.venv/bin/dvc repro` from a fresh shell
(no activated venv). It checks the wiring a unit test cannot: every stage's command, deps and outs in dvc.yaml,
the params each reads, and that a second run has nothing to do.
"""

import numpy as np
import pandas as pd
import pytest

from pipeline.core.competition import FISH_CLASSES, STAGE2_PREFIX, SUBMISSION_HEADER
from pipeline.core.files import read_json
from tests.downloads import make_download
from tests.projects import fresh_env, make_project, run

pytestmark = pytest.mark.slow


def repro(work, *targets):
    return run([".venv/bin/dvc", "repro", *targets], work, fresh_env(work))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = make_project(tmp_path_factory.mktemp("project"))
    repro(work, "score")
    return work


def test_kaggle_download_with_bad_files_goes_on_to_valid_submissions(tmp_path):
    """A Kaggle-style download (real zip and 7z, planted bad files and zip-slip entries) through dvc repro."""
    work = tmp_path / "kaggle_project"
    download = make_download(work)
    make_project(work, **{"data.source": "kaggle", "model.backbones": ["vgg16"], "cv.n_folds": 2})
    repro(work, "score")
    report = read_json(work / "reports/ingest_report.json")
    assert len(report["quarantine"]) == len(download.bad)
    assert {q["id"] for q in report["quarantine"]} == set(download.bad)
    for stage in ("stg1", "stg2"):
        sub = pd.read_csv(work / f"reports/submission_{stage}.csv")
        sample = pd.read_csv(work / f"data/interim/sample_submission_{stage}.csv")
        assert tuple(sub.columns) == SUBMISSION_HEADER and sorted(sub["image"]) == sorted(sample["image"])
        np.testing.assert_allclose(sub[list(FISH_CLASSES)].sum(1), 1, atol=1e-6)
    for name in download.evil_names:
        assert not list(tmp_path.parent.rglob(name)), f"{name} escaped its archive"


def test_submissions_hold_exactly_the_sample_rows(project):
    for stage in ("stg1", "stg2"):
        sub = pd.read_csv(project / f"reports/submission_{stage}.csv")
        sample = pd.read_csv(project / f"data/interim/sample_submission_{stage}.csv")
        assert tuple(sub.columns) == SUBMISSION_HEADER
        assert sorted(sub["image"]) == sorted(sample["image"])
        probs = sub[list(FISH_CLASSES)].to_numpy()
        assert np.isfinite(probs).all() and (probs >= 0).all()
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)
    stg2 = pd.read_csv(project / "reports/submission_stg2.csv")["image"]
    assert stg2.str.startswith(STAGE2_PREFIX).any() and (~stg2.str.startswith(STAGE2_PREFIX)).any()


def test_metrics_and_leaderboard_say_what_the_run_scored(project):
    metrics = read_json(project / "reports/metrics.json")
    assert set(metrics["cv_logloss"]) == {"vgg16", "resnet50", "ensemble"}
    board = read_json(project / "reports/leaderboard.json")
    assert board["status"] == "scored"
    assert board["cv"]["ensemble_logloss"] == metrics["cv_logloss"]["ensemble"]
    for stage in (1, 2):
        scores = board[f"stage{stage}"]
        assert scores["n_images"] > 0 and np.isfinite(scores["logloss"])
        assert scores["gap_vs_cv"] == pytest.approx(scores["logloss"] - board["cv"]["ensemble_logloss"])


def test_second_repro_has_nothing_to_do(project):
    out = run([".venv/bin/dvc", "status", "score"], project, fresh_env(project))
    assert "up to date" in out, out
