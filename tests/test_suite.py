"""The suite's own scheduling on two workers (tests/scheduling.py)."""

from tests import scheduling


def test_tests_that_share_an_expensive_fixture_run_on_one_worker(request):
    """Every collected test that uses a session or module fixture of ours sits in a file that `SHARED` keeps on
    one worker, in that fixture's group: else two workers would each build it (a whole `make repro`, a server)."""
    wrong = {}
    for item in request.session.items:
        group, path = scheduling.shared_fixture(item), item.nodeid.split("::", 1)[0]
        if group is not None and scheduling.SHARED.get(path) != group:
            wrong[item.nodeid] = f"uses {group}, scheduled as {scheduling.SHARED.get(path, 'a unit of its own')}"
    assert not wrong, f"add these files to tests/scheduling.py's SHARED: {wrong}"


def test_a_shared_file_is_one_unit_of_work_and_other_tests_are_units_of_their_own():
    from types import SimpleNamespace

    config = SimpleNamespace(getvalue=lambda name: "loadscope", option=SimpleNamespace(loadscopereorder=False))
    sched = scheduling.make_scheduler(config, log=None)
    assert sched._split_scope("tests/test_readme.py::test_x") == sched._split_scope("tests/test_pipeline_smoke.py::y")
    assert sched._split_scope("tests/test_config.py::a") != sched._split_scope("tests/test_config.py::b")
    assert scheduling.make_scheduler(SimpleNamespace(getvalue=lambda name: "load"), log=None) is None
