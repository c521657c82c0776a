"""The whole fisheries graph through DVC on a tiny demo, in a temporary copy of the project.

This is what a competitor does after cloning: `dvc repro`. It checks the wiring a unit test cannot: every
stage's command, deps and outs in dvc.yaml, the params each reads, and that a second run has nothing to do.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import FISH_CLASSES
from pipeline.io import read_json
from tests.factories import ROOT, tiny_params

DVC = str(Path(sys.executable).with_name("dvc"))
HEADER = ["image", *FISH_CLASSES]


def _run(cmd, cwd):
    # dvc.yaml's commands call `python`: the interpreter running the tests, as `make repro` arranges.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _make_project(work, **overrides):
    shutil.copytree(ROOT / "pipeline", work / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    tiny_params(
        work,
        relative=True,
        **{
            "demo.n_train": 72,
            "demo.n_test_stg1": 16,
            "demo.n_test_stg2": 24,
            "demo.width": 192,
            "model.backbones": ["vgg16", "resnet50"],
            **overrides,
        },
    )
    _run([DVC, "init", "--no-scm", "-q"], work)
    shutil.copytree(ROOT / ".dvc" / "plots", work / ".dvc" / "plots", dirs_exist_ok=True)
    _run([DVC, "repro", "score"], work)
    return work


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return _make_project(tmp_path_factory.mktemp("project"))


def test_kaggle_download_with_bad_files_goes_on_to_valid_submissions(tmp_path):
    """A Kaggle-style download (real zip and 7z, planted bad files and zip-slip entries) through dvc repro."""
    from tests.test_ingest import make_download

    work = tmp_path / "kaggle_project"
    work.mkdir()
    download = make_download(work)
    _make_project(work, **{"data.source": "kaggle", "model.backbones": ["vgg16"], "cv.n_folds": 2})
    report = read_json(work / "reports/ingest_report.json")
    assert len(report["quarantine"]) == len(download.bad)
    for stage in ("stg1", "stg2"):
        sub = pd.read_csv(work / f"reports/submission_{stage}.csv")
        sample = pd.read_csv(work / f"data/interim/sample_submission_{stage}.csv")
        assert list(sub.columns) == HEADER and sorted(sub["image"]) == sorted(sample["image"])
        np.testing.assert_allclose(sub[list(FISH_CLASSES)].sum(1), 1, atol=1e-6)
    for name in download.evil_names:
        assert not list(tmp_path.parent.rglob(name)), f"{name} escaped its archive"


def test_submissions_hold_exactly_the_sample_rows(project):
    for stage in ("stg1", "stg2"):
        sub = pd.read_csv(project / f"reports/submission_{stage}.csv")
        sample = pd.read_csv(project / f"data/interim/sample_submission_{stage}.csv")
        assert list(sub.columns) == HEADER
        assert sorted(sub["image"]) == sorted(sample["image"])
        probs = sub[list(FISH_CLASSES)].to_numpy()
        assert np.isfinite(probs).all() and (probs >= 0).all()
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)
    stg2 = pd.read_csv(project / "reports/submission_stg2.csv")["image"]
    assert stg2.str.startswith("test_stg2/").any() and (~stg2.str.startswith("test_stg2/")).any()


def test_metrics_and_leaderboard_are_written(project):
    metrics = read_json(project / "reports/metrics.json")
    assert metrics
    leaderboard = read_json(project / "reports/leaderboard.json")
    assert leaderboard
    text = str(leaderboard)
    assert "stg1" in text or "stage1" in text or "stage_1" in text


def test_second_repro_has_nothing_to_do(project):
    out = _run([DVC, "status", "score"], project)
    assert "up to date" in out, out
