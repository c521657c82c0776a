"""The classification head and its training loop, shared by the fisheries train stage and the course cases.

The head is pooled features → batch norm → dropout → dense → batch norm → ReLU → dropout → float32 softmax.
`fit_head` trains it on cached embeddings with early stopping on the competition's own metric, computed by
`ValidationLogLoss` (Keras' evaluation step fails under several replicas on an uneven last batch). Nothing
here reads params.yaml or touches the file system.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from pipeline.core.devices import rows_for_replicas
from pipeline.core.metrics import accuracy, kaggle_log_loss
from pipeline.core.params import Head, HeadTraining, Train


def build_head(n_features: int, n_classes: int, units: int, dropout_in: float, dropout_out: float) -> keras.Model:
    """Pooled features → batch norm → dropout → dense → batch norm → dropout → softmax."""
    inputs = keras.Input((n_features,), name="features")
    # Synchronised: under several replicas each one would otherwise normalise by its own slice of the batch, so
    # two GPUs (or two machines) would train a different head than one device does, and under
    # MultiWorkerMirroredStrategy each worker would keep different moving statistics. On one device it is
    # the same layer. Only TensorFlow has it (bench.gpu builds this head under JAX, on one device).
    sync = keras.backend.backend() == "tensorflow"
    x = layers.BatchNormalization(synchronized=sync, name="head_bn_in")(inputs)
    x = layers.Dropout(dropout_in, name="head_dropout_in")(x)
    x = layers.Dense(units, use_bias=False, name="head_dense")(x)
    x = layers.BatchNormalization(synchronized=sync, name="head_bn")(x)
    x = layers.Activation("relu", name="head_relu")(x)
    x = layers.Dropout(dropout_out, name="head_dropout_out")(x)
    # float32 softmax even under mixed precision: float16 probabilities underflow the log loss.
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="head")


def balanced_class_weight(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """Weights inversely proportional to class frequency (sklearn's 'balanced'), absent classes weight 1."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 1.0)
    return {k: float(w) for k, w in enumerate(weights)}


def as_class_columns(proba: np.ndarray) -> np.ndarray:
    """Probabilities with one column per class; a sigmoid's single column becomes (1 - p, p)."""
    proba = np.asarray(proba, dtype=np.float64)
    return np.hstack([1.0 - proba, proba]) if proba.shape[1] == 1 else proba


#: Each model's compiled inference call, for `ValidationLogLoss`.
_INFERENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ValidationLogLoss(keras.callbacks.Callback):
    """Write `val_loss` (the competition's log loss) and `val_accuracy` into every epoch's logs.

    The validation rows are scored by a compiled call of the model itself, batch by batch, on one device (each
    worker its own under `MultiWorkerMirroredStrategy`), not through `fit(validation_data=...)`: Keras'
    evaluation step fails under `MirroredStrategy` whenever the last validation batch does not split evenly over
    the replicas (Keras 3.15 on TensorFlow 2.21: "Inputs to operation AddN ... must have the same size and
    shape"). Nor through `predict`, whose set-up cost about 60 ms an epoch, more than a head's epoch of
    training; the numbers are the same.
    Put it first among the callbacks, so early stopping and loggers see the numbers it adds.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, np.asarray(y), batch_size

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        call = _INFERENCE.get(self.model)
        if call is None:  # one trace per model, however many fits it trains (`_Trainer`)
            call = _INFERENCE[self.model] = tf.function(lambda batch, model=self.model: model(batch, training=False),
                                                        reduce_retracing=True)
        proba = as_class_columns(np.concatenate([np.asarray(call(self.x[i : i + self.batch_size]))
                                                 for i in range(0, len(self.x), self.batch_size)]))
        if logs is not None:
            logs["val_loss"] = kaggle_log_loss(self.y, proba)
            logs["val_accuracy"] = accuracy(self.y, proba)


def _compile(head: keras.Model, train_cfg: Train | HeadTraining, per_call: int) -> None:
    head.compile(
        optimizer=keras.optimizers.Adam(train_cfg.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=per_call,
    )


class _Trainer:
    """A compiled head kept for every fit of the same shape and settings, and the state it starts each from.

    A train stage fits 15 heads (the folds, their unpeeked reruns, the leak check's other folds), and a new model
    costs a new trace of Keras' training function, about 1.4 s on two cores, as long as the head's 15 epochs.
    So on one device every fit of the same shape trains one compiled model, reset first to exactly what a new
    one would start from: the fresh head's variables (its random seeds' state too) and the optimizer's variables
    as they were before its first step. tests/test_models.py checks a fit on a reused model against a fit on a
    new one, bit for bit.
    """

    def __init__(self, head: keras.Model, train_cfg: Train | HeadTraining, per_call: int) -> None:
        _compile(head, train_cfg, per_call)
        head.optimizer.build(head.trainable_variables)
        self.head = head
        self.start = [np.array(v.numpy()) for v in head.optimizer.variables]

    def reset(self, fresh: keras.Model) -> keras.Model:
        for mine, theirs in zip(self.head.variables, fresh.variables, strict=True):
            mine.assign(theirs.value)
        for variable, value in zip(self.head.optimizer.variables, self.start, strict=True):
            variable.assign(value)
        return self.head


_TRAINERS: dict[tuple, _Trainer] = {}


def fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    n_classes: int,
    head_cfg: Head,
    train_cfg: Train | HeadTraining,
    seed: int,
    class_weight: dict[int, float] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    strategy: tf.distribute.Strategy | None = None,
    verbose: int = 0,
    fixed_epochs: int | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train the dropout + batch-norm head on features; early stopping on validation log loss.

    The best epoch's weights are restored, so the returned head is the one whose validation log loss was
    lowest. With `fixed_epochs` it trains exactly that many epochs and never looks at `x_val`/`y_val` (which
    may be None): for scoring without selection bias.
    """
    strategy = strategy or tf.distribute.get_strategy()
    one_device = strategy.num_replicas_in_sync == 1
    # On one device, one call of the compiled step per epoch: these heads train in ~1 ms a batch, and Keras' own
    # work around each call cost several times that (an epoch of 20 batches: 184 -> 122 ms with the validation
    # call; the same numbers). Under several replicas Keras 3.15's multi-step loop fails on the distributed
    # iterator, so there it stays one batch a call, and every fit gets a new model.
    per_call = max(1, -(-len(x_train) // train_cfg.batch_size)) if one_device else 1
    shape = (x_train.shape[1], n_classes, head_cfg.units, head_cfg.dropout_in, head_cfg.dropout_out)
    policy = keras.mixed_precision.global_policy().name
    key = (*shape, train_cfg.learning_rate, train_cfg.label_smoothing, per_call, policy)
    if one_device and key not in _TRAINERS:  # built before the seed is set: the fit's own draws start from it
        _TRAINERS[key] = _Trainer(build_head(*shape), train_cfg, per_call)
    keras.utils.set_random_seed(seed)
    keep = rows_for_replicas(len(x_train), train_cfg.batch_size, strategy.num_replicas_in_sync, seed)
    if len(keep) < len(x_train):
        x_train, y_train = x_train[keep], y_train[keep]
    with strategy.scope():
        fresh = build_head(*shape)
        if one_device:
            head = _TRAINERS[key].reset(fresh)
        else:
            head = fresh
            _compile(head, train_cfg, per_call)
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
    if head is not fresh:  # the caller's own head, as trained: the kept one trains the next fit
        _compile(fresh, train_cfg, per_call)
        fresh.optimizer.build(fresh.trainable_variables)
        pairs = [*zip(fresh.variables, head.variables, strict=True),
                 *zip(fresh.optimizer.variables, head.optimizer.variables, strict=True)]
        for mine, trained in pairs:  # its optimizer's state too: a saved head reloads as it was saved
            mine.assign(trained.value)
    return fresh, {k: [float(v) for v in vals] for k, vals in history.history.items()}


