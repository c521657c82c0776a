"""Devices and precision: which `tf.distribute` strategy trains, and how batches split over its replicas.

Used by the fisheries train stage and the course pipelines alike. GPUs are used when present, without code
changes: `configure_devices` picks a `tf.distribute` strategy (several GPUs on one machine:
`MirroredStrategy`; several machines: `MultiWorkerMirroredStrategy`, set up through the `TF_CONFIG`
environment variable) and turns on float16 compute with `mixed_precision: auto`.
On a CPU it returns the default strategy and float32, so no code path assumes a GPU.

Several machines train one model only if each runs the same operations in the same order, and only one of
them writes. `task()` reads this process's place in the cluster from `TF_CONFIG`; the chief (task type
`chief`, or worker 0 when the cluster names none) writes the real outputs, and every other worker writes the
same files into its own throw-away folder (`scratch_dir`, the TensorFlow multi-worker guide's pattern), so the
code that writes is the same on every worker. `everyone` lets the workers agree before a branch that one of
them might take alone (reuse a cache, resume a fold): a collective op run by one worker only never returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

# TensorFlow is imported inside the functions that use it: `rows_for_replicas` is pure NumPy, and the batch
# feeder that uses it also runs under Keras' JAX backend, where TensorFlow may be absent (bench.gpu).


def configure_devices(mixed_precision: str = "auto") -> tf.distribute.Strategy:
    """Choose the distribution strategy and precision policy for the visible devices.

    - `TF_CONFIG` naming several workers (chief included): `MultiWorkerMirroredStrategy` (several machines).
    - Several GPUs: `MirroredStrategy` over them.
    - No GPU but several logical CPU devices (split with `tf.config.set_logical_device_configuration`, as
      the tests do to stand in for GPUs): `MirroredStrategy` over those.
    - Otherwise the default strategy: one device.
    `mixed_precision`: `on`, `off`, or `auto` (float16 compute when a GPU is present).
    """
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Grow GPU memory on demand so several stages (or a notebook) can share a card.
        # (A RuntimeError means the GPU is already initialised: the setting only applies before first use.)
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    if mixed_precision == "on" or (mixed_precision == "auto" and gpus):
        keras.mixed_precision.set_global_policy("mixed_float16")
    else:
        keras.mixed_precision.set_global_policy("float32")
    if task().workers > 1:
        _keras_multi_worker_fixes()
        return _shared(tf.distribute.MultiWorkerMirroredStrategy)
    logical_gpus = tf.config.list_logical_devices("GPU")
    if len(logical_gpus) > 1:
        return _shared(tf.distribute.MirroredStrategy, tuple(d.name for d in logical_gpus))
    cpus = tf.config.list_logical_devices("CPU")
    if not logical_gpus and len(cpus) > 1:
        return _shared(tf.distribute.MirroredStrategy, tuple(d.name for d in cpus))
    return tf.distribute.get_strategy()


_STRATEGIES: dict[tuple, tf.distribute.Strategy] = {}


#: CPU flags (Linux's /proc/cpuinfo names) of native bfloat16 arithmetic: AVX512-BF16 (AMD Zen 4, Intel Cooper
#: Lake and later) and AMX (Intel Sapphire Rapids and later). Without them TensorFlow emulates bfloat16, slowly.
BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def native_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (`cpuinfo`: the text of /proc/cpuinfo, read when None; a
    machine without that file, macOS for one, counts as not)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    lines = (line.split(":", 1)[-1] for line in cpuinfo.splitlines() if line.startswith("flags"))
    flags = {flag for line in lines for flag in line.split()}
    return bool(flags & BFLOAT16_FLAGS)


@contextlib.contextmanager
def dtype_policy(name: str | None):
    """Keras' global dtype policy set to `name` (e.g. `mixed_bfloat16`) for the models built inside, and put back
    after; None leaves it as it is. A layer keeps the policy it was built under."""
    import keras

    if name is None:
        yield
        return
    saved = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(saved)


def _shared(kind: type, devices: tuple[str, ...] | None = None) -> tf.distribute.Strategy:
    """One strategy of each kind (and device set) per process. A second MirroredStrategy in the same process
    (a notebook calling several stages' `main`) reuses the first one's collective keys, and its all-reduce
    then fails with "Shape mismatch in the collective instance" (seen on TensorFlow 2.21)."""
    key = (kind, devices)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = kind() if devices is None else kind(list(devices))
    return _STRATEGIES[key]


# ------------------------------------------------------------------------------------- several machines


@dataclass(frozen=True)
class Task:
    """This process's place in a `TF_CONFIG` cluster; a process alone is the chief of a cluster of one."""

    type: str = "worker"
    index: int = 0
    workers: int = 1  # processes that train together: the chief and the workers
    chief: bool = True  # writes the outputs, checkpoints, figures and MLflow runs

    @property
    def name(self) -> str:
        return f"{self.type}-{self.index}"


def task(tf_config: str | None = None) -> Task:
    """Parse `TF_CONFIG` (default: the environment's). The chief is task type `chief`, else worker 0."""
    config = json.loads((os.environ.get("TF_CONFIG") if tf_config is None else tf_config) or "{}")
    cluster, me = config.get("cluster", {}), config.get("task", {})
    kind, index = me.get("type", "worker"), int(me.get("index", 0))
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    chief = kind == "chief" or (kind == "worker" and index == 0 and not cluster.get("chief"))
    return Task(kind, index, max(workers, 1), chief)


def scratch_dir(me: Task | None = None) -> Path:
    """The throw-away folder a non-chief worker writes into, one per task and project folder."""
    me = me or task()
    project = hashlib.sha1(str(Path.cwd().resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"fishpipe-{project}-{me.name}"


def write_path(path: str | Path, me: Task | None = None) -> Path:
    """Where this worker writes `path`: the path itself on the chief, its mirror under `scratch_dir` elsewhere."""
    me = me or task()
    if me.chief:
        return Path(path)
    resolved = Path(path).resolve()
    return scratch_dir(me) / resolved.relative_to(resolved.anchor)


def discard_scratch(me: Task | None = None) -> None:
    """Delete a non-chief worker's throw-away folder once its run has finished (kept after a crash, to resume)."""
    me = me or task()
    if not me.chief:
        shutil.rmtree(scratch_dir(me), ignore_errors=True)


def everyone(flag: bool, strategy: tf.distribute.Strategy | None = None) -> bool:
    """True when `flag` is true on every worker; one worker alone needs nobody's agreement.

    Run by every worker at the same point: it is itself a collective op.
    """
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return flag
    votes = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(int(flag))), axis=None)
    return int(votes) == strategy.num_replicas_in_sync


def predict(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """`model.predict(x)`, except under `MultiWorkerMirroredStrategy`, where each worker computes every row on
    its own device: `predict` there splits each batch over the workers and gathers the pieces back over the
    network, which took longer than the computing (5x on the test's tiny head). Same numbers either way."""
    import tensorflow as tf

    if not isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return model.predict(x, batch_size=batch_size, verbose=0)
    local = tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)
    return np.concatenate([np.asarray(local(np.asarray(x[i : i + batch_size]))) for i in range(0, len(x), batch_size)])


def _keras_multi_worker_fixes() -> None:
    """Two Keras 3.15 bugs that stop every `fit` under `MultiWorkerMirroredStrategy` with several workers.

    - Before the first step `fit` averages the first batch over the workers (`strategy.reduce` on the whole
      (x, y) structure) only to learn its shapes, and TensorFlow 2.21 refuses the structure ("Attempt to
      convert a value (PerReplica ...) to a Tensor"): the local batch has the same shapes.
    - Every step's logs (scalars) are averaged with `axis=0` ("Invalid reduction dimension 0 for input with
      0 dimensions"): they are averaged over the replicas instead, as on one machine.
    Applied once; single-machine strategies never reach the patched branches.
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_fishpipe_fixed", False):
        return
    build, reduce_per_replica = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica

    def local(strategy: tf.distribute.Strategy, batch: object) -> object:
        return tree.map_structure(
            lambda v: strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues)
            else v, batch)

    def symbolic_build(self, iterator=None, data_batch=None):  # noqa: ANN001, ANN202 - Keras' signature
        if iterator is not None and data_batch is None and self._distribute_strategy is not None:
            for _, _, it in iterator:
                data_batch = local(self.distribute_strategy, next(it))
                break
            iterator = None
        return build(self, iterator=iterator, data_batch=data_batch)

    def reduce_logs(values, strategy, reduction="auto"):  # noqa: ANN001, ANN202 - Keras' signature
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None) if isinstance(v, tf.distribute.DistributedValues)
                else v, values)
        return reduce_per_replica(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = symbolic_build
    trainer.reduce_per_replica = reduce_logs
    trainer._fishpipe_fixed = True


# ------------------------------------------------------------------------------------------ replicas


def replicas() -> int:
    """How many devices share each batch under the strategy in scope (1 outside any)."""
    import tensorflow as tf

    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def device_summary() -> dict[str, int | str]:
    """What the current run trains on: GPUs seen, precision policy, and the strategy in scope with its replicas."""
    import keras
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    return {
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "precision_policy": keras.mixed_precision.global_policy().name,
        # TensorFlow's class behind the public name is CollectiveAllReduceStrategy: report the name users set.
        "strategy": "MultiWorkerMirroredStrategy" if multi_worker else type(strategy).__name__,
        "replicas": int(strategy.num_replicas_in_sync),
        "workers": task().workers if multi_worker else 1,
    }


def rows_for_replicas(n: int, batch_size: int, replicas: int, seed: int) -> np.ndarray:
    """Indices of the `n` training rows to fit on, so that no replica gets an empty last batch.

    Several replicas split every batch; a last batch smaller than that leaves a replica with no rows, and
    batch norm over no rows turns the whole step to NaN. The few rows (< replicas) that would cause it are
    left out, chosen by `seed`; on one device every row stays. A batch size the replicas cannot share evenly
    fails under Keras 3.15 / TensorFlow 2.21, so it is refused here with the fix.
    """
    if batch_size % replicas:
        raise ValueError(f"batch size {batch_size} does not split evenly over {replicas} replicas: "
                         "make it a multiple of the number of GPUs")
    extra = (n % batch_size) % replicas
    if not extra:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[extra:])


