"""Score stage: a local leaderboard for both submission files, next to the cross-validation estimate.

With a solution file (`image,label,stage`; the demo writes one, a user may supply Kaggle's), each submission
is scored exactly as Kaggle scores it: every row divided by its sum, probabilities clipped to
[1e-15, 1 - 1e-15], mean -log p(true class) (`pipeline.metrics.kaggle_log_loss`). Stage 1 is scored on the
stage-1 images of submission_stg1; stage 2 on the `test_stg2/` images of submission_stg2 only, as Kaggle's
private stage-2 leaderboard was. Beside each score: the CV estimate from `paths.metrics`, the gap between the
two, and the two baselines every model must beat (predicting the training class shares, and the uniform 1/8).
A large gap is the signature of a leaky validation or of a test set unlike the training one (stage 2's new
boats).

A header-only (or absent) solution file is not an error: the leaderboard then says "no solution file".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.competition import FISH_CLASSES, STAGE2_PREFIX
from pipeline.core.files import read_json, write_json
from pipeline.core.manifest import labels_of, read_manifest, train_labels
from pipeline.core.metrics import accuracy, kaggle_log_loss, prior_log_loss
from pipeline.core.params import Paths, load, stage_parser


@dataclass(frozen=True)
class Settings:
    paths: Paths

SCORING = "Kaggle's: rows normalised, clipped to [1e-15, 1 - 1e-15]; stage 2 on test_stg2/ rows only"


def read_solution(path: str | Path) -> pd.DataFrame | None:
    """The solution table, or None when the file is absent or holds only its header."""
    path = Path(path)
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype={"image": str, "label": str})
    if list(table.columns) != ["image", "label", "stage"]:
        raise ValueError(f"{path}: expected the header image,label,stage, got {','.join(table.columns)}")
    if table.empty:
        return None
    unknown = sorted(set(table["label"]) - set(FISH_CLASSES))
    if unknown:
        raise ValueError(f"{path}: unknown labels {unknown}; expected {list(FISH_CLASSES)}")
    return table


def stage_rows(solution: pd.DataFrame, stage: int) -> pd.DataFrame:
    rows = solution[solution["stage"].astype(int) == stage]
    if stage == 2:
        rows = rows[rows["image"].str.startswith(STAGE2_PREFIX)]
    return rows


def score_submission(submission: pd.DataFrame, solution_rows: pd.DataFrame) -> dict[str, Any]:
    """Kaggle's log loss (and accuracy) of `submission` on the images of `solution_rows`."""
    table = submission.set_index("image")
    missing = solution_rows.loc[~solution_rows["image"].isin(table.index), "image"]
    if len(missing):
        raise ValueError(
            f"{len(missing)} solution image(s) have no row in the submission, e.g. {missing.iloc[0]!r}"
        )
    proba = table.loc[solution_rows["image"], list(FISH_CLASSES)].to_numpy(dtype=np.float64)
    y = labels_of(solution_rows["label"])
    return {"logloss": kaggle_log_loss(y, proba), "accuracy": accuracy(y, proba), "n_images": len(y)}


def leaderboard(
    submissions: dict[int, pd.DataFrame],
    solution: pd.DataFrame | None,
    y_train: np.ndarray,
    cv: dict[str, Any],
) -> dict[str, Any]:
    """The leaderboard report: both stages' scores, baselines and the gap to the CV estimate."""
    cv_loss = cv.get("cv_logloss", {}).get("ensemble")
    board: dict[str, Any] = {
        "cv": {
            "method": cv.get("method"),
            "ensemble_logloss": cv_loss,
            "ensemble_logloss_nested": cv.get("cv_logloss_nested", {}).get("ensemble"),
        },
    }
    if solution is None:
        return {"status": "no solution file", **board}
    board = {"status": "scored", "scoring": SCORING, **board}
    for stage, submission in submissions.items():
        rows = stage_rows(solution, stage)
        if rows.empty:
            board[f"stage{stage}"] = {"status": "no labelled images in the solution file"}
            continue
        y = labels_of(rows["label"])
        scores = score_submission(submission, rows)
        scores["baseline_class_prior"] = prior_log_loss(y_train, y, len(FISH_CLASSES))
        scores["baseline_uniform"] = float(np.log(len(FISH_CLASSES)))
        scores["gap_vs_cv"] = None if cv_loss is None else scores["logloss"] - cv_loss
        board[f"stage{stage}"] = scores
    return board


