"""A team's tracking server, as `make team-server` runs it: a real PostgreSQL cluster and `mlflow server
--serve-artifacts` on it, with the tiny demo's train and ensemble stages run against it from other processes,
as a teammate's shell runs them with `MLFLOW_TRACKING_URI=http://...`; then the server stopped in mid-run.

PostgreSQL is Debian's package (`make test` installs it through `make postgres` when root); the test is
skipped, saying so, only where its server programs are not there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.params import load
from pipeline.stages import augment, train
from pipeline.tools import team_server, ui
from tests.factories import ROOT, synthetic_images, tiny_params
from tests.projects import fresh_env, in_a_terminal, make_project

pytestmark = pytest.mark.slow
WARNING = "WARNING: MLflow tracking failed"


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """`make team-server` in a fresh shell in a clone, as the README says, on a free port; its folder under
    /tmp (pytest's own is private to root, and as root the cluster runs as `postgres`)."""
    try:
        team_server.find_postgres()
        team_server._run_as()
    except team_server.PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL here: {exc}")
    clone = make_project(tmp_path_factory.mktemp("team") / "fishpipe")
    folder = Path(tempfile.mkdtemp(prefix="team-"))
    folder.chmod(0o755)
    port = ui.free_port()
    make = subprocess.Popen(in_a_terminal(f"make team-server PORT={port} TEAM_DIR={folder}"), cwd=clone,
                            env=fresh_env(clone), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    servers: list[subprocess.Popen] = []
    url = ui.url_for(ui.DEFAULT_HOST, port)
    try:
        try:
            ui.wait_until_healthy(url, make, timeout=240)  # the first start creates MLflow's schema
        except (RuntimeError, TimeoutError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(make.pid, signal.SIGINT)
            pytest.fail(f"make team-server did not answer:\n{make.communicate(timeout=60)[0][-3000:]}")

        def serve() -> tuple[str, subprocess.Popen]:
            """A second server on the same database, for a test to stop."""
            free = ui.free_port()
            with open(folder / f"mlflow-{free}.log", "w") as log:
                proc = team_server.start_server(team_server.store_uri(folder / "run"), str(folder / "artifacts"),
                                                port=free, log=log, workers=1)
            servers.append(proc)
            address = ui.url_for(ui.DEFAULT_HOST, free)
            ui.wait_until_healthy(address, proc, timeout=120)
            return address, proc

        yield {"url": url, "make": make, "serve": serve, "folder": folder}
    finally:
        for proc in servers:
            ui.stop_server(proc)
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGINT)
            make.wait(60)
        shutil.rmtree(folder, ignore_errors=True)


def _project(root: Path, **overrides) -> Path:
    """The tiny demo's inputs of the train stage (manifest, images, augmented views) for one backbone."""
    # One ensemble candidate: the combiners' search is tested elsewhere, here only what reaches MLflow.
    fast = {"train.epochs": 2, "train.patience": 1, "ensemble.method": "mean", "ensemble.temperature": False,
            "ensemble.smoothing": False, "ensemble.clip": "none"}
    raw = tiny_params(root, **{**fast, **overrides})
    manifest = synthetic_images(root, raw, n_train=48, n_test=8)
    s = load(train.Settings, root / "params.yaml")
    views = augment.make_views(np.load(s.paths.images), (manifest.split == "train").to_numpy(), s.augment,
                               seed=s.seed)
    np.save(s.paths.views, views)
    return root


def _stage(root: Path, url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A stage as a teammate's shell runs it: its own process, only MLFLOW_TRACKING_URI set for MLflow."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    # This checkout's package, whichever checkout the venv's editable install points at.
    inherited |= {"MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(ROOT), **(env or {})}
    # Output to files: a pipe nobody reads while the test polls the server could fill and stall the stage.
    logs = [open(root / f"{args[0]}.{stream}", "w") for stream in ("out", "err")]  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--params", str(root / "params.yaml")],
                            cwd=root, env=inherited, stdout=logs[0], stderr=logs[1], text=True)
    for log in logs:
        log.close()  # the child has its own copies
    proc.logs = [Path(log.name) for log in logs]
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    proc.wait(timeout=timeout)
    out, err = (path.read_text() for path in proc.logs)
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}"
    return out, err


def test_train_and_ensemble_track_runs_folds_artifacts_and_the_champion_in_postgresql(team, tmp_path):
    from mlflow import MlflowClient

    root = _project(tmp_path)
    _, err = _finish(_stage(root, team["url"], "train", "--backbone", "vgg16"))
    _, err2 = _finish(_stage(root, team["url"], "ensemble"))
    assert WARNING not in err + err2

    client = MlflowClient(team["url"])
    experiment = client.get_experiment_by_name("fisheries")
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # uploaded through the server
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs["vgg16"]
    assert parent.info.status == "FINISHED" and "cv_logloss" in parent.data.metrics
    folds = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in folds) == ["vgg16-fold0", "vgg16-fold1", "vgg16-fold2"]
    assert client.get_metric_history(folds[0].info.run_id, "loss"), "per-epoch curves of a fold"
    assert {"figures", "vgg16.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # The server keeps the files in its artifacts folder, not the stage's machine.
    stored = team["folder"] / "artifacts" / experiment.experiment_id / parent.info.run_id / "artifacts"
    assert (stored / "vgg16.json").is_file()

    ensemble = runs["ensemble"]
    downloaded = client.download_artifacts(ensemble.info.run_id, "ensemble_report.json", str(tmp_path))
    written = json.loads(Path(load(train.Settings, root / "params.yaml").paths.ensemble_report).read_text())
    assert json.loads(Path(downloaded).read_text())["chosen"] == written["chosen"]
    champion = client.get_model_version_by_alias("fisheries-ensemble", "champion")
    assert champion.run_id == ensemble.info.run_id
    assert {a.path for a in client.list_artifacts(ensemble.info.run_id)} >= {"ensemble_report.json", "figures"}

    # And it is PostgreSQL that holds them.
    import psycopg

    with psycopg.connect(team_server.store_uri(team["folder"] / "run")) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM runs")}
        aliases = conn.execute("SELECT alias FROM registered_model_aliases WHERE name = 'fisheries-ensemble'")
        assert {"vgg16", "vgg16-fold0", "ensemble"} <= names
        assert "champion" in {row[0] for row in aliases}


def test_a_server_stopped_mid_run_costs_the_stage_one_warning_and_no_output(team, tmp_path):
    from mlflow import MlflowClient

    url, server = team["serve"]()
    root = _project(tmp_path, **{"tracking.experiment": "stopped-mid-run"})
    # MLflow's default retries against a dead server take minutes once; a team may shorten them so.
    stage = _stage(root, url, "train", "--backbone", "vgg16",
                   env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"})
    client = MlflowClient(url)
    deadline = time.monotonic() + 240
    while stage.poll() is None and time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("stopped-mid-run")
        if experiment and client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'"):
            break
        time.sleep(0.2)
    assert stage.poll() is None, "the stage finished before its run showed up on the server"
    ui.stop_server(server)  # the parent run is open, the folds are still to come
    out, err = _finish(stage)
    s = load(train.Settings, root / "params.yaml")
    predictions = Path(s.paths.predictions) / "vgg16"
    for name in ("oof.csv", "test_stg1.csv", "test_stg2.csv"):
        assert (predictions / name).is_file()
    assert (Path(s.paths.train_reports) / "vgg16.json").is_file()
    assert "train vgg16: CV" in out
    assert err.count(WARNING) == 1, err[-3000:]
    assert url in err  # it names the store


def test_ctrl_c_stops_the_server_and_then_its_database(team):
    """Last, as it stops the module's server: Ctrl-C in `make team-server`'s terminal."""
    make = team["make"]
    os.killpg(make.pid, signal.SIGINT)
    output = make.communicate(timeout=60)[0]
    assert f"export MLFLOW_TRACKING_URI={team['url']}" in output  # what teammates are told to type
    assert "backend store: PostgreSQL" in output
    assert not (team["folder"] / "postgres" / "postmaster.pid").exists(), "the cluster was left running"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{team['url']}/health", timeout=2)
