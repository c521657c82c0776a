"""Benchmark: an epoch of the head as `fit_head` trains it against Keras' plain loop, on the same features.

`fit_head` runs each epoch in one compiled call on one device and scores its validation rows with a compiled
call of the model; the plain loop is what Keras does by default: one call a batch, and `predict` for the
validation log loss at every epoch's end. Both train the same head on the same rows for the same epochs (no
early stopping, so both run them all) and give the same numbers (tests/test_models.py checks it); the figure is
their time per epoch, the best of a few alternating runs in this process. The features are the size of one
train-stage fold of the demo: ~1,240 rows (frames and their augmented views) of 512 VGG16 features, ~90
validation rows.

Since `fit_head` keeps one compiled model per shape and resets it before each fit, only its first run traces
Keras' training function; the plain loop builds a new model per run, as a stage once did for each of its 15
fits, and traces it each time. Both arms' times per epoch include that: it is part of what a fit costs.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from pipeline.core import params as config
from pipeline.core.heads import ValidationLogLoss, build_head, fit_head
from pipeline.core.metrics import kaggle_log_loss


class _PredictLoss(ValidationLogLoss):
    """The plain loop's validation: Keras' `predict` every epoch."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs["val_loss"] = kaggle_log_loss(self.y, self.model.predict(self.x, batch_size=self.batch_size, verbose=0))


def _plain(x, y, xv, yv, head_cfg, train_cfg, epochs: int) -> None:
    keras.utils.set_random_seed(0)
    head = build_head(x.shape[1], 8, head_cfg.units, head_cfg.dropout_in, head_cfg.dropout_out)
    head.compile(optimizer=keras.optimizers.Adam(train_cfg.learning_rate), loss="categorical_crossentropy",
                 metrics=["accuracy"])
    head.fit(x, keras.utils.to_categorical(y, 8), epochs=epochs, batch_size=train_cfg.batch_size, shuffle=True,
             callbacks=[_PredictLoss(xv, yv, 1024)], verbose=0)


def run(quick: bool = False) -> list[dict]:
    raw = config.read_params()
    head_cfg = config.from_dict(config.Head, raw["model"]["head"], "model.head")
    train_cfg = config.from_dict(config.HeadTraining, {k: raw["train"][k] for k in
                                 ("epochs", "batch_size", "learning_rate", "patience", "label_smoothing")}, "train")
    epochs, repeats = (5, 2) if quick else (20, 3)
    # patience past the last epoch: early stopping never ends a run, so both arms train every epoch.
    train_cfg = config.HeadTraining(epochs, train_cfg.batch_size, train_cfg.learning_rate, epochs + 1,
                                    train_cfg.label_smoothing)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1240, 512)).astype("float32"), rng.integers(0, 8, 1240)
    xv, yv = rng.normal(size=(90, 512)).astype("float32"), rng.integers(0, 8, 90)
    arms = {"ours": lambda: fit_head(x, y, xv, yv, 8, head_cfg, train_cfg, seed=0),
            "plain": lambda: _plain(x, y, xv, yv, head_cfg, train_cfg, epochs)}
    best = dict.fromkeys(arms, float("inf"))
    for fn in arms.values():
        fn()  # untimed: the first run of each arm
    for _ in range(repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) / epochs)
    note = f"1,240 x 512 features, batch {train_cfg.batch_size}, {epochs} epochs, best of {repeats}"
    return [
        {"key": "head_epoch_speedup", "value": round(best["plain"] / best["ours"], 2), "target": ">= 1.2",
         "unit": "x", "note": note + "; plain: a call a batch, predict for validation"},
        {"key": "head_epoch_ms", "value": round(1000 * best["ours"], 1), "target": None, "unit": "ms",
         "note": note},
    ]
