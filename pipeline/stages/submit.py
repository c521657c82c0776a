"""Submit stage: write the stage-1 and stage-2 Kaggle submission files from the ensemble's test predictions.

Each file holds exactly the rows of its sample submission, in the sample's order, with the names taken from
the sample (never rebuilt from a pattern), the header `image,ALB,...,YFT` and one probability vector per row.
The stage-2 file also carries the stage-1 images (Kaggle's stage-2 sample lists both), predicted from
test_stg1.csv. Every file is validated before it lands (`pipeline.core.submission`): an invalid or
half-written submission never appears. Test images that ingest quarantined get the training class shares.

When the ensemble stage recorded an MLflow run, both files are attached to that run, so the run that chose the
ensemble also holds what was submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import tracking
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.files import file_digest, read_json
from pipeline.core.manifest import read_manifest, train_labels
from pipeline.core.params import Paths, Tracking, load, stage_parser
from pipeline.core.submission import build_submission, read_submission, read_test_predictions, write_submission


@dataclass(frozen=True)
class Settings:
    paths: Paths
    tracking: Tracking


def quarantine_fallback(paths: Paths) -> dict[str, np.ndarray]:
    """Training class shares for every test image ingest could not read (listed in its report)."""
    report_path = Path(paths.reports) / "ingest_report.json"
    ids = read_json(report_path).get("quarantined_test_ids", []) if report_path.is_file() else []
    if not ids:
        return {}
    y = train_labels(read_manifest(paths.manifest), where=paths.manifest)
    shares = np.clip(np.bincount(y, minlength=len(FISH_CLASSES)) / len(y), 1e-3, None)
    print(f"submit: {len(ids)} unreadable test image(s) get the training class shares, e.g. {ids[0]!r}")
    return {name: shares / shares.sum() for name in ids}


def write_submissions(paths: Paths) -> list[Path]:
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


def attach_to_run(s: Settings, files: list[Path]) -> str | None:
    """Add `files` to the MLflow run of the ensemble stage that wrote the report this stage read.

    That run is found by the report's digest (the ensemble stage tags its run with it), so no DVC output
    needs to carry a run id. Guarded like all tracking: returns the run id, or None.
    """
    report = Path(s.paths.ensemble_report)
    run_id = tracking.find_run(s.tracking, tracking.REPORT_TAG, file_digest(report)) if report.is_file() else None
    if run_id is None:
        return None
    with tracking.start_run(s.tracking, "submit", run_id=run_id) as run:
        if run is None:
            return None
        for path in files:
            tracking.log_artifact(path, "submissions")
        return run_id


def main(argv: list[str] | None = None) -> None:
    settings = load(Settings, stage_parser(__doc__).parse_args(argv).params)
    files = write_submissions(settings.paths)
    run_id = attach_to_run(settings, files)
    if run_id is not None:
        print(f"attached both submissions to MLflow run {run_id}")


if __name__ == "__main__":
    main()
