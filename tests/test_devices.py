"""`configure_devices` chooses as documented, and a multi-worker cluster has one writer: nothing is patched.

One device and the precision policy are checked in this process. Several logical CPUs and a two-worker
`TF_CONFIG` need fresh interpreters: devices can only be split before TensorFlow starts, and a multi-worker
strategy waits for every worker of its cluster to join (the two workers here run at once, on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest
import tensorflow as tf

from pipeline.core import cases, devices, tracking
from pipeline.core.devices import Task, configure_devices, scratch_dir, task, write_path
from tests.factories import ROOT, free_ports

TWO_WORKERS = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}


def cluster(kind: str, index: int, spec: dict = TWO_WORKERS) -> str:
    return json.dumps({**spec, "task": {"type": kind, "index": index}})


@pytest.fixture
def policy():
    """Leave Keras' global precision policy as the test found it."""
    before = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(before)


def test_one_device_gets_the_default_strategy_and_float32(policy, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert len(tf.config.list_logical_devices()) == 1
    assert configure_devices("auto") is tf.distribute.get_strategy()  # auto: float16 only with a GPU
    assert keras.mixed_precision.global_policy().name == "float32"
    summary = devices.device_summary()
    assert summary["strategy"] == "_DefaultDistributionStrategy" and summary["replicas"] == summary["workers"] == 1


def test_precision_on_computes_in_float16_and_off_in_float32(policy, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    configure_devices("on")
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    configure_devices("off")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_a_cluster_of_one_is_not_multi_worker(policy, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert configure_devices("off") is tf.distribute.get_strategy()
    assert task() == Task("worker", 0, 1, True)


def test_the_chief_is_worker_zero_unless_the_cluster_names_one():
    assert task("") == Task("worker", 0, 1, True)  # no TF_CONFIG: alone, and so the chief
    assert task(cluster("worker", 0)).chief and not task(cluster("worker", 1)).chief
    with_chief = {"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]}}
    assert task(cluster("chief", 0, with_chief)) == Task("chief", 0, 2, True)
    assert task(cluster("worker", 0, with_chief)) == Task("worker", 0, 2, False)


def test_only_the_chief_writes_where_paths_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chief, other = task(cluster("worker", 0)), task(cluster("worker", 1))
    assert write_path("reports/train", chief) == Path("reports/train")
    elsewhere = write_path("reports/train", other)
    assert elsewhere.is_relative_to(scratch_dir(other)) and not elsewhere.is_relative_to(tmp_path)
    assert elsewhere.parts[-2:] == ("reports", "train")
    assert scratch_dir(other) != scratch_dir(task(cluster("worker", 2)))  # one folder per task
    elsewhere.mkdir(parents=True)
    devices.discard_scratch(chief)
    assert elsewhere.exists()
    devices.discard_scratch(other)
    assert not scratch_dir(other).exists()


def test_a_case_on_a_worker_other_than_the_chief_writes_aside_and_opens_no_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("TF_CONFIG", cluster("worker", 1))
    tracking.reset()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tracking.start_run(None, "case", {"a": 1}, experiment="mnist") as run:
        assert run is None
        written = cases.report({"test_accuracy": 0.5}, {"figure.png": plt.figure()}, tmp_path / "reports")
    assert not (tmp_path / "reports").exists()
    assert all(p.is_relative_to(scratch_dir()) and p.exists() for p in written)
    devices.discard_scratch()
    assert not (tmp_path / "mlflow.db").exists(), "a worker other than the chief opened the tracking store"


SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    if sys.argv[1] == "cpus":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pipeline.core import devices
    strategy = devices.configure_devices("off")
    with strategy.scope():
        out = devices.device_summary()
        me = devices.task()
        if me.workers > 1:  # the workers agree: only a flag that every one of them holds is true for all
            out["agree"] = [devices.everyone(True), devices.everyone(me.index == 0), devices.everyone(False)]
    print("RESULT", json.dumps({**out, "chief": me.chief}))
""")


def _result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT")).split(" ", 1)[1])


@pytest.mark.slow
def test_several_logical_devices_get_a_mirrored_strategy():
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, "cpus"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    out = _result(done)
    assert out["strategy"] == "MirroredStrategy" and out["replicas"] == 2 and out["workers"] == 1


@pytest.mark.slow
def test_two_workers_get_a_multi_worker_strategy_and_agree_before_they_branch():
    ports = free_ports(2)
    spec = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, "cluster"], cwd=ROOT, text=True,
                              env={**os.environ, "TF_CONFIG": cluster("worker", i, spec)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    outs = [_result(subprocess.CompletedProcess(p.args, p.returncode, *r)) for p, r in zip(procs, results, strict=True)]
    for i, out in enumerate(outs):
        assert out["strategy"] == "MultiWorkerMirroredStrategy" and out["replicas"] == 2 and out["workers"] == 2
        assert out["chief"] == (i == 0)
        assert out["agree"] == [True, False, False]


_CPUINFO = ("processor\t: {i}\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma {extra}\n"
            "bugs\t\t: avx512_bf16\n\n")


@pytest.mark.parametrize(("extra", "native"), [("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True),
                                               ("avx512f avx512_vnni", False), ("", False)])
def test_native_bfloat16_reads_the_cpus_flags(extra, native):
    text = "".join(_CPUINFO.format(i=i, extra=extra) for i in range(2))
    assert devices.native_bfloat16(text) is native  # a flag named on another line (bugs) does not count


def test_dtype_policy_sets_the_policy_inside_and_puts_it_back(policy):
    before = keras.mixed_precision.global_policy().name
    with devices.dtype_policy("mixed_bfloat16"):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        layer = keras.layers.Dense(2)
    assert keras.mixed_precision.global_policy().name == before
    assert layer.compute_dtype == "bfloat16"
    with devices.dtype_policy(None):
        assert keras.mixed_precision.global_policy().name == before