def format_board(board: dict[str, Any]) -> str:
    cv = board["cv"]["ensemble_logloss"]
    shown = "n/a" if cv is None else format(cv, ".4f")
    lines = [f"CV (OOF) log loss of the ensemble ({board['cv']['method']}): {shown}"]
    if board["status"] != "scored":
        return "\n".join([*lines, f"leaderboard: {board['status']}"])
    lines.append(f"{'':<9}{'logloss':>9}{'gap':>9}{'acc':>8}{'prior':>9}{'uniform':>9}{'images':>8}")
    for stage in (1, 2):
        s = board.get(f"stage{stage}", {})
        if "logloss" not in s:
            lines.append(f"stage {stage}: {s.get('status', 'not scored')}")
            continue
        gap = "n/a" if s["gap_vs_cv"] is None else format(s["gap_vs_cv"], "+.4f")
        lines.append(
            f"stage {stage}  {s['logloss']:>9.4f}{gap:>9}{s['accuracy']:>8.3f}"
            f"{s['baseline_class_prior']:>9.4f}{s['baseline_uniform']:>9.4f}{s['n_images']:>8}"
        )
    return "\n".join(lines)


def family_scores(families: dict[str, dict], solution: pd.DataFrame) -> dict[str, dict]:
    """Each model family's ensemble (whole frames only; frames and crops) on both test stages, beside its CV:
    how much the crop models add, on the boats the models saw (stage 1) and on new ones (stage 2)."""
    out = {}
    for family, entry in families.items():
        row = {"models": entry["models"], "cv_logloss": entry["cv_logloss"]}
        for stage in (1, 2):
            table = pd.read_csv(Path(entry["predictions"]) / f"test_stg{stage}.csv").rename(columns={"id": "image"})
            rows = stage_rows(solution, stage)
            if not rows.empty:
                row[f"stage{stage}_logloss"] = score_submission(table, rows)["logloss"]
        if "stage2_logloss" in row:
            row["gap_stage2_vs_cv"] = row["stage2_logloss"] - row["cv_logloss"]
        out[family] = row
    if {"frames", "frames+crops"} <= set(out) and "stage2_logloss" in out["frames"]:
        out["stage2_reduction_by_crops"] = 1 - out["frames+crops"]["stage2_logloss"] / out["frames"]["stage2_logloss"]
    return out


def run(s: Settings) -> dict[str, Any]:
    """Score both submissions (when there is a solution) and write `paths.leaderboard`."""
    paths = s.paths
    solution = read_solution(paths.solution)
    cv = read_json(paths.metrics) if Path(paths.metrics).is_file() else {}
    submissions, y_train = {}, np.zeros(0, dtype=np.int64)
    if solution is not None:
        submissions = {1: pd.read_csv(paths.submission_stg1), 2: pd.read_csv(paths.submission_stg2)}
        y_train = train_labels(read_manifest(paths.manifest), where=paths.manifest)
    board = leaderboard(submissions, solution, y_train, cv)
    if solution is not None and Path(paths.ensemble_report).is_file():
        board["families"] = family_scores(read_json(paths.ensemble_report).get("families", {}), solution)
    write_json(paths.leaderboard, board)
    return board


def main(argv: list[str] | None = None) -> None:
    print(format_board(run(load(Settings, stage_parser(__doc__).parse_args(argv).params))))


if __name__ == "__main__":
    main()
