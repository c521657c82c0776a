"""A throw-away copy of the project, as a user's clone is, for tests that run DVC, make or README commands.

It holds what a clone holds (the package, `bin/`, dvc.yaml, the Makefile, pyproject.toml, `.dvc/plots`) with a
tiny params.yaml, and links `.venv` to this checkout's, so the copy's commands use the installed interpreter
exactly as `make repro` would, without installing anything again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.factories import ROOT, tiny_params

#: What a tiny demo project trains on: a few dozen frames at 32 px, three folds, two backbones.
TINY_DEMO = {
    "demo.n_train": 72,
    "demo.n_test_stg1": 16,
    "demo.n_test_stg2": 24,
    "demo.width": 192,
    "model.backbones": ["vgg16", "resnet50"],
    "crops.backbones": ["vgg16"],
}
#: The course cases at a few seconds each.
TINY_CASES = {
    "mnist.epochs": 1,
    "mnist.test_fraction": 0.5,
    "mnist.mlp": {"units": [16], "dropout": [0.1]},
    "mnist.cnn.filters": [4, 4],
    "mnist.cnn.dense_units": [8],
    "imdb.demo_reviews": 300,
    "imdb.epochs": 1,
    "imdb.rnn_units": 8,
    "catsdogs.demo_images": 60,
    "catsdogs.image_size": 32,
    "catsdogs.train.epochs": 2,
}


def fresh_env(home: Path) -> dict[str, str]:
    """What a new shell has: the system PATH and a home; no virtual environment, no MLflow or DVC variable."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


#: Resets Ctrl-C and Ctrl-\\ to what a terminal gives a program, then runs the rest of the command line.
_TERMINAL_SIGNALS = ("import os, signal, sys\n"
                     "for s in (signal.SIGINT, signal.SIGQUIT):\n    signal.signal(s, signal.SIG_DFL)\n"
                     "os.execv(sys.argv[1], sys.argv[1:])")


def in_a_terminal(command: str) -> list[str]:
    """`command` as a shell in a user's terminal runs it, for tests that stop it with Ctrl-C (SIGINT).

    A test runner started in the background (`pytest &`, a CI agent) ignores SIGINT, and a program inherits that,
    so Ctrl-C would do nothing and the test would fail for the runner's sake, not the code's: the signals are
    reset before the shell starts (a shell cannot undo an ignored signal itself)."""
    return [sys.executable, "-c", _TERMINAL_SIGNALS, "/bin/bash", "-c", command]


def run(cmd: list[str] | str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 900) -> str:
    """Run a command (a list, or one shell line) and return its output; fail the test with its tail.

    A command still running after `timeout` seconds is killed with everything it started in its session, and
    the test fails with what it had printed (a traced script shows the line it stood on)."""
    shell = isinstance(cmd, str)
    shown = cmd if shell else " ".join(cmd)
    # Files, not pipes: a daemon the command starts (DVC's queue workers) may hold its output open.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, shell=shell, stdout=out, stderr=err, text=True,
                                executable="/bin/bash" if shell else None, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    tails = f"{stdout[-3000:]}\n{stderr[-3000:]}"
    if timed_out:
        pytest.fail(f"{shown} still running after {timeout} s, killed:\n{tails}")
    assert proc.returncode == 0, f"{shown} failed ({proc.returncode}):\n{tails}"
    return stdout + stderr


def make_project(work: Path, git: bool = False, **overrides) -> Path:
    """The copy in `work`, with a tiny params.yaml (the demo at a few dozen frames) and `dvc init` done.

    With `git`, the copy is a git repository with one commit, as a clone is (DVC experiments need it).
    """
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "pipeline", work / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "bin", work / "bin")
    for name in ("dvc.yaml", "Makefile", "pyproject.toml", "README.md", ".dvcignore", ".gitignore"):
        shutil.copy2(ROOT / name, work / name)
    (work / ".venv").symlink_to(ROOT / ".venv")
    stamp = ROOT / ".venv" / ".installed"
    if stamp.exists():
        # The Makefile reinstalls the project into .venv when pyproject.toml is newer than its stamp: in a copy
        # that would point the shared venv's editable install at the copy. The copy's file is the same file.
        os.utime(work / "pyproject.toml", (stamp.stat().st_mtime - 1,) * 2)
    tiny_params(work, relative=True, **{**TINY_DEMO, **overrides})
    dvc = str(work / ".venv" / "bin" / "dvc")
    if git:
        run(["git", "init", "-q"], work)
        for key, value in (("user.name", "fishpipe tests"), ("user.email", "tests@fishpipe.invalid")):
            run(["git", "config", key, value], work)  # a user's clone has their identity configured
        run([dvc, "init", "-q"], work)
    else:
        run([dvc, "init", "--no-scm", "-q"], work)
    shutil.copytree(ROOT / ".dvc" / "plots", work / ".dvc" / "plots", dirs_exist_ok=True)
    if git:
        run(["git", "add", "-A"], work)
        run(["git", "commit", "-q", "-m", "baseline"], work)
    return work
