"""The whole graph through DVC on a tiny demo, in a clone of the project: what a competitor does after cloning.

`make repro` from a fresh shell (no activated venv) builds the shared `demo_project` (conftest.py); the Kaggle-style
download's run is in tests/test_kaggle_smoke.py. They check the wiring a unit test cannot: every stage's command,
deps and outs in dvc.yaml, the params each reads, a log free of TensorFlow's native noise, a second run with
nothing to do, and DVC outputs that are the same bytes when a stage runs again.
"""

import re

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core.competition import FISH_CLASSES, STAGE2_PREFIX, SUBMISSION_HEADER
from pipeline.core.files import read_json
from tests.projects import fresh_env, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(demo_project):
    return demo_project[0]


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
    assert set(metrics["cv_logloss"]) == {"vgg16", "resnet50", "vgg16-crop", "ensemble"}
    board = read_json(project / "reports/leaderboard.json")
    assert board["status"] == "scored"
    assert board["cv"]["ensemble_logloss"] == metrics["cv_logloss"]["ensemble"]
    for stage in (1, 2):
        scores = board[f"stage{stage}"]
        assert scores["n_images"] > 0 and np.isfinite(scores["logloss"])
        assert scores["gap_vs_cv"] == pytest.approx(scores["logloss"] - board["cv"]["ensemble_logloss"])


def test_every_frame_gets_an_out_of_fold_box_a_crop_and_a_crop_model(project):
    """The localise → crops → train-crop chain: a box per manifest row (training rows from the fold that did not
    train on their boat), its scores out of fold and on both test stages, a crop per row, and the crop model in
    the ensemble beside the frame models."""
    manifest = pd.read_csv(project / "data/processed/manifest.csv", keep_default_na=False)
    boxes = pd.read_csv(project / "data/processed/localised.csv", keep_default_na=False)
    assert list(boxes["id"]) == list(manifest["id"])
    train = (manifest["split"] == "train").to_numpy()
    oof = pd.read_csv(project / "data/processed/predictions/vgg16/oof.csv")
    folds = dict(zip(oof["id"], oof["fold"], strict=True))
    assert [folds[i] for i in boxes.loc[train, "id"]] == boxes.loc[train, "fold"].tolist()  # the classifiers' folds
    assert (boxes.loc[~train, "fold"] == -1).all()
    assert boxes[["width", "height"]].gt(0).all().all() and boxes["confidence"].between(0, 1).all()
    report = read_json(project / "reports/localise.json")
    for part in ("out_of_fold", "stage1", "stage2"):
        assert report[part]["n_images"] > 0 and 0 <= report[part]["mean_iou"] <= 1
    assert np.load(project / "data/processed/crop_images.npy", mmap_mode="r").shape[:2] == (len(manifest), 32)
    assert (project / "reports/figures/localise/boxes.png").stat().st_size > 0
    assert "vgg16-crop" in read_json(project / "reports/ensemble.json")["models"]
    families = read_json(project / "reports/leaderboard.json")["families"]  # what the crops add, scored
    assert families["frames"]["models"] == ["vgg16", "resnet50"]
    assert families["frames+crops"]["models"] == ["vgg16", "resnet50", "vgg16-crop"]
    board = read_json(project / "reports/leaderboard.json")
    assert families["frames+crops"]["stage2_logloss"] == pytest.approx(board["stage2"]["logloss"])


def test_second_repro_has_nothing_to_do(project):
    out = run([".venv/bin/dvc", "status", "score"], project, fresh_env(project))
    assert "up to date" in out, out


def test_the_log_shows_progress_and_summaries_not_native_noise(demo_project):
    _, log = demo_project
    assert "decode:" in log and "fold 0: val log loss" in log and "train vgg16: CV" in log  # bars and summaries
    native = re.findall(r"^.*(?:[IWE]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\]|NodeDef mentions|absl::InitializeLog).*$",
                        log, flags=re.M)
    assert not native, f"{len(native)} native TensorFlow log lines, e.g. {native[:3]}"


def _output_digests(project) -> dict[str, str]:
    """Every DVC output's digest, as dvc.lock records it: `stage:path -> md5`."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {f"{name}:{out['path']}": out["md5"] for name, stage in lock.items() for out in stage.get("outs", [])}


#: Outputs that may differ between two runs of the same inputs, and why: none.
NOT_DETERMINISTIC: dict[str, str] = {}


def test_a_stage_run_again_writes_the_same_bytes(project):
    """Two runs of the same commit on the same machine give byte-identical DVC outputs: each stage is forced to
    run again, alone, and every output's digest must be unchanged (training on a CPU is deterministic too)."""
    before = _output_digests(project)
    for stage in ("demo", "ingest", "augment", "localise", "train@vgg16", "ensemble", "submit", "score", "mnist"):
        run([".venv/bin/dvc", "repro", "--force", "--single-item", stage], project, fresh_env(project))
    after = _output_digests(project)
    changed = sorted(k for k in before if after.get(k) != before[k] and k not in NOT_DETERMINISTIC)
    assert not changed, f"outputs that changed on a second run of the same inputs: {changed}"
