"""Course study cases 1 and 2: handwritten digits with the course's MLP and its CNN, on a held-out test set.

Sources (`mnist.source`): `keras`, the real MNIST (`keras.datasets.mnist`, the cached `mnist.npz` in
`$KERAS_HOME/datasets`, downloaded when missing), and `demo`, the default: scikit-learn's bundled 8×8
handwritten digits (1,797 real scans, offline), scaled up and centred in the models' input the way MNIST
centres its 20×20 digits in 28×28. Both models see the same split; the test rows never steer training.

Run: `python -m pipeline mnist`; writes `reports/mnist/metrics.json` and `confusion_matrix.png`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core import metrics, tracking
from pipeline.core.cases import case_run, confusion_figure, keras_dataset_file, report
from pipeline.core.devices import replicas, rows_for_replicas
from pipeline.core.params import Cnn, ConfigError, Mlp, Mnist, Tracking, Train, load, stage_parser
from pipeline.generators.digits import demo_digits

N_CLASSES = 10


@dataclass(frozen=True)
class Settings:
    seed: int
    mnist: Mnist
    train: Train  # train.mixed_precision: one precision setting for every pipeline
    tracking: Tracking


# ---------------------------------------------------------------------------------------------- sources


def read_mnist_npz(path, image_size: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Keras' `mnist.npz` (uint8 28×28) as (N, S, S, 1) floats in [0, 1], train and test."""
    import cv2

    def prepare(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) / 255.0
        if x.shape[1] != image_size:
            size = (image_size, image_size)
            x = np.stack([cv2.resize(img, size, interpolation=cv2.INTER_AREA) for img in x])
        return x[..., None]

    with np.load(path, allow_pickle=False) as f:
        train = prepare(f["x_train"]), f["y_train"].astype(np.int64)
        test = prepare(f["x_test"]), f["y_test"].astype(np.int64)
    return train, test


def load_source(cfg: Mnist, seed: int) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test for the configured source."""
    if cfg.source == "demo":
        from sklearn.model_selection import train_test_split

        x, y = demo_digits(cfg.image_size)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=cfg.test_fraction, stratify=y, random_state=seed
        )
    else:
        import keras

        path = keras_dataset_file(
            "mnist.npz",
            download=keras.datasets.mnist.load_data,
            how="import keras; keras.datasets.mnist.load_data()",
            fallback="set mnist.source: demo in params.yaml to use scikit-learn's bundled digits.",
        )
        (x_train, y_train), (x_test, y_test) = read_mnist_npz(path, cfg.image_size)
        if cfg.max_train:
            keep = np.random.default_rng(seed).permutation(len(x_train))[: cfg.max_train]
            x_train, y_train = x_train[keep], y_train[keep]
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


# ----------------------------------------------------------------------------------------------- models


def build_mlp(cfg: Mlp, image_size: int, n_classes: int = N_CLASSES):
    """The course's MLP: dense → batch norm → dropout, repeated, then softmax, on the flattened pixels."""
    import keras
    from keras import layers

    if len(cfg.units) != len(cfg.dropout):
        raise ConfigError(f"mnist.mlp: {len(cfg.units)} units but {len(cfg.dropout)} dropout rates")
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = layers.Flatten()(inputs)
    for i, (units, rate) in enumerate(zip(cfg.units, cfg.dropout, strict=True)):
        x = layers.Dense(units, activation="relu", name=f"dense{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.Dropout(rate, name=f"dropout{i}")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mlp")


def build_cnn(cfg: Cnn, image_size: int, n_classes: int = N_CLASSES):
    """The course's CNN: (5×5 convolution → 2×2 max pooling) × 2, then dense layers with dropout."""
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = inputs
    for i, filters in enumerate(cfg.filters):
        x = layers.Conv2D(filters, cfg.kernel_size, activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten()(x)
    for i, units in enumerate(cfg.dense_units):
        x = layers.Dense(units, activation="relu", name=f"dense{i}")(x)
        x = layers.Dropout(cfg.dropout, name=f"dropout{i}")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn")


def train_and_evaluate(model, data: dict[str, np.ndarray], cfg: Mnist, seed: int, callbacks=()) -> dict:
    """Fit on the training rows for a fixed number of epochs, then score once on the test rows."""
    import keras
    from sklearn.metrics import confusion_matrix

    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    fit = rows_for_replicas(len(data["y_train"]), cfg.batch_size, replicas(), seed)
    history = model.fit(
        data["x_train"][fit],
        data["y_train"][fit],
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        callbacks=list(callbacks),
        verbose=2,
    )
    proba = model.predict(data["x_test"], batch_size=256, verbose=0)
    return {
        "test_accuracy": metrics.accuracy(data["y_test"], proba),
        "test_log_loss": metrics.kaggle_log_loss(data["y_test"], proba),
        "train_accuracy_last_epoch": float(history.history["accuracy"][-1]),
        "confusion": confusion_matrix(data["y_test"], proba.argmax(axis=1), labels=range(N_CLASSES)),
    }


def summarise(results: dict[str, dict], data: dict[str, np.ndarray], source: str) -> tuple[dict, object]:
    """The metrics JSON (confusion matrices left out) and one confusion-matrix panel per model."""
    confusions = {f"{n} (accuracy {r['test_accuracy']:.3f})": r["confusion"] for n, r in results.items()}
    summary = {
        "source": source,
        "n_train": len(data["y_train"]),
        "n_test": len(data["y_test"]),
        **{name: {k: v for k, v in r.items() if k != "confusion"} for name, r in results.items()},
        "cnn_beats_mlp": results["cnn"]["test_accuracy"] > results["mlp"]["test_accuracy"],
    }
    labels = [str(d) for d in range(N_CLASSES)]
    return summary, confusion_figure(confusions, labels, f"MNIST ({source}), test set")


def run(s: Settings) -> dict:
    """Train both models on the configured source, report them and log one MLflow run."""
    cfg = s.mnist
    with case_run(s.seed, s.train.mixed_precision, s.tracking, f"mnist-{cfg.source}", cfg, "mnist"):
        data = load_source(cfg, s.seed)
        models = {"mlp": build_mlp(cfg.mlp, cfg.image_size), "cnn": build_cnn(cfg.cnn, cfg.image_size)}
        results = {
            name: train_and_evaluate(model, data, cfg, s.seed, [tracking.EpochLogger(prefix=f"{name}.")])
            for name, model in models.items()
        }
        summary, figure = summarise(results, data, cfg.source)
        report(summary, {"confusion_matrix.png": figure}, cfg.reports)
    return summary


def main(argv: list[str] | None = None) -> None:
    summary = run(load(Settings, stage_parser(__doc__).parse_args(argv).params))
    print(
        f"mnist ({summary['source']}) test accuracy: MLP {summary['mlp']['test_accuracy']:.4f}, "
        f"CNN {summary['cnn']['test_accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
