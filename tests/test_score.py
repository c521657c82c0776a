"""The local leaderboard: Kaggle's scoring by hand, stage 2 on its own rows only, and the stage chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.competition import FISH_CLASSES
from pipeline.core.metrics import EPS
from pipeline.stages import ensemble, score, submit
from tests.factories import write_inputs

K = len(FISH_CLASSES)
ROOT = Path(__file__).resolve().parents[1]


def _sub(rows: dict[str, list[float]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows.values()), columns=list(FISH_CLASSES))
    frame.insert(0, "image", list(rows))
    return frame


def test_scores_match_a_hand_computation():
    solution = pd.DataFrame(
        {
            "image": ["img_1.jpg", "img_2.jpg", "test_stg2/image_1.jpg", "test_stg2/image_2.jpg"],
            "label": ["ALB", "BET", "YFT", "ALB"],
            "stage": [1, 1, 2, 2],
        }
    )
    stage1 = _sub(
        {
            # Not normalised: ALB is 0.5 after Kaggle divides by the row sum.
            "img_1.jpg": [2, 0, 0, 0, 0, 0, 0, 2],
            "img_2.jpg": [1, 0, 0, 0, 0, 0, 0, 0],  # BET is 0: clipped to 1e-15
        }
    )
    stage2 = _sub(
        {
            # Stage-1 rows in the stage-2 file are not scored there, however bad they are.
            "img_1.jpg": [0, 1, 0, 0, 0, 0, 0, 0],
            "img_2.jpg": [1, 0, 0, 0, 0, 0, 0, 0],
            "test_stg2/image_1.jpg": [0.1, 0, 0, 0, 0, 0, 0.1, 0.8],
            "test_stg2/image_2.jpg": [0.25] * 4 + [0] * 4,
        }
    )
    y_train = np.array([0, 0, 0, 1])  # shares: ALB 0.75, BET 0.25, the rest 0
    cv = {"cv_logloss": {"ensemble": 0.5}, "method": "weighted"}
    board = score.leaderboard({1: stage1, 2: stage2}, solution, y_train, cv)

    s1 = (-np.log(0.5) - np.log(EPS)) / 2
    s2 = (-np.log(0.8) - np.log(0.25)) / 2
    assert board["status"] == "scored"
    assert board["stage1"]["logloss"] == pytest.approx(s1, rel=1e-12)
    assert board["stage2"]["logloss"] == pytest.approx(s2, rel=1e-12)
    assert board["stage1"]["n_images"] == 2 and board["stage2"]["n_images"] == 2
    assert board["stage1"]["accuracy"] == 0.5  # img_1: ALB ties YFT, argmax takes ALB; img_2 wrong
    assert board["stage2"]["accuracy"] == 1.0
    assert board["stage1"]["gap_vs_cv"] == pytest.approx(s1 - 0.5)
    assert board["stage1"]["baseline_uniform"] == pytest.approx(np.log(8))
    assert board["stage1"]["baseline_class_prior"] == pytest.approx((-np.log(0.75) - np.log(0.25)) / 2)
    assert board["stage2"]["baseline_class_prior"] == pytest.approx(
        (-np.log(EPS) - np.log(0.75)) / 2, rel=1e-9
    )
    assert "stage 1" in score.format_board(board)


def test_a_solution_image_missing_from_the_submission_is_an_error():
    solution = pd.DataFrame({"image": ["img_1.jpg", "img_9.jpg"], "label": ["ALB", "BET"], "stage": [1, 1]})
    with pytest.raises(ValueError, match="img_9.jpg"):
        score.score_submission(_sub({"img_1.jpg": [1] * K}), score.stage_rows(solution, 1))


def test_header_only_solution_writes_no_solution_file_and_exits_zero(tmp_path):
    paths, _ = write_inputs(tmp_path)
    Path(paths.solution).write_text("image,label,stage\n")
    Path(paths.metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(paths.metrics).write_text(json.dumps({"cv_logloss": {"ensemble": 0.7}, "method": "mean"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "score"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no solution file" in done.stdout
    board = json.loads(Path(paths.leaderboard).read_text())
    assert board["status"] == "no solution file" and board["cv"]["ensemble_logloss"] == 0.7


def test_stage_chain_ensemble_submit_score(tmp_path, monkeypatch, capsys):
    paths, truth = write_inputs(tmp_path, backbones=("vgg16", "resnet50"))
    monkeypatch.chdir(tmp_path)
    ensemble.main([])
    submit.main([])
    score.main([])
    out = capsys.readouterr().out
    assert "stage 1" in out and "stage 2" in out

    board = json.loads(Path(paths.leaderboard).read_text())
    metrics = json.loads(Path(paths.metrics).read_text())
    assert board["cv"]["ensemble_logloss"] == metrics["cv_logloss"]["ensemble"]
    # Independently: Kaggle's formula on the written files and the true labels.
    for stage, sub_path in ((1, paths.submission_stg1), (2, paths.submission_stg2)):
        sub = pd.read_csv(sub_path).set_index("image")
        names = [n for n in truth if (n.startswith("test_stg2/") == (stage == 2))]
        proba = sub.loc[names, list(FISH_CLASSES)].to_numpy()
        proba = np.clip(proba / proba.sum(axis=1, keepdims=True), EPS, 1 - EPS)
        y = [FISH_CLASSES.index(truth[n]) for n in names]
        expected = -np.mean(np.log(proba[np.arange(len(names)), y]))
        assert board[f"stage{stage}"]["logloss"] == pytest.approx(expected, rel=1e-9)
        assert board[f"stage{stage}"]["n_images"] == 40
        # The synthetic models carry signal: the ensemble must beat both baselines.
        assert board[f"stage{stage}"]["logloss"] < board[f"stage{stage}"]["baseline_class_prior"]
        assert board[f"stage{stage}"]["logloss"] < board[f"stage{stage}"]["baseline_uniform"]

    # Both submissions were attached to the ensemble's MLflow run.
    import mlflow

    from pipeline.core import tracking
    from pipeline.core.files import file_digest
    from pipeline.core.params import Tracking, from_dict
    from tests.factories import repo_params

    tracking_cfg = from_dict(Tracking, repo_params()["tracking"], "tracking")
    run_id = tracking.find_run(tracking_cfg, tracking.REPORT_TAG, file_digest(paths.ensemble_report))
    assert run_id is not None
    client = mlflow.MlflowClient(tracking.tracking_uri())
    attached = {Path(a.path).name for a in client.list_artifacts(run_id, "submissions")}
    assert attached == {Path(paths.submission_stg1).name, Path(paths.submission_stg2).name}
