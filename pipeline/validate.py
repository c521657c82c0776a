"""Check a submission file against its sample submission before anyone uploads it.

    python -m pipeline.validate reports/submission_stg2.csv --sample data/interim/sample_submission_stg2.csv

Exits 0 on a valid file; otherwise 1, printing the first problem first (then any others). A Kaggle upload
that is rejected, or worse accepted and scored on the wrong rows, costs a daily submission, so the checks are
strict:
- header exactly `image,ALB,BET,DOL,LAG,NoF,OTHER,SHARK,YFT` (a reordered header is named as such: Kaggle
  reads columns by name, but a reordered file means the writer's class order is wrong somewhere);
- exactly the sample's rows: none missing, none extra, none duplicated; a stage-2 name without its
  `test_stg2/` prefix is reported as that, not as a missing plus an extra row;
- every probability numeric, not NaN, finite, in [0, 1];
- every row summing to 1 within `SUM_TOLERANCE`. Kaggle renormalises rows before scoring, so this is not fatal
  there, but here it is an error by default because the writer always normalises: a row that does not sum to 1
  means a bug upstream. `--allow-unnormalised` downgrades it to a warning for hand-made files.
Row order is free (Kaggle matches rows by name); the writer keeps the sample's order anyway.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import FISH_CLASSES

HEADER: tuple[str, ...] = ("image", *FISH_CLASSES)
STAGE2_PREFIX = "test_stg2/"
SUM_TOLERANCE = 1e-3  # the writer prints 8 significant digits; a real normalisation bug is far larger
NAN_SPELLINGS = {"", "nan", "NaN", "NAN", "NA", "N/A", "null", "None"}


def read_submission(path: str | Path) -> pd.DataFrame:
    """Read every cell as text, so that non-numeric values and NaN spellings can be told apart."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _examples(values, limit: int = 3) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def check_header(columns: list[str]) -> list[str]:
    if tuple(columns) == HEADER:
        return []
    if sorted(columns) == sorted(HEADER):
        return [f"header columns are reordered: got {','.join(columns)}, expected {','.join(HEADER)}"]
    missing = [c for c in HEADER if c not in columns]
    extra = [c for c in columns if c not in HEADER]
    return [
        f"wrong header: got {','.join(columns)}, expected {','.join(HEADER)} "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate a Kaggle fisheries submission against its sample.")
    parser.add_argument("submission", type=Path)
    parser.add_argument("--sample", type=Path, required=True, help="the sample submission of the same stage")
    parser.add_argument(
        "--allow-unnormalised",
        action="store_true",
        help="report rows not summing to 1 as a warning (Kaggle renormalises them)",
    )
    args = parser.parse_args(argv)
    for path in (args.submission, args.sample):
        if not path.is_file():
            print(f"INVALID: {path} does not exist", file=sys.stderr)
            return 2
    problems, warnings = validate_with_warnings(
        read_submission(args.submission),
        read_submission(args.sample),
        strict_sums=not args.allow_unnormalised,
    )
    for warning in warnings:
        print(f"WARNING: {args.submission}: {warning}", file=sys.stderr)
    if problems:
        print(f"INVALID: {args.submission}: {problems[0]}", file=sys.stderr)
        for problem in problems[1:]:
            print(f"  also: {problem}", file=sys.stderr)
        return 1
    print(f"OK: {args.submission} is a valid submission for {args.sample}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
