"""MLflow tracking that can never cost a stage its outputs.

Stages write their DVC outputs first and then report to MLflow through this module. Every call here is
guarded: if the tracking store is unreachable or misconfigured, the problem is reported once, clearly, on
stderr, tracking is switched off for the rest of the process (so a dead server costs one timeout, not one per
epoch) and the stage carries on and exits 0, because a lost experiment log is cheap and a lost training run
is not.

Layout: one MLflow experiment per pipeline (`fisheries`, `mnist`, `catsdogs`, `imdb`), a run per backbone or
stage, nested runs per fold. Every run is tagged with the git commit (and whether the tree was dirty), the
DVC stage and, under `dvc exp run`, the DVC experiment name, which also goes into the run name so the two
ways of comparing runs (`dvc exp show` and the MLflow UI) can be matched by eye.

The store is `tracking.uri` from params.yaml. A relative SQLite URI (the default `sqlite:///mlflow.db`) is
resolved against the repository root, not the working directory, so every stage, `make ui` and a
`dvc exp run --temp` executor all read and write the same database; new experiments keep their artifacts
under `<repo>/mlartifacts/`. `MLFLOW_TRACKING_URI` overrides the whole thing and is used as given (an
`http://` tracking server, or a PostgreSQL URI for a team).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.core.devices import task
from pipeline.core.params import Tracking

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACT_DIR = "mlartifacts"  # same name as `mlflow server`'s default artifact folder
_SQLITE = "sqlite:///"
# MLflow's own limits (mlflow.utils.validation); longer values would make the whole batch fail.
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000

#: Tag of the ensemble stage's run: the SHA-1 of the report file it wrote. A later stage that reads that file
#: finds the run by it (`find_run`), so no DVC output has to carry a run id.
REPORT_TAG = "ensemble_report_sha1"

_disabled_reason: str | None = None
_store_uri: str | None = None  # the store this process last pointed MLflow at, for the failure message
_checked_servers: dict[str, str | None] = {}


# ------------------------------------------------------------------------------------------ failures


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; raised internally and turned into one warning."""


def report_failure(what: str, exc: BaseException) -> None:
    """Report the first failure and switch tracking off; later failures are consequences of the first."""
    global _disabled_reason
    if _disabled_reason is None:
        _disabled_reason = f"{what}: {type(exc).__name__}: {exc}"
        print(
            f"WARNING: MLflow tracking failed ({_disabled_reason}).\n"
            "  The stage's outputs are written anyway; nothing more is sent to MLflow from this process.\n"
            f"  Store: {_describe_store()}. Check tracking.uri in params.yaml or MLFLOW_TRACKING_URI.",
            file=sys.stderr,
        )


def disabled_reason() -> str | None:
    """Why tracking is off in this process (the first failure), or None while it works."""
    return _disabled_reason


def reset() -> None:
    """Forget an earlier failure (tests, or a long-lived process whose store came back)."""
    global _disabled_reason
    _disabled_reason = None
    _checked_servers.clear()


def _describe_store() -> str:
    uri = _store_uri
    if uri is None:
        with contextlib.suppress(Exception):
            uri = tracking_uri()
    # A database URI may carry a password; warnings end up in CI logs.
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", uri) if uri else "unknown"


# ------------------------------------------------------------------------------------- store location


def repo_root() -> Path:
    """The project checkout that owns the tracking store.

    `DVC_ROOT` first: DVC sets it for every stage, and for `dvc exp run --temp` / queued experiments it names
    the parent repository rather than the throw-away copy under `.dvc/tmp/exps/`, whose store would be lost.
    Then the nearest folder above the working directory holding params.yaml or .git, then this package's
    checkout.
    """
    env_root = os.environ.get("DVC_ROOT")
    if env_root and Path(env_root).is_dir():
        return _outside_dvc_tmp(Path(env_root).resolve())
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() or (folder / ".git").exists():
            return _outside_dvc_tmp(folder)
    return Path(__file__).resolve().parent.parent


