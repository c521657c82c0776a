"""The shared training core: devices, precision, feature extraction and the head's training loop.

Used by the fisheries train stage and the course pipelines alike. Nothing here reads params.yaml or
touches the file system; callers pass settings in and get arrays and models back.

GPUs are used when present, without code changes: `configure_devices` picks a `tf.distribute` strategy
(several GPUs on one machine: `MirroredStrategy`; several machines: `MultiWorkerMirroredStrategy`, set up
through the `TF_CONFIG` environment variable) and turns on float16 compute with `mixed_precision: auto`.
On a CPU it returns the default strategy and float32, so no code path assumes a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.metrics import accuracy, kaggle_log_loss
from pipeline.models import build_head


def configure_devices(mixed_precision: str = "auto") -> tf.distribute.Strategy:
    """Choose the distribution strategy and precision policy for the visible devices."""
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
    if "TF_CONFIG" in os.environ and len(json.loads(os.environ["TF_CONFIG"]).get("cluster", {}).get("worker", [])) > 1:
        return _shared(tf.distribute.MultiWorkerMirroredStrategy)
    if len(gpus) > 1:
        return _shared(tf.distribute.MirroredStrategy)
    return tf.distribute.get_strategy()


_STRATEGIES: dict[type, tf.distribute.Strategy] = {}


def _shared(kind: type) -> tf.distribute.Strategy:
    """One strategy of each kind per process. A second MirroredStrategy in the same process (a notebook
    calling several stages' `main`) reuses the first one's collective keys, and its all-reduce then fails
    with "Shape mismatch in the collective instance" (seen on TensorFlow 2.21)."""
    if kind not in _STRATEGIES:
        _STRATEGIES[kind] = kind()
    return _STRATEGIES[kind]


def replicas() -> int:
    """How many devices share each batch under the strategy in scope (1 outside any)."""
    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def device_summary() -> dict[str, Any]:
    """What the current run trains on: GPUs seen, precision policy, and the strategy in scope with its replicas."""
    strategy = tf.distribute.get_strategy()
    return {
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "precision_policy": keras.mixed_precision.global_policy().name,
        "strategy": type(strategy).__name__,
        "replicas": int(strategy.num_replicas_in_sync),
    }


def extract_features(
    extractor: keras.Model, images: np.ndarray, batch_size: int = 32, chunk: int = 1024, progress: Any = None
) -> np.ndarray:
    """Run a frozen extractor over `images` (possibly a memory map) in chunks; returns float32 features.

    Chunks bound the memory a memory-mapped array pulls in at once; within a chunk `predict` batches.
    """
    out = np.empty((len(images), extractor.output_shape[-1]), dtype=np.float32)
    for start in range(0, len(images), chunk):
        batch = np.asarray(images[start : start + chunk])
        out[start : start + len(batch)] = extractor.predict(batch, batch_size=batch_size, verbose=0)
        if progress is not None:
            progress.update(len(batch))
    return out


def balanced_class_weight(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """Weights inversely proportional to class frequency (sklearn's 'balanced'), absent classes weight 1."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 1.0)
    return {k: float(w) for k, w in enumerate(weights)}


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


def as_class_columns(proba: np.ndarray) -> np.ndarray:
    """Probabilities with one column per class; a sigmoid's single column becomes (1 - p, p)."""
    proba = np.asarray(proba, dtype=np.float64)
    return np.hstack([1.0 - proba, proba]) if proba.shape[1] == 1 else proba


class ValidationLogLoss(keras.callbacks.Callback):
    """Write `val_loss` (the competition's log loss) and `val_accuracy` into every epoch's logs.

    The validation rows are scored with `predict`, not through `fit(validation_data=...)`: Keras' evaluation
    step fails under `MirroredStrategy` whenever the last validation batch does not split evenly over the
    replicas (Keras 3.15 on TensorFlow 2.21: "Inputs to operation AddN ... must have the same size and
    shape"), while `predict` handles it. Put it first among the callbacks, so early stopping and loggers
    see the numbers it adds.
    """

    def __init__(self, x: Any, y: np.ndarray, batch_size: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, np.asarray(y), batch_size

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        proba = as_class_columns(self.model.predict(self.x, batch_size=self.batch_size, verbose=0))
        if logs is not None:
            logs["val_loss"] = kaggle_log_loss(self.y, proba)
            logs["val_accuracy"] = accuracy(self.y, proba)


def fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    head_cfg: Any,
    train_cfg: Any,
    seed: int,
    class_weight: dict[int, float] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    strategy: tf.distribute.Strategy | None = None,
    verbose: int = 0,
    fixed_epochs: int | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train the dropout + batch-norm head on features; early stopping on validation log loss.

    `head_cfg` needs `units`, `dropout_in`, `dropout_out`; `train_cfg` needs `epochs`, `batch_size`,
    `learning_rate`, `patience` and `label_smoothing`. The best epoch's weights are restored, so the returned
    head is the one whose validation log loss was lowest. With `fixed_epochs` it trains exactly that many
    epochs and never looks at `x_val`/`y_val` (which may be None): for scoring without selection bias.
    """
    keras.utils.set_random_seed(seed)
    strategy = strategy or tf.distribute.get_strategy()
    keep = rows_for_replicas(len(x_train), train_cfg.batch_size, strategy.num_replicas_in_sync, seed)
    if len(keep) < len(x_train):
        x_train, y_train = x_train[keep], y_train[keep]
    with strategy.scope():
        head = build_head(x_train.shape[1], n_classes, head_cfg.units, head_cfg.dropout_in, head_cfg.dropout_out)
        head.compile(
            optimizer=keras.optimizers.Adam(train_cfg.learning_rate),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
            metrics=["accuracy"],
        )
    selection = []
    if fixed_epochs is None:
        selection = [
            ValidationLogLoss(x_val, y_val, 1024),
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=train_cfg.patience, restore_best_weights=True, mode="min"
            ),
        ]
    history = head.fit(
        x_train,
        keras.utils.to_categorical(y_train, n_classes),
        epochs=fixed_epochs or train_cfg.epochs,
        batch_size=train_cfg.batch_size,
        class_weight=class_weight,
        shuffle=True,
        callbacks=[*selection, *callbacks],
        verbose=verbose,
    )
    return head, {k: [float(v) for v in vals] for k, vals in history.history.items()}


def predict_views(model: keras.Model, views: Iterable[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Average a model's probabilities over several views (test-time augmentation) of the same rows."""
    preds = [model.predict(v, batch_size=batch_size, verbose=0) for v in views]
    return np.mean(preds, axis=0)
