"""Fetch the competition files into `data.kaggle_dir` with the official `kaggle` client (`make download`).

Never part of `dvc repro` and never run by the tests: it needs the network, a Kaggle account and the
competition rules accepted. Without a token or without the package it says exactly what to do and exits
non-zero, before touching the network. The `kaggle` package is imported only here, lazily, because old
releases authenticate (and may exit) at import time.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.competition import COMPETITION, COMPETITION_URL
from pipeline.core.params import Data, load
from pipeline.tools.kaggle_auth import find_credentials

FILES = (
    "train.zip",
    "test_stg1.zip",
    "test_stg2.7z",
    "sample_submission_stg1.csv.zip",
    "sample_submission_stg2.csv.zip",
)


@dataclass(frozen=True)
class Settings:
    data: Data  # data.kaggle_dir: where the download goes


def instructions(target: Path, problem: str) -> str:
    """What to do, step by step, when the download cannot start."""
    return f"""make download: {problem}

To fetch the Nature Conservancy Fisheries Monitoring files:
  1. Sign in at https://www.kaggle.com, open your account settings (https://www.kaggle.com/settings),
     section "API", and click "Create New Token": your browser saves kaggle.json.
  2. Put it where the client looks, readable by you only:
       mkdir -p ~/.kaggle && mv ~/Downloads/kaggle.json ~/.kaggle/ && chmod 600 ~/.kaggle/kaggle.json
     (or export KAGGLE_USERNAME and KAGGLE_KEY with the two values from that file; a newer API token
     goes in KAGGLE_API_TOKEN or ~/.kaggle/access_token).
  3. Accept the competition rules on {COMPETITION_URL}/rules
     (the API answers 403 Forbidden until you have).
  4. Run `make download` again.
Or download {", ".join(FILES)} by hand from {COMPETITION_URL}/data into {target}.
Without the real data, `make repro` runs on the generated demo (data.source: demo in params.yaml)."""


def download(target: Path, files: tuple[str, ...] = FILES, force: bool = False) -> list[Path]:
    """Download each competition file into `target` (skipping those already there); return their paths."""
    from kaggle.api.kaggle_api_extended import KaggleApi  # lazy: optional extra, talks to the network

    api = KaggleApi()
    api.authenticate()
    target.mkdir(parents=True, exist_ok=True)
    got = []
    for name in files:
        dest = target / name
        if dest.is_file() and dest.stat().st_size > 0 and not force:
            print(f"{dest} already there; skipped (--force to fetch again)")
        else:
            print(f"fetching {name} ...")
            # unzip: Kaggle serves some files wrapped as <name>.zip; the client unwraps exactly that case.
            api.competition_download_file(
                COMPETITION, name, path=str(target), force=force, quiet=False, unzip=True
            )
        if not dest.is_file():
            raise FileNotFoundError(f"the kaggle client did not leave {dest}; see its output above")
        got.append(dest)
    return got


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    target = Path(load(Settings).data.kaggle_dir)
    if find_credentials(os.environ, Path.home()) is None:
        print(instructions(target, "no Kaggle API credentials found"), file=sys.stderr)
        return 2
    try:
        got = download(target, force="--force" in argv)
    except ImportError:
        print(
            instructions(
                target,
                "the kaggle package is not installed; install it with "
                "`.venv/bin/python -m pip install -e '.[kaggle]'` (make download does)",
            ),
            file=sys.stderr,
        )
        return 2
    except (SystemExit, Exception) as exc:  # the client raises HTTP errors of its own types
        text = str(exc)
        problem = (
            "Kaggle refused the download (403): accept the competition rules first"
            if "403" in text
            else "Kaggle rejected the credentials (401)"
            if "401" in text
            else f"the download failed: {type(exc).__name__}: {text}"
        )
        print(instructions(target, problem), file=sys.stderr)
        return 1
    print(
        f"downloaded {len(got)} files into {target}; "
        "set data.source: kaggle in params.yaml and run make repro"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
