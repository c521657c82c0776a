"""How `make test` shares the suite between two pytest-xdist workers (`-n 2 --dist loadscope`).

On two cores about half the suite waits on one thread (Python and TensorFlow imports, DVC, subprocesses): the CI
run of the whole suite in one process kept the CPUs 90% of one core busy (`/usr/bin/time`), and a second worker
fills the rest. Tests that share an expensive fixture must run on the worker that built it, or each worker builds
it: a session fixture's (demo_project: a whole `make repro`, about 3 min) or a module fixture's (a server, a
generated demo). xdist's own `xdist_group` mark cannot say so under pytest 9.2 (xdist 3.8 appends the group to
`item._nodeid`, which pytest 9.2's node ids no longer read), and the controller that schedules sees test ids
only, so the groups are by file, in `SHARED`; `test_suite.py` checks them against the fixtures every test uses.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

HERE = Path(__file__).parent
#: Test files whose tests share an expensive fixture of ours, and the worker group each belongs to.
SHARED: dict[str, str] = {
    "tests/test_pipeline_smoke.py": "demo_project",
    "tests/test_readme.py": "demo_project",
    "tests/test_augment.py": "tests/test_augment.py",
    "tests/test_browser.py": "tests/test_browser.py",
    "tests/test_demo.py": "tests/test_demo.py",
    "tests/test_serving.py": "tests/test_serving.py",
    "tests/test_team_server.py": "tests/test_team_server.py",
}


def shared_fixture(item: pytest.Item) -> str | None:
    """The group `item` must run in: the session fixture of ours it uses (autouse ones aside), else its file when
    it uses a module fixture of ours, else none (pytest's own, tmp_path_factory for one, are cheap)."""
    scopes = {name: defs[-1].scope for name, defs in item._fixtureinfo.name2fixturedefs.items()
              if defs and Path(inspect.getsourcefile(defs[-1].func)).resolve().is_relative_to(HERE)}
    session = sorted(n for n, scope in scopes.items() if scope == "session" and not n.startswith("_"))
    if session:
        return session[0]
    if any(scope in ("module", "package") for scope in scopes.values()):
        return item.nodeid.split("::", 1)[0]
    return None


def longest_first(items: list[pytest.Item]) -> None:
    """demo_project's tests first (a whole graph, its reruns, the README's experiments: the longest chain), then
    the other slow ones, so that neither worker is left with long work at the end."""
    items.sort(key=lambda item: (SHARED.get(item.nodeid.split("::", 1)[0]) != "demo_project",
                                 item.get_closest_marker("slow") is None))


def make_scheduler(config: pytest.Config, log):
    """xdist's load-scope scheduling (work units handed out in collection order as workers free up), with the
    units of `SHARED`: a shared file's tests are one unit, every other test a unit of its own."""
    if config.getvalue("dist") != "loadscope":
        return None  # another --dist: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SHARED.get(nodeid.split("::", 1)[0], nodeid)

    return SharedFixtureScheduling(config, log)