def _outside_dvc_tmp(folder: Path) -> Path:
    parts = folder.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return folder


def tracking_uri(configured: str | None = None, root: Path | None = None) -> str:
    """The store to use: `MLFLOW_TRACKING_URI` as given, else `configured` with a relative SQLite path
    resolved against the repository root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    uri = configured or DEFAULT_URI
    if uri.startswith(_SQLITE) and not uri.startswith(_SQLITE + "/") and ":memory:" not in uri:
        return _SQLITE + str((root or repo_root()) / uri[len(_SQLITE) :])
    return uri


def artifact_root(root: Path | None = None) -> Path:
    """Where experiments created against a database store keep their artifacts (`make ui` uses it too)."""
    return (root or repo_root()) / ARTIFACT_DIR


def _is_server(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https")


def _is_database(uri: str) -> bool:
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    return scheme in ("sqlite", "postgresql", "mysql", "mssql")


def _check_server(uri: str) -> None:
    """One short request before MLflow's own client, whose default retries take minutes on a dead server.

    Any HTTP answer (even 401/404) proves the server is there; only a refused or timed-out connection
    counts as unreachable.
    """
    if uri not in _checked_servers:
        timeout = min(float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 5), 5.0)
        error = None
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass
        except urllib.error.URLError as exc:
            # A TLS complaint means the server answered: MLflow's client has its own certificate settings.
            if not isinstance(exc.reason, ssl.SSLError):
                error = f"{uri} is unreachable ({exc.reason})"
        except (OSError, ValueError) as exc:
            error = f"{uri} is unreachable ({exc})"
        _checked_servers[uri] = error
    if _checked_servers[uri]:
        raise TrackingUnavailable(_checked_servers[uri])


def _cfg_value(cfg: Tracking | None, key: str) -> str | None:
    return None if cfg is None else getattr(cfg, key)


def configure(tracking_cfg: Tracking | None = None) -> str:
    """Point MLflow at the project's store (raises on an unreachable server); returns the URI."""
    import mlflow

    global _store_uri
    uri = _store_uri = tracking_uri(_cfg_value(tracking_cfg, "uri"))
    if _is_server(uri):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _experiment_folder(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def _use_experiment(name: str, uri: str) -> None:
    """Select (creating when needed) the experiment; on a database store its artifacts go under
    `<repo>/mlartifacts/<name>`, next to the folders `make ui`'s server gives the experiments it creates,
    so stages and the UI read each other's artifacts whatever the working directory was."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if _is_database(uri) and mlflow.get_experiment_by_name(name) is None:
        location = artifact_root() / _experiment_folder(name)
        with contextlib.suppress(MlflowException):  # created meanwhile by a concurrent stage
            mlflow.create_experiment(name, artifact_location=str(location))
    mlflow.set_experiment(name)


# ---------------------------------------------------------------------------------------------- tags


def git_info(root: Path | None = None) -> dict[str, str]:
    """Commit and dirtiness of the checkout this code was imported from; empty outside git.

    The package's own folder, not the working directory: under `dvc exp run --temp` the code runs from the
    executor's copy, whose HEAD is the experiment's baseline commit, and a test may run from a temp folder.
    """
    cwd = str(root or Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        out = subprocess.run(("git", *args), cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    # mlflow.source.git.commit is the tag the MLflow UI shows on the run page.
    return {"git.commit": commit, "mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower()}


def run_tags(stage: str | None = None, experiment: str | None = None) -> dict[str, str]:
    """Tags every run carries: code version, DVC stage and DVC experiment name (when run by DVC)."""
    tags = git_info()
    stage = stage or os.environ.get("DVC_STAGE")
    if stage:
        tags["stage"] = stage
    if experiment:
        tags["pipeline"] = experiment
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def flat_params(params: Any) -> dict[str, str]:
    """Nested mappings/dataclasses → dotted keys with string values within MLflow's length limit."""
    from pipeline.core.params import flatten

    if dataclasses.is_dataclass(params) or isinstance(params, Mapping):
        params = flatten(params)
    return {str(k): str(v)[:_MAX_PARAM_VALUE] for k, v in dict(params).items()}


# ---------------------------------------------------------------------------------------------- runs


@contextlib.contextmanager
def start_run(
    tracking_cfg: Tracking | None,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
    experiment: str | None = None,
    stage: str | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """Open an MLflow run; yields the `mlflow.ActiveRun`, or None when tracking is off or fails.

    `tracking_cfg` is params.yaml's `tracking` section (or None for the defaults); `experiment` overrides its
    experiment (the course pipelines pass theirs). With `nested=True` inside an open run, the new run is its
    child (one per fold). `params` may be nested: they are flattened to dotted keys. With `run_id`, an earlier
    run is reopened instead (a later stage adding its files to the ensemble run); `run_name` is then unused.
    The run ends FAILED when the body raises, and the exception goes on. Only the chief of a multi-worker
    cluster (`TF_CONFIG`) opens runs: the other workers train the same model, and their runs would be copies.
    """
    run = None
    if _disabled_reason is None and task().chief:
        try:
            run = _open_run(tracking_cfg, run_name, nested, tags, experiment, stage, run_id)
            if params:
                import mlflow

                mlflow.log_params(flat_params(params))
        except Exception as exc:  # noqa: BLE001 - tracking must never break a stage
            report_failure("start_run", exc)
            if run is not None:
                _end_run(run, "FAILED")
            run = None
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if run is not None:
            _end_run(run, status)


def _open_run(tracking_cfg, run_name, nested, tags, experiment, stage, run_id) -> Any:
    import mlflow

    if run_id is not None:
        configure(tracking_cfg)
        return mlflow.start_run(run_id=run_id)
    parent = mlflow.active_run() if nested else None
    if parent is not None:  # a fold's run lives in its parent's experiment
        experiment = parent.data.tags.get("pipeline", experiment)
    experiment = experiment or _cfg_value(tracking_cfg, "experiment") or "Default"
    if parent is None:
        _use_experiment(experiment, configure(tracking_cfg))
    all_tags = {**run_tags(stage, experiment), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent is None and all_tags.get("dvc_exp_name"):
        run_name = f"{run_name} @ {all_tags['dvc_exp_name']}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlflow.start_run(
            run_name=run_name,
            nested=parent is not None,
            tags={k: v[:_MAX_TAG_VALUE] for k, v in all_tags.items()},
        )


def _end_run(run: Any, status: str) -> None:
    # Closes the run even after a failure switched tracking off, so it is not left RUNNING forever.
    try:
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.info.run_id:
            mlflow.end_run(status=status)
    except Exception as exc:  # noqa: BLE001
        report_failure("end_run", exc)


def _active() -> bool:
    if _disabled_reason is not None:
        return False
    try:
        import mlflow

        return mlflow.active_run() is not None
    except Exception:  # noqa: BLE001
        return False


def active_run_id() -> str | None:
    """The id of the open run (for reports that point back at MLflow), or None."""
    if not _active():
        return None
    import mlflow

    return mlflow.active_run().info.run_id


def log_params(params: Mapping[str, Any]) -> None:
    """Log (possibly nested) params on the open run."""
    if not _active():
        return
    try:
        import mlflow

        mlflow.log_params(flat_params(params))
    except Exception as exc:  # noqa: BLE001
        report_failure("log_params", exc)


def set_tags(tags: Mapping[str, Any]) -> None:
    if not _active():
        return
    try:
        import mlflow

        mlflow.set_tags({k: str(v)[:_MAX_TAG_VALUE] for k, v in tags.items()})
    except Exception as exc:  # noqa: BLE001
        report_failure("set_tags", exc)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if not _active():
        return
    try:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
    except Exception as exc:  # noqa: BLE001
        report_failure("log_metrics", exc)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file, or every file of a folder; a missing path is skipped silently (an optional figure)."""
    if not _active() or not Path(path).exists():
        return
    try:
        import mlflow

        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
    except Exception as exc:  # noqa: BLE001
        report_failure("log_artifact", exc)


def log_dict(data: Mapping[str, Any], name: str) -> None:
    if not _active():
        return
    try:
        import mlflow

        mlflow.log_dict(dict(data), name)
    except Exception as exc:  # noqa: BLE001
        report_failure("log_dict", exc)


def find_run(tracking_cfg: Tracking | None, tag: str, value: str) -> str | None:
    """The newest finished run of the configured experiment whose tag `tag` is `value`; None when there is
    none, or when tracking is off or fails (reported once, like every other tracking failure)."""
    if _disabled_reason is not None:
        return None
    try:
        import mlflow

        configure(tracking_cfg)
        experiment = mlflow.get_experiment_by_name(_cfg_value(tracking_cfg, "experiment") or "Default")
        if experiment is None:
            return None
        runs = mlflow.search_runs(
            [experiment.experiment_id], filter_string=f"tags.{tag} = '{value}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
        )
        return runs[0].info.run_id if runs else None
    except Exception as exc:  # noqa: BLE001
        report_failure("find_run", exc)
        return None


# -------------------------------------------------------------------------------------------- registry

#: The tag naming the comparison pool of an ensemble run and of its model version (`comparison_pool`).
POOL_TAG = "pool"


def comparison_pool(ids, sha1s, labels, folds, group_by: str | None = None) -> dict[str, Any]:
    """Which runs' cross-validation scores can be compared: the same training images with the same labels
    (by content, not only name) split into the same folds.

    The key is `<data>-<folds>`, two 16-hex digests: of the training rows (id, file SHA-1, label) and of the
    fold each row was scored in. The folds are read from the OOF predictions themselves, so every way of
    making them (`cv.group_by`, `cv.n_folds`, the seed, a hand-made split) is covered; a random split and a
    grouped one on the same images share the data digest and differ in the folds digest. The image size, the
    models and the ensemble settings are not in it: they are what the runs of a pool compete on.
    """
    rows = sorted(zip(map(str, ids), map(str, sha1s), map(str, labels), map(int, folds), strict=True))
    data = hashlib.sha1("".join(f"{i},{h},{lab}\n" for i, h, lab, _ in rows).encode()).hexdigest()[:16]
    split = hashlib.sha1("".join(f"{i},{f}\n" for i, _, _, f in rows).encode()).hexdigest()[:16]
    pool = {"key": f"{data}-{split}", "data": data, "folds": split, "n_train": len(rows),
            "n_folds": len({r[3] for r in rows})}
    if group_by is not None:
        pool["group_by"] = group_by
    return pool


def _pool_alias(alias: str, pool: str) -> str:
    return f"{alias}-{pool}"  # hex and a hyphen: a valid alias name


def register_best(
    run_id: str,
    artifact_path: str,
    model_name: str,
    metric_key: str,
    alias: str = "champion",
    tracking_cfg: Tracking | None = None,
    pool: str | None = None,
) -> dict[str, Any] | None:
    """Register `runs:/<run_id>/<artifact_path>` as a new version of `model_name` and point `alias` at the
    version with the lowest `metric_key` (a loss: lower is better) among the versions it can be compared with.

    The new version carries the run's metric as a tag, so the choice is visible in the registry. Versions
    without the metric are never chosen. With `pool` (`comparison_pool(...)["key"]`), the version is tagged
    with it and only versions of the same pool compete: the best of them always gets the pool's own alias
    `<alias>-<pool>`, and `alias` itself moves to it unless `alias` holds a version trained on the same
    images but scored on other folds (a leaky random split must not crown itself over a grouped one by a
    score that is not comparable). Where `alias` holds a version on other images, or from before pools, the
    newer data take it: scores on different data sets cannot be ranked, and the newest is the one in use.
    Returns `{"version", "alias", "alias_version", "metric", "pool", "pool_alias", "pool_version"}` (the
    versions as strings), or None when tracking is off or fails.
    """
    if _disabled_reason is not None:
        return None
    try:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if mlflow.active_run() is None:
            configure(tracking_cfg)
        client = MlflowClient()
        value = client.get_run(run_id).data.metrics.get(metric_key)
        version_tags = {metric_key: repr(value)} if value is not None else {}
        if pool is not None:
            version_tags[POOL_TAG] = pool
        # MLflow 3 resolves runs:/<run>/<name> to the run's logged model of that name and warns that it did so.
        with warnings.catch_warnings(), _quiet_logger("mlflow.tracking._model_registry.fluent"):
            warnings.simplefilter("ignore")
            new = mlflow.register_model(f"runs:/{run_id}/{artifact_path}", model_name, tags=version_tags)

        def score(version: Any) -> float | None:
            if metric_key in version.tags:
                with contextlib.suppress(ValueError):
                    return float(version.tags[metric_key])
            with contextlib.suppress(Exception):  # the run may be deleted
                return client.get_run(version.run_id).data.metrics.get(metric_key)
            return None

        quoted = model_name.replace("'", "\\'")
        versions = client.search_model_versions(f"name='{quoted}'")
        rivals = [v for v in versions if pool is None or v.tags.get(POOL_TAG) == pool]
        scored = [(s, int(v.version)) for v in rivals if (s := score(v)) is not None]
        result = {"version": str(new.version), "alias": alias, "alias_version": None, "metric": None,
                  "pool": pool, "pool_alias": None, "pool_version": None}
        if not scored:
            return result
        # Lowest loss wins; on a tie the newer version, which is the newer code.
        best_score, best_version = min(scored, key=lambda sv: (sv[0], -sv[1]))
        result["metric"] = best_score
        take = True
        if pool is not None:
            result["pool_alias"] = _pool_alias(alias, pool)
            result["pool_version"] = str(best_version)
            client.set_registered_model_alias(model_name, result["pool_alias"], str(best_version))
            holder = None
            with contextlib.suppress(MlflowException):  # no version holds the alias yet
                holder = client.get_model_version_by_alias(model_name, alias)
            held = None if holder is None else holder.tags.get(POOL_TAG)
            # Same images (the data digest before the hyphen), other folds: not comparable, the holder stays.
            take = held is None or held == pool or held.split("-")[0] != pool.split("-")[0]
            if not take:
                result["alias_version"] = str(holder.version)
        if take:
            client.set_registered_model_alias(model_name, alias, str(best_version))
            result["alias_version"] = str(best_version)
        return result
    except Exception as exc:  # noqa: BLE001
        report_failure("register_best", exc)
        return None


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------------------------- keras


def _make_epoch_logger() -> type:
    import keras

    class EpochLogger(keras.callbacks.Callback):
        """Keras callback sending every epoch's logs (loss, val_loss, ...) to the active MLflow run."""

        def __init__(self, prefix: str = "") -> None:
            super().__init__()
            self.prefix = prefix

        def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
            if logs:
                log_metrics({f"{self.prefix}{k}": v for k, v in logs.items()}, step=epoch)

    EpochLogger.__module__ = __name__
    return EpochLogger


_lazy: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    # EpochLogger subclasses a Keras callback; building it on first use keeps `import pipeline.tracking`
    # (and so `make ui`) free of the few seconds TensorFlow takes to import.
    if name == "EpochLogger":
        if name not in _lazy:
            _lazy[name] = _make_epoch_logger()
        return _lazy[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
