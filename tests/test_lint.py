"""The code passes the project's own linter (`make lint`): CI runs only `make test`, so without this a lint
error lands unseen, as one in the localise stage did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.factories import ROOT


def test_ruff_finds_nothing_to_fix():
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
