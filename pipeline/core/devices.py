"""Devices and precision: which `tf.distribute` strategy trains, and how batches split over its replicas.

Used by the fisheries train stage and the course pipelines alike. GPUs are used when present, without code
changes: `configure_devices` picks a `tf.distribute` strategy (several GPUs on one machine:
`MirroredStrategy`; several machines: `MultiWorkerMirroredStrategy`, set up through the `TF_CONFIG`
environment variable) and turns on float16 compute with `mixed_precision: auto`.
On a CPU it returns the default strategy and float32, so no code path assumes a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

# TensorFlow is imported inside the functions that use it: `rows_for_replicas` is pure NumPy, and the batch
# feeder that uses it also runs under Keras' JAX backend, where TensorFlow may be absent (bench.gpu).


def configure_devices(mixed_precision: str = "auto") -> tf.distribute.Strategy:
    """Choose the distribution strategy and precision policy for the visible devices.

    - `TF_CONFIG` naming several workers: `MultiWorkerMirroredStrategy` (several machines).
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
    if len(json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {}).get("worker", [])) > 1:
        return _shared(tf.distribute.MultiWorkerMirroredStrategy)
    logical_gpus = tf.config.list_logical_devices("GPU")
    if len(logical_gpus) > 1:
        return _shared(tf.distribute.MirroredStrategy, tuple(d.name for d in logical_gpus))
    cpus = tf.config.list_logical_devices("CPU")
    if not logical_gpus and len(cpus) > 1:
        return _shared(tf.distribute.MirroredStrategy, tuple(d.name for d in cpus))
    return tf.distribute.get_strategy()


_STRATEGIES: dict[tuple, tf.distribute.Strategy] = {}


def _shared(kind: type, devices: tuple[str, ...] | None = None) -> tf.distribute.Strategy:
    """One strategy of each kind (and device set) per process. A second MirroredStrategy in the same process
    (a notebook calling several stages' `main`) reuses the first one's collective keys, and its all-reduce
    then fails with "Shape mismatch in the collective instance" (seen on TensorFlow 2.21)."""
    key = (kind, devices)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = kind() if devices is None else kind(list(devices))
    return _STRATEGIES[key]


def replicas() -> int:
    """How many devices share each batch under the strategy in scope (1 outside any)."""
    import tensorflow as tf

    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def device_summary() -> dict[str, int | str]:
    """What the current run trains on: GPUs seen, precision policy, and the strategy in scope with its replicas."""
    import keras
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    return {
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "precision_policy": keras.mixed_precision.global_policy().name,
        "strategy": type(strategy).__name__,
        "replicas": int(strategy.num_replicas_in_sync),
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


