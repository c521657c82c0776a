"""Shared test set-up: no test touches the network, the repository's MLflow store or the user's Keras cache."""

import os

import pytest

from tests import scheduling

# Quiet TensorFlow's start-up chatter and keep it off any GPU a developer may have.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory):
    """One throw-away MLflow store and Keras home for the whole session (the store's schema takes seconds)."""
    root = tmp_path_factory.mktemp("env")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "KERAS_HOME", "DVC_EXP_NAME")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    os.environ["KERAS_HOME"] = str(root / "keras")
    os.environ.pop("DVC_EXP_NAME", None)
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory):
    """A clone of the project with a tiny demo, built as a user builds it: `make repro` in a fresh shell.

    Shared by the end-to-end tests (the smoke and determinism checks, then the README's commands), so the
    whole graph runs once per session. Returns the folder and the output of `make repro`.
    """
    from tests.projects import TINY_CASES, fresh_env, make_project, run

    work = make_project(tmp_path_factory.mktemp("clone") / "fishpipe", git=True,
                        **{**TINY_CASES, "localise.processes": "auto"})
    log = run(["make", "repro"], work, fresh_env(work), timeout=1800)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-q", "-m", "make repro on the tiny demo"], work)
    return work, log


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: two workers (`make test`)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """tests/scheduling.py keeps the tests of one expensive fixture on one worker."""
    return scheduling.make_scheduler(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    scheduling.longest_first(items)
