"""Kaggle's rules for a fisheries submission, and the one writer that never breaks them.

`validate` checks a submission against its sample submission as strictly as an upload deserves (a rejected
or, worse, wrongly scored upload costs one of the day's submissions):
- header exactly `image,ALB,BET,DOL,LAG,NoF,OTHER,SHARK,YFT` (a reordered header is named as such: Kaggle
  reads columns by name, but a reordered file means the writer's class order is wrong somewhere);
- exactly the sample's rows: none missing, none extra, none duplicated; a stage-2 name without its
  `test_stg2/` prefix is reported as that, not as a missing plus an extra row;
- every probability numeric, not NaN, finite, in [0, 1];
- every row summing to 1 within `SUM_TOLERANCE`. Kaggle renormalises rows before scoring, so this is not fatal
  there, but here it is an error by default because the writer always normalises: a row that does not sum to 1
  means a bug upstream. `strict_sums=False` downgrades it to a warning for hand-made files.
Row order is free (Kaggle matches rows by name); the writer keeps the sample's order anyway.

`build_submission` fills the sample's rows from prediction tables and `write_submission` writes the file
atomically, after `validate` accepted the very bytes that will land there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.competition import FISH_CLASSES, STAGE2_PREFIX, SUBMISSION_HEADER
from pipeline.core.files import atomic_path
from pipeline.core.metrics import normalise_rows
from pipeline.core.predictions import read_table

SUM_TOLERANCE = 1e-3  # the writer prints 8 significant digits; a real normalisation bug is far larger
NAN_SPELLINGS = {"", "nan", "NaN", "NAN", "NA", "N/A", "null", "None"}
FLOAT_FORMAT = "%.8g"  # keeps a 1e-15 floor visible and row sums within 1e-7 of 1


def read_submission(path: str | Path) -> pd.DataFrame:
    """Read every cell as text, so that non-numeric values and NaN spellings can be told apart."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _examples(values, limit: int = 3) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def check_header(columns: list[str]) -> list[str]:
    if tuple(columns) == SUBMISSION_HEADER:
        return []
    if sorted(columns) == sorted(SUBMISSION_HEADER):
        return [f"header columns are reordered: got {','.join(columns)}, expected {','.join(SUBMISSION_HEADER)}"]
    missing = [c for c in SUBMISSION_HEADER if c not in columns]
    extra = [c for c in columns if c not in SUBMISSION_HEADER]
    return [
        f"wrong header: got {','.join(columns)}, expected {','.join(SUBMISSION_HEADER)} "
        f"(missing {missing or 'none'}, unexpected {extra or 'none'})"
    ]


def check_rows(images: pd.Series, sample_images: pd.Series) -> list[str]:
    problems = []
    duplicated = images[images.duplicated()].unique()
    if len(duplicated):
        problems.append(
            f"duplicated rows: {len(duplicated)} image name(s) appear more than once, "
            f"e.g. {_examples(duplicated)}"
        )
    expected, present = set(sample_images), set(images)
    # A stage-2 name that lost its folder prefix would otherwise surface as one missing and one extra row.
    unprefixed = sorted(
        name
        for name in present - expected
        if not name.startswith(STAGE2_PREFIX) and STAGE2_PREFIX + name in expected
    )
    if unprefixed:
        problems.append(
            f"stage-2 image name(s) without the '{STAGE2_PREFIX}' prefix: {_examples(unprefixed)}"
        )
    expected_bare = {STAGE2_PREFIX + name for name in unprefixed}
    missing = sorted(expected - present - expected_bare)
    if missing:
        problems.append(
            f"missing rows: {len(missing)} image(s) of the sample submission are absent, "
            f"e.g. {_examples(missing)}"
        )
    extra = sorted(present - expected - set(unprefixed))
    if extra:
        problems.append(
            f"extra rows: {len(extra)} image(s) are not in the sample submission, e.g. {_examples(extra)}"
        )
    return problems


