"""Shared test set-up: no test touches the network, the repository's MLflow store or the user's Keras cache."""

import inspect
import os
from pathlib import Path

import pytest

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


# ------------------------------------------------------------------------------------ two workers (pytest-xdist)
# `make test` runs the suite on two workers (`-n 2 --dist loadgroup`): on two cores about half of it waits on one
# thread (Python and TensorFlow imports, DVC, subprocesses), which a second worker fills. Tests that share an
# expensive fixture run on one worker, where it was built once: a session fixture's (demo_project: a whole
# `make repro`) or a module fixture's (a server, a generated demo). The longest work goes out first, so neither
# worker is left with it at the end.


def _shared_fixture(item: pytest.Item) -> str | None:
    """The group of tests `item` must run with: the session fixture of ours it uses (autouse ones aside), else its
    module when it uses a module fixture of ours, else none (pytest's own, tmp_path_factory for one, are cheap)."""
    here = Path(__file__).parent
    scopes = {name: defs[-1].scope for name, defs in item._fixtureinfo.name2fixturedefs.items()
              if defs and Path(inspect.getsourcefile(defs[-1].func)).resolve().is_relative_to(here)}
    session = sorted(n for n, scope in scopes.items() if scope == "session" and not n.startswith("_"))
    if session:
        return session[0]
    if any(scope in ("module", "package") for scope in scopes.values()):
        return item.module.__name__
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = {}
    for item in items:
        group = groups[item.nodeid] = _shared_fixture(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    # demo_project's tests first (a whole graph, then its reruns: the longest chain), then the other slow ones
    items.sort(key=lambda item: (groups[item.nodeid] != "demo_project", item.get_closest_marker("slow") is None))
