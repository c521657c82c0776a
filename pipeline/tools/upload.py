"""Upload a submission to Kaggle with the official client: `make submit FILE=... MESSAGE="..."`.

Never part of `dvc repro` and never run by the tests: an upload spends one of the day's submissions. The file
is validated against its sample submission first (the stage-2 sample when it holds `test_stg2/` rows, else the
stage-1 one; `--sample` overrides). Then the credentials are looked for where the `kaggle` package looks
(environment variables, then `kaggle.json` / `access_token` in its config folder) before the package is
imported, because importing it without credentials fails with a message about the package, not about what to
do. The package is an optional extra: `pip install -e '.[kaggle]'`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.competition import COMPETITION, STAGE2_PREFIX
from pipeline.core.params import Paths, load
from pipeline.tools.kaggle_auth import find_credentials, kaggle_config_dir


@dataclass(frozen=True)
class Settings:
    paths: Paths  # the sample submissions to validate against


NO_CREDENTIALS = """\
No Kaggle credentials found. To upload:
  1. Sign in at https://www.kaggle.com, open Settings > API and create a token.
  2. Either save the downloaded kaggle.json as {config_dir}/kaggle.json
     (then: chmod 600 {config_dir}/kaggle.json),
     or export KAGGLE_USERNAME=<your user name> and KAGGLE_KEY=<the key from kaggle.json>
     (or KAGGLE_API_TOKEN=<token> for the newer token format).
  3. Accept the competition rules at https://www.kaggle.com/c/{competition}/rules.
  4. Run again: make submit FILE={file} MESSAGE="..."
"""

NO_PACKAGE = """\
The official Kaggle client is not installed. Install the optional extra, then run again:
  .venv/bin/pip install -e '.[kaggle]'
"""


def pick_sample(submission: Path, sample: Path | None) -> Path:
    if sample is not None:
        return sample
    paths = load(Settings).paths
    with submission.open() as fh:
        stage2 = any(line.startswith(STAGE2_PREFIX) for line in fh)
    return Path(paths.sample_stg2 if stage2 else paths.sample_stg1)


def upload(file: Path, message: str, competition: str) -> None:
    """Send `file` with the official client (imported lazily: it is an optional extra)."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    api.competition_submit(str(file), message, competition)


def main(
    argv: list[str] | None = None, environ: Mapping[str, str] | None = None, home: Path | None = None
) -> int:
    parser = argparse.ArgumentParser(description="Validate a submission, then upload it to Kaggle.")
    parser.add_argument("file", nargs="?", type=Path, help="e.g. reports/submission_stg2.csv")
    parser.add_argument("--message", "-m", default="", help="the submission's description on Kaggle")
    parser.add_argument(
        "--sample", type=Path, help="sample submission to validate against (default: from params)"
    )
    parser.add_argument("--competition", default=COMPETITION)
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    home = Path.home() if home is None else home

    if args.file is None or not args.file.is_file():
        print(
            f'usage: make submit FILE=reports/submission_stg2.csv MESSAGE="..." (no file at {args.file})',
            file=sys.stderr,
        )
        return 2
    if not args.message.strip():
        print('a message is required: make submit FILE=... MESSAGE="what changed"', file=sys.stderr)
        return 2

    from pipeline.core.submission import read_submission, validate

    sample = pick_sample(args.file, args.sample)
    problems = validate(read_submission(args.file), read_submission(sample))
    if problems:
        print(f"not uploading {args.file}: invalid against {sample}: {problems[0]}", file=sys.stderr)
        return 1
    print(f"{args.file} is valid against {sample}")

    source = find_credentials(environ, home)
    if source is None:
        print(
            NO_CREDENTIALS.format(
                config_dir=kaggle_config_dir(environ, home), competition=args.competition, file=args.file
            ),
            file=sys.stderr,
        )
        return 3
    try:
        import kaggle.api.kaggle_api_extended  # noqa: F401 - only to tell a missing package from other errors
    except ImportError:
        print(NO_PACKAGE, file=sys.stderr)
        return 4
    except Exception as exc:  # noqa: BLE001 - the package authenticates on import
        print(f"the kaggle client rejected the credentials from {source}: {exc}", file=sys.stderr)
        return 3
    print(f"uploading {args.file} to {args.competition} with credentials from {source}")
    upload(args.file, args.message, args.competition)
    print(f"uploaded; see https://www.kaggle.com/competitions/{args.competition}/submissions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