def check_values(df: pd.DataFrame, strict_sums: bool = True) -> tuple[list[str], list[str]]:
    """Problems and warnings about the probability columns of a submission with a correct header."""
    problems: list[str] = []
    text = df[list(FISH_CLASSES)].astype(str).apply(lambda col: col.str.strip())
    values = df[list(FISH_CLASSES)].apply(pd.to_numeric, errors="coerce")
    names = df["image"].to_numpy()

    def first(mask: pd.DataFrame, what: str) -> None:
        if mask.to_numpy().any():
            row, col = np.argwhere(mask.to_numpy())[0]
            problems.append(
                f"{what}: {int(mask.to_numpy().sum())} value(s), first {names[row]!r} "
                f"{FISH_CLASSES[col]}={df.iloc[row][FISH_CLASSES[col]]!r}"
            )

    nan_text = text.isin(NAN_SPELLINGS)
    first(values.isna() & ~nan_text, "non-numeric values")
    first(nan_text, "NaN or empty values")
    numbers = values.to_numpy(dtype=np.float64)
    finite = np.isfinite(numbers)
    first(pd.DataFrame(np.isinf(numbers)), "infinite values")
    first(pd.DataFrame(finite & (numbers < 0)), "negative values")
    first(pd.DataFrame(finite & (numbers > 1)), "values above 1")
    warnings: list[str] = []
    sums = numbers.sum(axis=1)
    bad = np.all(finite, axis=1) & (np.abs(sums - 1.0) > SUM_TOLERANCE)
    if bad.any():
        row = int(np.argmax(bad))
        message = (
            f"rows not summing to 1 (tolerance {SUM_TOLERANCE}): {int(bad.sum())} row(s), first "
            f"{names[row]!r} sums to {sums[row]:.6g}"
        )
        zero = np.all(finite, axis=1) & (sums <= 0)
        if zero.any():
            problems.append(
                f"rows summing to zero cannot be normalised: first {names[int(np.argmax(zero))]!r}"
            )
        (problems if strict_sums else warnings).append(message)
    return problems, warnings


def validate(df: pd.DataFrame, sample_df: pd.DataFrame, strict_sums: bool = True) -> list[str]:
    """Every problem of submission `df` against `sample_df`, in the order to fix them; [] if valid."""
    return validate_with_warnings(df, sample_df, strict_sums)[0]


def validate_with_warnings(
    df: pd.DataFrame, sample_df: pd.DataFrame, strict_sums: bool = True
) -> tuple[list[str], list[str]]:
    problems = check_header([str(c) for c in df.columns])
    if problems and not problems[0].startswith("header columns are reordered"):
        return problems, []  # with unknown columns the rows and values cannot be read reliably
    if "image" not in sample_df.columns:
        return [f"the sample submission has no 'image' column (columns {list(sample_df.columns)})"], []
    problems += check_rows(df["image"].astype(str), sample_df["image"].astype(str))
    value_problems, warnings = check_values(df, strict_sums)
    return problems + value_problems, warnings


class InvalidSubmission(RuntimeError):
    """The submission the writer produced failed validation: a bug upstream, never uploaded."""


def read_test_predictions(paths: list[str | Path]) -> pd.DataFrame:
    """Concatenate test prediction files (`id, ALB..YFT`) into one frame indexed by image name."""
    table = pd.concat([read_table(Path(p), ["id"]) for p in paths])
    if table.index.duplicated().any():
        raise ValueError(f"image {table.index[table.index.duplicated()][0]!r} is predicted twice")
    return table


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
    if tuple(frame.columns) != SUBMISSION_HEADER:
        raise InvalidSubmission(f"{path}: refusing to write columns {list(frame.columns)}")
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=FLOAT_FORMAT)
        problems = validate(read_submission(tmp), sample)
        if problems:  # raising here deletes the temporary file: nothing reaches `path`
            raise InvalidSubmission(f"{path} would be invalid: {problems[0]}")
    return Path(path)


