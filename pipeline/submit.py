"""Submit stage: write the stage-1 and stage-2 Kaggle submission files from the ensemble's test predictions.

Each file holds exactly the rows of its sample submission, in the sample's order, with the names taken from
the sample (never rebuilt from a pattern), the header `image,ALB,...,YFT` and one probability vector per row.
The stage-2 file also carries the stage-1 images (Kaggle's stage-2 sample lists both), predicted from
test_stg1.csv. A file is written to a temporary name beside its target, read back and checked by
`pipeline.validate`, and only then renamed into place: an invalid or half-written submission never appears.

When the ensemble stage recorded an MLflow run, both files are attached to that run, so the run that chose the
ensemble also holds what was submitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.config import FISH_CLASSES, load_section, read_params
from pipeline.io import atomic_path, read_json
from pipeline.metrics import normalise_rows
from pipeline.validate import HEADER, read_submission, validate

FLOAT_FORMAT = "%.8g"  # keeps a 1e-15 floor visible and row sums within 1e-7 of 1


class InvalidSubmission(RuntimeError):
    """The submission the writer produced failed validation: a bug upstream, never uploaded."""


def read_test_predictions(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate ensemble test prediction files (`id, ALB..YFT`) into one frame indexed by image name."""
    frames = [pd.read_csv(p) for p in paths]
    for path, frame in zip(paths, frames, strict=True):
        if list(frame.columns) != ["id", *FISH_CLASSES]:
            raise ValueError(f"{path}: columns {list(frame.columns)}, expected {['id', *FISH_CLASSES]}")
    table = pd.concat(frames, ignore_index=True)
    if table["id"].duplicated().any():
        raise ValueError(f"image {table.loc[table['id'].duplicated(), 'id'].iloc[0]!r} is predicted twice")
    return table.set_index("id")


def build_submission(
    predictions: pd.DataFrame, sample: pd.DataFrame, fallback: dict[str, np.ndarray] | None = None
) -> pd.DataFrame:
    """The rows of `sample`, in its order, filled from `predictions` (indexed by image name).

    `fallback` maps image names that ingest quarantined (unreadable test files) to the probabilities they get
    instead, since Kaggle still expects a row for them; any other missing name is an error.
    """
    names = sample["image"].astype(str)
    if fallback:
        extra = pd.DataFrame(
            [fallback[n] for n in names if n in fallback and n not in predictions.index],
            index=[n for n in names if n in fallback and n not in predictions.index],
            columns=list(FISH_CLASSES),
        )
        predictions = pd.concat([predictions, extra])
    missing = names[~names.isin(predictions.index)]
    if len(missing):
        raise ValueError(
            f"{len(missing)} image(s) of the sample submission have no prediction, e.g. {missing.iloc[0]!r}; "
            "the ensemble's test ids must be exactly the submission names (stage-2 ones with 'test_stg2/')"
        )
    proba = predictions.loc[names, list(FISH_CLASSES)].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(proba)) or np.any(proba < 0):
        raise ValueError("the ensemble's test predictions contain negative, NaN or infinite values")
    frame = pd.DataFrame(np.clip(normalise_rows(proba), 0.0, 1.0), columns=list(FISH_CLASSES))
    frame.insert(0, "image", names.to_numpy())
    return frame


def write_submission(frame: pd.DataFrame, sample: pd.DataFrame, path: str | Path) -> Path:
    """Write `frame` to `path` atomically, after the validator accepted the bytes that will land there."""
    if tuple(frame.columns) != HEADER:
        raise InvalidSubmission(f"{path}: refusing to write columns {list(frame.columns)}")
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=FLOAT_FORMAT)
        problems = validate(read_submission(tmp), sample)
        if problems:  # raising here deletes the temporary file: nothing reaches `path`
            raise InvalidSubmission(f"{path} would be invalid: {problems[0]}")
    return Path(path)


def quarantine_fallback(paths: Any) -> dict[str, np.ndarray]:
    """Training class shares for every test image ingest could not read (listed in its report)."""
    report_path = Path(paths.reports) / "ingest_report.json"
    ids = read_json(report_path).get("quarantined_test_ids", []) if report_path.is_file() else []
    if not ids:
        return {}
    labels = pd.read_csv(paths.manifest, keep_default_na=False).query("split == 'train'")["label"]
    shares = labels.value_counts(normalize=True).reindex(list(FISH_CLASSES), fill_value=0).to_numpy()
    shares = np.clip(shares, 1e-3, None)
    print(f"submit: {len(ids)} unreadable test image(s) get the training class shares, e.g. {ids[0]!r}")
    return {name: shares / shares.sum() for name in ids}


def write_submissions(paths: Any) -> list[Path]:
    """Both submission files of the competition; returns their paths."""
    ensemble = Path(paths.ensemble)
    fallback = quarantine_fallback(paths)
    written = []
    for sources, sample_path, out in (
        ([ensemble / "test_stg1.csv"], paths.sample_stg1, paths.submission_stg1),
        ([ensemble / "test_stg1.csv", ensemble / "test_stg2.csv"], paths.sample_stg2, paths.submission_stg2),
    ):
        sample = read_submission(sample_path)
        frame = build_submission(read_test_predictions(sources), sample, fallback)
        written.append(write_submission(frame, sample, out))
        print(f"wrote {out}: {len(frame)} rows, valid against {sample_path}")
    return written


def attach_to_run(tracking_cfg: Any, run_id: str | None, files: Sequence[Path]) -> bool:
    """Add `files` to the ensemble stage's MLflow run `run_id`; guarded by `pipeline.tracking`."""
    if not run_id:
        return False
    with tracking.start_run(tracking_cfg, "submit", run_id=run_id) as run:
        if run is None:
            return False
        for path in files:
            tracking.log_artifact(path, "submissions")
        return True


def main() -> None:
    raw = read_params()
    paths, tracking_cfg = load_section("paths", raw), load_section("tracking", raw)
    files = write_submissions(paths)
    report = read_json(paths.ensemble_report) if Path(paths.ensemble_report).is_file() else {}
    if attach_to_run(tracking_cfg, report.get("mlflow_run_id"), files):
        print(f"attached both submissions to MLflow run {report['mlflow_run_id']}")


if __name__ == "__main__":
    main()
