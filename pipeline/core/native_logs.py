"""Keep TensorFlow's native start-up chatter out of a stage's log, and everything else in it.

TensorFlow 2.21 writes through absl's C++ logger straight to file descriptor 2, before Python can say
anything about it: `I0000 ... cudart_stub.cc] Could not find cuda drivers`, `oneDNN custom operations are
on`, `E0000 ... failed call to cuInit`, dozens of `NodeDef mentions attribute use_unbounded_threadpool`
(a tf.data attribute its own op registry does not know). No environment variable silences all of it
(`TF_CPP_MIN_LOG_LEVEL`, `GLOG_minloglevel` and `ABSL_MIN_LOG_LEVEL` were tried). So `filter_stderr` puts a
filter process between the descriptor and the terminal: lines that match `NOISE` are dropped, every other
byte passes through unchanged and at once (progress bars included), and whatever is written last before a
crash still reaches the terminal, because the filter is a separate process that reads until the pipe closes.

Only informational lines and the known-harmless errors are dropped: TensorFlow's real warnings and errors, and
everything Python writes, stay. `FISHPIPE_NATIVE_LOGS=1` turns the filter off.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import select
import signal
import sys
import time

#: One native log line that says nothing a user can act on.
NOISE = re.compile(
    rb"(?:"
    # absl's informational lines: "I0000 00:00:1796278615.374767    2505 port.cc:153] ..."
    rb"I\d{4} \d\d:\d\d:[\d.]+ +\d+ [^\]\s]+:\d+\] [^\n]*"
    # errors that are not: no CUDA driver on a CPU machine, a tf.data attribute TensorFlow itself wrote, and
    # oneDNN handing an int32 op to Eigen on a CPU without AVX-512 (the XLA-compiled localiser step)
    rb"|E\d{4} \d\d:\d\d:[\d.]+ +\d+ [^\]\s]+:\d+\] (?:failed call to cuInit|NodeDef mentions attribute "
    rb"use_unbounded_threadpool|Unable to register cu(?:DNN|FFT|BLAS) factory|oneDNN supports DT_INT32 only on "
    rb"platforms with AVX-512\. Falling back)[^\n]*"
    # tf.data cancelling its own background graph optimisation when an iterator finishes early
    rb"|W\d{4} \d\d:\d\d:[\d.]+ +\d+ root_dataset\.cc:\d+\] Optimization loop failed: CANCELLED[^\n]*"
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|To enable the following instructions: [^\n]*rebuild TensorFlow with the appropriate compiler flags\."
    rb")\n"
)
#: How long a line without its newline waits for the rest before it is passed on (a progress bar's redraw).
PARTIAL_LINE_SECONDS = 0.05
#: How long a finishing stage waits for the filter to write out the last lines.
FINISH_SECONDS = 5.0


def drop_noise(data: bytes) -> bytes:
    """`data` without its noise lines; a noise line glued to a progress bar's redraw loses only itself."""
    return NOISE.sub(b"", data)


def _pump(read_fd: int, write_fd: int) -> None:
    """The filter process: read until every writer has closed the pipe, pass on all but the noise."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the stage; the filter drains what it wrote
    pending = b""
    while True:
        if pending:
            ready, _, _ = select.select([read_fd], [], [], PARTIAL_LINE_SECONDS)
            if not ready:  # a partial line that stayed partial: a progress bar, show it now
                os.write(write_fd, drop_noise(pending))
                pending = b""
                continue
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        pending += chunk
        complete, newline, rest = pending.rpartition(b"\n")
        if newline:
            os.write(write_fd, drop_noise(complete + newline))
            pending = rest
    if pending:
        os.write(write_fd, drop_noise(pending))


def filter_stderr() -> bool:
    """Route this process's file descriptor 2 (and its children's) through the noise filter.

    Call it before TensorFlow is imported. Returns False, changing nothing, when it is turned off or when
    the platform cannot fork.
    """
    if os.environ.get("FISHPIPE_NATIVE_LOGS") == "1" or not hasattr(os, "fork"):
        return False
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    terminal = os.dup(2)
    pid = os.fork()
    if pid == 0:  # the filter
        os.close(write_fd)
        code = 0
        try:
            _pump(read_fd, terminal)
        except BaseException:  # noqa: BLE001 - a filter that breaks must never take the log with it
            code = 1
        os._exit(code)
    os.close(read_fd)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    os.close(terminal)

    def finish() -> None:
        # Close our end so the filter sees the end of the stream, then let it write out the last lines.
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        # A worker process that outlives its stage still holds the pipe: wait a little, never for ever.
        deadline = time.monotonic() + FINISH_SECONDS
        with contextlib.suppress(ChildProcessError, OSError):
            while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.01)

    atexit.register(finish)
    return True
