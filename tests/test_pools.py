"""Worker processes end with the process that started them (pipeline.core.pools: fold processes, fine-tuning's
input workers)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.core.pools import spawn_pool
from tests.factories import ROOT

#: A process that starts a pool of two, prints its workers' pids, and waits: killed, it cannot shut them down.
_OWNER = """
import os, sys, time
from pipeline.core.pools import spawn_pool
pool = spawn_pool(2)
pids = {pool.submit(os.getpid).result() for _ in range(8)}
print(*sorted(pids), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_run_the_initializer_and_the_work(tmp_path):
    with spawn_pool(1, os.chdir, (str(tmp_path),)) as pool:
        assert pool.submit(os.getcwd).result() == str(tmp_path)
        assert pool.submit(os.getpid).result() != os.getpid()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_themselves_when_their_owner_is_killed():
    """Without the parent watch a Python 3.11 pool's idle workers wait for work forever (mutation-checked)."""
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a worker outlived the process that started it"
