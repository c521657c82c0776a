"""MLflow tracking that can never cost a stage its outputs.

Stages write their DVC outputs first and then report to MLflow through this module. Every call here is
guarded: if the tracking store is unreachable or misconfigured, the problem is reported once, clearly, on
stderr and the stage carries on (and exits 0), because a lost experiment log is cheap and a lost
training run is not.

The store is `tracking.uri` from params.yaml (SQLite at the repository root by default), overridden by the
`MLFLOW_TRACKING_URI` environment variable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import keras

_disabled_reason: str | None = None


def _warn(what: str, exc: BaseException) -> None:
    global _disabled_reason
    if _disabled_reason is None:
        _disabled_reason = f"{what}: {type(exc).__name__}: {exc}"
        print(
            f"WARNING: MLflow tracking failed ({_disabled_reason}); the stage's outputs are written anyway. "
            "Check tracking.uri in params.yaml or MLFLOW_TRACKING_URI.",
            file=sys.stderr,
        )


def tracking_uri(configured: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


@contextlib.contextmanager
def start_run(
    tracking_cfg: Any,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
    experiment: str | None = None,
) -> Iterator[Any]:
    """Open an MLflow run (nested under the active one when `nested`); yields the run or None on failure."""
    run = None
    try:
        import mlflow

        if not nested:
            mlflow.set_tracking_uri(tracking_uri(tracking_cfg.uri))
            mlflow.set_experiment(experiment or tracking_cfg.experiment)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = mlflow.start_run(run_name=run_name, nested=nested, tags=dict(tags or {}))
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    except Exception as exc:  # noqa: BLE001 - tracking must never break a stage
        _warn("start_run", exc)
        run = None
    try:
        yield run
    finally:
        if run is not None:
            try:
                import mlflow

                mlflow.end_run()
            except Exception as exc:  # noqa: BLE001
                _warn("end_run", exc)


def _active() -> bool:
    try:
        import mlflow

        return mlflow.active_run() is not None
    except Exception:  # noqa: BLE001
        return False


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if not _active():
        return
    try:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
    except Exception as exc:  # noqa: BLE001
        _warn("log_metrics", exc)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    if not _active() or not Path(path).exists():
        return
    try:
        import mlflow

        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
    except Exception as exc:  # noqa: BLE001
        _warn("log_artifact", exc)


def log_dict(data: Mapping[str, Any], name: str) -> None:
    if not _active():
        return
    try:
        import mlflow

        mlflow.log_dict(dict(data), name)
    except Exception as exc:  # noqa: BLE001
        _warn("log_dict", exc)


class EpochLogger(keras.callbacks.Callback):
    """Keras callback sending every epoch's logs (loss, val_loss, ...) to the active MLflow run."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        if logs:
            log_metrics({f"{self.prefix}{k}": v for k, v in logs.items()}, step=epoch)
