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


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = tmp_path_factory.mktemp("project")
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
        },
    )
    _run([DVC, "init", "--no-scm", "-q"], work)
    shutil.copytree(ROOT / ".dvc" / "plots", work / ".dvc" / "plots", dirs_exist_ok=True)
    _run([DVC, "repro", "score"], work)
    return work


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
