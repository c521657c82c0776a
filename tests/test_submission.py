"""Submission writer, validator and upload guard: each planted defect is named; written files are valid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.competition import FISH_CLASSES
from pipeline.core.submission import (
    InvalidSubmission,
    build_submission,
    read_submission,
    validate,
    write_submission,
)
from pipeline.stages import submit
from pipeline.tools import upload
from pipeline.tools import validate as validate_tool
from pipeline.tools.kaggle_auth import find_credentials
from tests.factories import write_inputs

K = len(FISH_CLASSES)
HEADER = ["image", *FISH_CLASSES]


def sample_frames():
    """A small stage-2 style sample (bare stage-1 names + prefixed stage-2 names) and a valid submission."""
    names = ["img_00001.jpg", "img_00002.jpg", "test_stg2/image_00001.jpg", "test_stg2/image_00002.jpg"]
    sample = pd.DataFrame(np.full((4, K), 0.125), columns=list(FISH_CLASSES))
    sample.insert(0, "image", names)
    rng = np.random.default_rng(0)
    good = pd.DataFrame(rng.dirichlet(np.ones(K), size=4), columns=list(FISH_CLASSES))
    good.insert(0, "image", names)
    return sample.astype(str), good


def _as_text(frame: pd.DataFrame, tmp_path: Path) -> pd.DataFrame:
    """Round-trip through a CSV file, as the CLI reads it."""
    path = tmp_path / "sub.csv"
    frame.to_csv(path, index=False)
    return read_submission(path)


def test_a_valid_submission_passes(tmp_path):
    sample, good = sample_frames()
    assert validate(_as_text(good, tmp_path), sample) == []
    # Row order is free on Kaggle.
    assert validate(_as_text(good.iloc[::-1], tmp_path), sample) == []


def _defect(name):
    sample, good = sample_frames()
    df = good.astype(object)
    if name == "missing":
        df = df.iloc[:3]
    elif name == "extra":
        df = pd.concat([df, df.iloc[[0]].assign(image="img_99999.jpg")])
    elif name == "duplicated":
        df = pd.concat([df, df.iloc[[1]]])
    elif name == "reordered header":
        df = df[["image", "BET", "ALB", *FISH_CLASSES[2:]]]
    elif name == "wrong header":
        df = df.rename(columns={"image": "id"})
    elif name == "stage-2 prefix":
        df.loc[2, "image"] = "image_00001.jpg"
    elif name == "non-numeric":
        df.loc[1, "DOL"] = "abc"
    elif name == "nan":
        df.loc[1, "DOL"] = np.nan
    elif name == "infinite":
        df.loc[1, "DOL"] = np.inf
    elif name == "negative":
        df.loc[1, "DOL"] = -0.01
    elif name == "above one":
        df.loc[1, "DOL"] = 1.5
    elif name == "not summing to one":
        df.loc[1, list(FISH_CLASSES)] = 0.5
    return df, sample


DEFECTS = {
    "missing": "missing rows: 1 image(s)",
    "extra": "extra rows: 1 image(s)",
    "duplicated": "duplicated rows",
    "reordered header": "header columns are reordered",
    "wrong header": "wrong header",
    "stage-2 prefix": "without the 'test_stg2/' prefix: 'image_00001.jpg'",
    "non-numeric": "non-numeric values",
    "nan": "NaN or empty values",
    "infinite": "infinite values",
    "negative": "negative values",
    "above one": "values above 1",
    "not summing to one": "rows not summing to 1",
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_planted_defect_is_named_first(defect, tmp_path, capsys):
    df, sample = _defect(defect)
    problems = validate(_as_text(df, tmp_path), sample)
    assert problems, defect
    assert DEFECTS[defect] in problems[0], problems
    # Each defect has its own message: no other defect's message leads.
    for other, message in DEFECTS.items():
        if other != defect and message not in DEFECTS[defect]:
            assert message not in problems[0]
    # The CLI: non-zero exit, the first problem on stderr.
    sample_path = tmp_path / "sample.csv"
    sample.to_csv(sample_path, index=False)
    assert validate_tool.main([str(tmp_path / "sub.csv"), "--sample", str(sample_path)]) == 1
    assert DEFECTS[defect] in capsys.readouterr().err


def test_a_prefix_defect_is_not_also_reported_as_missing_and_extra(tmp_path):
    df, sample = _defect("stage-2 prefix")
    problems = validate(_as_text(df, tmp_path), sample)
    assert len(problems) == 1


def test_unnormalised_rows_can_be_downgraded_to_a_warning(tmp_path, capsys):
    df, sample = _defect("not summing to one")
    df.to_csv(tmp_path / "sub.csv", index=False)
    sample.to_csv(tmp_path / "sample.csv", index=False)
    args = [str(tmp_path / "sub.csv"), "--sample", str(tmp_path / "sample.csv")]
    assert validate_tool.main(args) == 1
    assert validate_tool.main([*args, "--allow-unnormalised"]) == 0
    assert "WARNING" in capsys.readouterr().err


def test_cli_accepts_a_valid_file_and_reports_a_missing_one(tmp_path, capsys):
    sample, good = sample_frames()
    good.to_csv(tmp_path / "sub.csv", index=False)
    sample.to_csv(tmp_path / "sample.csv", index=False)
    assert validate_tool.main([str(tmp_path / "sub.csv"), "--sample", str(tmp_path / "sample.csv")]) == 0
    assert "OK" in capsys.readouterr().out
    assert validate_tool.main([str(tmp_path / "nope.csv"), "--sample", str(tmp_path / "sample.csv")]) == 2


# ------------------------------------------------------------------------------------------------- writer


def test_writer_makes_both_files_valid_in_the_samples_order(tmp_path):
    paths, _ = write_inputs(tmp_path)
    from pipeline.core.params import load
    from pipeline.stages import ensemble

    ensemble.run(load(ensemble.Settings, tmp_path / "params.yaml"))
    written = submit.write_submissions(paths)
    assert [str(p) for p in written] == [paths.submission_stg1, paths.submission_stg2]
    for sub_path, sample_path in (
        (paths.submission_stg1, paths.sample_stg1),
        (paths.submission_stg2, paths.sample_stg2),
    ):
        text = Path(sub_path).read_text()
        assert text.splitlines()[0] == ",".join(HEADER)
        sub, sample = read_submission(sub_path), read_submission(sample_path)
        assert validate(sub, sample) == []
        assert list(sub["image"]) == list(sample["image"])  # the sample's rows, in its order
        values = sub[list(FISH_CLASSES)].astype(float).to_numpy()
        assert np.all(np.isfinite(values)) and values.min() >= 0 and values.max() <= 1
        np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-6)
    stg2 = pd.read_csv(paths.submission_stg2).set_index("image")
    stg1 = pd.read_csv(paths.submission_stg1).set_index("image")
    # Stage-2 file: the stage-1 rows (same predictions as the stage-1 file) and the prefixed stage-2 rows.
    pd.testing.assert_frame_equal(stg2.loc[stg1.index], stg1)
    assert stg2.index.str.startswith("test_stg2/").sum() == 40


def test_writer_refuses_predictions_missing_a_sample_row():
    sample, good = sample_frames()
    predictions = good.iloc[:3].set_index("image")
    with pytest.raises(ValueError, match="have no prediction, e.g. 'test_stg2/image_00002.jpg'"):
        build_submission(predictions, sample)


def test_an_invalid_submission_is_never_written(tmp_path):
    sample, good = sample_frames()
    bad = good.copy()
    bad.loc[0, "ALB"] = np.nan
    target = tmp_path / "out" / "submission.csv"
    with pytest.raises(InvalidSubmission, match="NaN"):
        write_submission(bad, sample, target)
    assert not target.exists() and os.listdir(target.parent) == []


def test_a_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    sample, good = sample_frames()
    target = tmp_path / "submission.csv"
    real_to_csv = pd.DataFrame.to_csv

    def dies_half_way(self, path, **kwargs):
        real_to_csv(self.iloc[:2], path, **kwargs)  # some rows reach the disk...
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(pd.DataFrame, "to_csv", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_submission(build_submission(good.set_index("image"), sample), sample, target)
    assert os.listdir(tmp_path) == []  # neither the target nor the temporary file


def test_a_failed_rewrite_keeps_the_previous_file(tmp_path, monkeypatch):
    sample, good = sample_frames()
    target = tmp_path / "submission.csv"
    write_submission(build_submission(good.set_index("image"), sample), sample, target)
    before = target.read_bytes()
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        write_submission(build_submission(good.set_index("image"), sample), sample, target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["submission.csv"]


# ------------------------------------------------------------------------------------------------- upload


def test_upload_without_credentials_says_what_to_do(tmp_path, capsys):
    sample, good = sample_frames()
    good.to_csv(tmp_path / "sub.csv", index=False)
    sample.to_csv(tmp_path / "sample.csv", index=False)
    home = tmp_path / "home"
    home.mkdir()
    code = upload.main(
        [str(tmp_path / "sub.csv"), "--message", "test", "--sample", str(tmp_path / "sample.csv")],
        environ={},  # no KAGGLE_* variables
        home=home,  # and no ~/.kaggle
    )
    err = capsys.readouterr().err
    assert code != 0
    assert "No Kaggle credentials found" in err
    assert f"{home / '.kaggle'}/kaggle.json" in err and "KAGGLE_USERNAME" in err and "KAGGLE_KEY" in err
    assert "make submit FILE=" in err


def test_upload_validates_before_anything_else(tmp_path, capsys):
    df, sample = _defect("missing")
    df.to_csv(tmp_path / "sub.csv", index=False)
    sample.to_csv(tmp_path / "sample.csv", index=False)
    code = upload.main(
        [str(tmp_path / "sub.csv"), "-m", "x", "--sample", str(tmp_path / "sample.csv")],
        environ={},
        home=tmp_path,
    )
    assert code == 1 and "missing rows" in capsys.readouterr().err


def test_credentials_are_found_where_the_kaggle_client_looks(tmp_path):
    assert find_credentials({}, tmp_path) is None
    assert find_credentials({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, tmp_path)
    assert find_credentials({"KAGGLE_API_TOKEN": "t"}, tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "kaggle.json").write_text("{}")
    assert find_credentials({"KAGGLE_CONFIG_DIR": str(tmp_path / "cfg")}, tmp_path)


def test_quarantined_test_images_get_the_class_prior_and_others_still_fail():

    classes = list(FISH_CLASSES)
    sample = pd.DataFrame({"image": ["a.jpg", "bad.jpg"], **{c: 0.125 for c in classes}})
    preds = pd.DataFrame([np.full(8, 0.125)], index=["a.jpg"], columns=classes)
    prior = np.arange(1, 9) / 36
    frame = build_submission(preds, sample, {"bad.jpg": prior})
    np.testing.assert_allclose(frame.loc[frame.image == "bad.jpg", classes].to_numpy()[0], prior)
    with pytest.raises(ValueError, match="no prediction"):
        build_submission(preds, sample, {})
