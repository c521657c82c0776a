"""What the course cases share: Keras' dataset cache and the reporting.

Each case finds Keras' cached dataset files with an error that says how to get them when they are missing
offline (`keras_dataset_file`), and reports the same way: a metrics JSON, a figure (confusion matrix or ROC
curves) and an MLflow run in the case's own experiment (`report`). Under a multi-worker `TF_CONFIG` only the
chief opens that run and writes into the reports folder; the other workers write theirs into a throw-away
folder, deleted when the case ends (`pipeline.core.devices.write_path`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import tracking
from pipeline.core.devices import configure_devices, device_summary, discard_scratch, write_path
from pipeline.core.files import save_figure, write_json
from pipeline.core.params import Tracking, flatten


@contextlib.contextmanager
def case_run(seed: int, mixed_precision: str, tracking_cfg: Tracking, run_name: str, params: object,
             experiment: str) -> Iterator[None]:
    """Around a case's training: the global seed, the devices' strategy scope (as the fisheries train stage
    picks it: `train.mixed_precision` is one setting for every pipeline) and the case's own MLflow run."""
    import keras

    keras.utils.set_random_seed(seed)
    logged = {"seed": seed, **flatten(params)}
    with configure_devices(mixed_precision).scope(), tracking.start_run(tracking_cfg, run_name, logged,
                                                                        experiment=experiment):
        yield
    discard_scratch()


class DatasetUnavailable(FileNotFoundError):
    """A Keras dataset file is neither cached nor downloadable."""


def keras_datasets_dir() -> Path:
    # Read the variable at call time: Keras reads it once at import, which would pin tests to ~/.keras.
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"


def keras_dataset_file(name: str, download: Callable[[], Any], how: str, fallback: str) -> Path:
    """`$KERAS_HOME/datasets/<name>`, asking Keras to download it (`download()`) when it is not cached.

    The caller then reads the file itself rather than through `load_data`, which fixes `$KERAS_HOME` once at
    import and re-downloads (so fails offline) any copy whose hash differs from the published one.
    """
    path = keras_datasets_dir() / name
    if path.exists():
        return path
    try:
        download()
        reason = "Keras saved it elsewhere: is the folder writable?"
    except Exception as exc:  # noqa: BLE001 - offline failures come in many types
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
    if path.exists():
        return path
    raise DatasetUnavailable(
        f"{name} is not in {path.parent} and could not be downloaded ({reason}).\n"
        f"  missing file: {path}\n"
        f"  fix: on a machine with internet run\n"
        f'    python -c "{how}"\n'
        f"  and copy ~/.keras/datasets/{name} into {path.parent}/ (set $KERAS_HOME to use another folder),\n"
        f"  or {fallback}"
    )


# ------------------------------------------------------------------------------------------- reporting


def binary_scores(y_true: np.ndarray, score: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    return {
        "test_accuracy": float(np.mean((np.asarray(score) >= 0.5).astype(int) == y_true)),
        "test_roc_auc": float(roc_auc_score(y_true, score)),
    }


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> Any:
    """ROC curves of several scorers on the same test labels: {name: (y_true, score)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y_true, score) in curves.items():
        fpr, tpr, _ = roc_curve(y_true, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y_true, score):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    # Limits a little past [0, 1] so that a perfect curve, which runs along the axes, stays visible.
    lim = (-0.01, 1.01)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=lim, ylim=lim)
    ax.legend(loc="lower right")
    return fig


def confusion_figure(matrices: Mapping[str, np.ndarray], labels: Sequence[str], title: str) -> Any:
    """One panel per model, true classes down, predicted across, counts written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(5 * len(matrices), 4.6), squeeze=False)
    for ax, (name, cm) in zip(axes[0], matrices.items(), strict=True):
        ax.imshow(cm, cmap="Blues")
        for (i, j), count in np.ndenumerate(cm):
            ax.text(
                j,
                i,
                int(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > cm.max() / 2 else "black",
            )
        ticks = range(len(labels))
        ax.set(
            xticks=ticks,
            yticks=ticks,
            xticklabels=labels,
            yticklabels=labels,
            xlabel="predicted",
            ylabel="true",
            title=name,
        )
    fig.suptitle(title)
    return fig


def report(metrics: dict[str, Any], figures: Mapping[str, Any], reports_dir: str | Path) -> list[Path]:
    """Write `metrics.json` (with what the run trained on: GPUs, precision, replicas) and each figure into
    `reports_dir` (a throw-away copy of it on a worker other than the chief), then attach them to the active
    MLflow run. Call it inside `case_run`."""
    reports_dir = write_path(reports_dir)
    metrics["devices"] = device_summary()
    write_json(reports_dir / "metrics.json", dict(metrics))
    written = [reports_dir / "metrics.json"]
    for name, fig in figures.items():
        save_figure(fig, reports_dir / name)
        written.append(reports_dir / name)
    tracking.log_metrics({k: v for k, v in flatten(dict(metrics)).items() if _is_number(v)})
    for path in written:
        tracking.log_artifact(path)
    return written


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
