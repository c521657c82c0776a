"""Worker processes that end with the process that started them: a spawned `ProcessPoolExecutor` whose workers
each watch their parent.

Used by the localise stage (fold processes) and by fine-tuning's input (`pipeline.core.batches`). A Python 3.11
pool whose owner dies without shutting it down (killed, out of memory, a `timeout`) leaves its workers waiting for
work forever, each holding its memory (a fold process: the training frames and TensorFlow): here each worker
checks once a second that its parent is still the process that started it, and exits when it is not.
Workers are spawned, not forked: forking a process that runs TensorFlow can deadlock. Nothing here imports
TensorFlow or Keras (fine-tuning's input workers start without them, and bench.gpu runs under JAX).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

#: Seconds between a worker's looks at its parent.
WATCH_INTERVAL = 1.0


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    os._exit(1)  # orphaned: no one will send work or read results


def _start(parent: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watch").start()
    if initializer is not None:
        initializer(*initargs)


def spawn_pool(processes: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()
               ) -> ProcessPoolExecutor:
    """`processes` spawned workers, each running `initializer(*initargs)` first and ending itself if this process
    dies without shutting the pool down. `initializer` must be importable by name (a module-level function)."""
    return ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn"), initializer=_start,
                               initargs=(os.getpid(), initializer, initargs))
