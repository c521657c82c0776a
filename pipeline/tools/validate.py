"""Check a submission file against its sample submission before anyone uploads it.

    python -m pipeline validate reports/submission_stg2.csv --sample data/interim/sample_submission_stg2.csv

Exits 0 on a valid file; otherwise 1, printing the first problem first (then any others). The rules are
`pipeline.core.submission`'s, the same the submit stage applies to every file it writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.submission import read_submission, validate_with_warnings


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
