"""A Kaggle-style download through `.venv/bin/dvc repro` in a clone of the project: real zip and 7z archives with
planted bad files and zip-slip entries, on to valid submissions (the demo's whole graph: test_pipeline_smoke.py)."""

import numpy as np
import pandas as pd
import pytest

from pipeline.core.competition import FISH_CLASSES, SUBMISSION_HEADER
from pipeline.core.files import read_json
from tests.downloads import make_download
from tests.projects import fresh_env, make_project, run

pytestmark = pytest.mark.slow


def test_kaggle_download_with_bad_files_goes_on_to_valid_submissions(tmp_path):
    """A Kaggle-style download (real zip and 7z, planted bad files and zip-slip entries) through dvc repro."""
    work = tmp_path / "kaggle_project"
    download = make_download(work)
    make_project(work, **{"data.source": "kaggle", "model.backbones": ["vgg16"], "cv.n_folds": 2})
    run([".venv/bin/dvc", "repro", "score"], work, fresh_env(work))
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
