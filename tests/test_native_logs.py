"""The native log filter drops TensorFlow's known chatter and nothing else, progress bars and crashes included."""

import os
import subprocess
import sys
import textwrap

from pipeline.core.native_logs import drop_noise
from tests.factories import ROOT

CHATTER = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796278615.374767    2505 port.cc:153] oneDNN custom operations are on.\n"
    b"I0000 00:00:1796278615.376140    2505 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n"
    b"E0000 00:00:1796278622.724629    2505 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
    b"E0000 00:00:1796278622.7    2505 meta_optimizer.cc:966] NodeDef mentions attribute use_unbounded_threadpool "
    b"which is not in the op definition\n"
    b"E0000 00:00:1796415038.822320    3510 util.cc:131] oneDNN supports DT_INT32 only on platforms with AVX-512. "
    b"Falling back to the default Eigen-based implementation if present.\n"
    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate "
    b"compiler flags.\n"
)


def test_known_chatter_goes_and_real_messages_stay():
    real = (b"E0000 00:00:1.5   7 kernel.cc:1] OOM when allocating tensor\n"
            b"W0000 00:00:1.5   7 loader.cc:9] a warning someone should read\n"
            b"Traceback (most recent call last):\n")
    assert drop_noise(CHATTER) == b""
    assert drop_noise(CHATTER + real + CHATTER) == real


def test_a_progress_bar_redraw_glued_to_a_noise_line_keeps_the_bar():
    bar = b"\rembed vgg16:  50%|#####     | 148/296"
    noise = b"I0000 00:00:1.0   7 port.cc:1] chatter\n"
    assert drop_noise(bar + noise) == bar


def test_a_filtered_process_shows_bars_live_and_its_last_words_after_a_crash():
    """The filter is a process of its own: what the stage wrote just before dying still reaches the log."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from pipeline.core.native_logs import filter_stderr
        assert filter_stderr()
        os.write(2, {CHATTER!r})
        sys.stderr.write("\\rprogress 1/2"); sys.stderr.flush(); time.sleep(0.2)
        sys.stderr.write("\\rprogress 2/2\\n"); sys.stderr.flush()
        os.write(2, b"the real error\\n")
        os._exit(3)  # no atexit, no flush: as a crash
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FISHPIPE_NATIVE_LOGS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert done.returncode == 3
    assert done.stderr == b"\rprogress 1/2\rprogress 2/2\nthe real error\n"


def test_the_filter_can_be_turned_off():
    script = "from pipeline.core.native_logs import filter_stderr; print(filter_stderr())"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FISHPIPE_NATIVE_LOGS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False"
