"""MLflow tracking: where the store lives, what every run carries, that a dead store costs a stage nothing,
and that the registry's alias follows the best model.

Runs go to the session's throw-away SQLite store (conftest); tests that need the default store layout copy
that already-migrated database into a temporary "repository", because creating a fresh schema takes seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.core import params as config
from pipeline.core import tracking

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_tracking_state():
    """Every test starts with tracking on and no open run, whatever the previous one did."""
    tracking.reset()
    while mlflow.active_run() is not None:
        mlflow.end_run()
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking.reset()


def _experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _session_db() -> Path:
    """The conftest store's SQLite file, created (schema migrated) if no test used it yet."""
    uri = tracking.tracking_uri()
    assert uri.startswith("sqlite:///"), "conftest points MLFLOW_TRACKING_URI at a SQLite file"
    MlflowClient(uri).search_experiments(max_results=1)
    return Path(uri[len("sqlite:///") :])


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A checkout with params.yaml and a migrated mlflow.db at its root, and no tracking override."""
    shutil.copy(_session_db(), tmp_path / "mlflow.db")
    (tmp_path / "params.yaml").write_text("tracking:\n  uri: sqlite:///mlflow.db\n")
    (tmp_path / "sub" / "dir").mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return tmp_path


# ------------------------------------------------------------------------------------------ the store


def test_relative_sqlite_uri_is_resolved_at_the_repo_root_from_any_cwd(fake_repo, monkeypatch):
    monkeypatch.chdir(fake_repo / "sub" / "dir")
    assert tracking.repo_root() == fake_repo
    assert tracking.tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{fake_repo}/mlflow.db"
    assert tracking.tracking_uri(None) == f"sqlite:///{fake_repo}/mlflow.db"  # the default
    assert tracking.tracking_uri("sqlite:////abs/store.db") == "sqlite:////abs/store.db"
    assert tracking.artifact_root() == fake_repo / "mlartifacts"


def test_dvc_temp_executor_tracks_into_the_parent_repo(fake_repo, monkeypatch):
    # `dvc exp run --temp` runs stages in a copy under .dvc/tmp/exps/; its store would be thrown away.
    executor = fake_repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    executor.mkdir(parents=True)
    (executor / "params.yaml").write_text("")
    monkeypatch.chdir(executor)
    assert tracking.repo_root() == fake_repo
    monkeypatch.setenv("DVC_ROOT", str(fake_repo))  # what DVC itself sets for queued/temp experiments
    assert tracking.repo_root() == fake_repo


def test_environment_uri_wins_and_is_used_as_given(fake_repo, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow@db.example/mlflow")
    assert tracking.tracking_uri("sqlite:///mlflow.db") == "postgresql://mlflow@db.example/mlflow"


def test_default_store_and_artifacts_land_at_the_repo_root(fake_repo, monkeypatch):
    monkeypatch.chdir(fake_repo / "sub" / "dir")
    name = _experiment()
    (fake_repo / "sub" / "dir" / "note.txt").write_text("hello")
    with tracking.start_run(None, "run", experiment=name) as run:
        tracking.log_artifact("note.txt")
    assert run is not None
    experiment = MlflowClient(f"sqlite:///{fake_repo}/mlflow.db").get_experiment_by_name(name)
    assert experiment.artifact_location == str(fake_repo / "mlartifacts" / name)
    assert (fake_repo / "mlartifacts" / name / run.info.run_id / "artifacts" / "note.txt").read_text() == "hello"
    assert not (fake_repo / "sub" / "dir" / "mlruns").exists()
    assert not (fake_repo / "sub" / "dir" / "mlflow.db").exists()


# ------------------------------------------------------------------------------------------------ runs


def test_runs_nest_per_fold_with_flat_params_and_git_and_dvc_tags(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-bass")
    monkeypatch.setenv("DVC_STAGE", "train@vgg16")
    name = _experiment()
    cfg = config.Tracking(uri="sqlite:///ignored.db", experiment=name, registered_model="m")
    params = {"model": {"backbones": ("vgg16",), "head": {"units": 256}}, "seed": 42}
    with tracking.start_run(cfg, "vgg16", params=params) as parent:
        for k in range(2):
            with tracking.start_run(cfg, f"vgg16-fold{k}", nested=True, params={"fold": k}):
                logger = tracking.EpochLogger(prefix="head_")
                for epoch, loss in enumerate((1.5, 1.2, 1.1)):
                    logger.on_epoch_end(epoch, {"loss": loss})
                tracking.log_metrics({"fold_logloss": 1.0 + k})
        tracking.log_metrics({"cv_logloss": 1.05})
        assert tracking.active_run_id() == parent.info.run_id

    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    top = runs["vgg16 @ brisk-bass"]  # the DVC experiment name is in the run name, for reading the UI
    assert top.info.status == "FINISHED"
    assert top.data.params == {"model.backbones": "['vgg16']", "model.head.units": "256", "seed": "42"}
    commit = top.data.tags["git.commit"]
    assert len(commit) == 40 and top.data.tags["mlflow.source.git.commit"] == commit
    # This checkout's HEAD or, when a colleague committed meanwhile, one of its ancestors.
    assert subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO).returncode == 0
    assert top.data.tags["git.dirty"] in ("true", "false")
    assert top.data.tags["dvc_exp_name"] == "brisk-bass"
    assert top.data.tags["stage"] == "train@vgg16"
    assert top.data.tags["pipeline"] == name
    assert top.data.metrics["cv_logloss"] == pytest.approx(1.05)
    for k in range(2):
        fold = runs[f"vgg16-fold{k}"]
        assert fold.data.tags["mlflow.parentRunId"] == top.info.run_id
        assert fold.data.tags["dvc_exp_name"] == "brisk-bass"
        assert fold.data.params == {"fold": str(k)}
        history = client.get_metric_history(fold.info.run_id, "head_loss")
        assert [(m.step, m.value) for m in history] == [(0, 1.5), (1, 1.2), (2, 1.1)]


def test_each_pipeline_has_its_own_experiment():
    first, second = _experiment(), _experiment()
    with tracking.start_run(None, "a", experiment=first) as a:
        pass
    with tracking.start_run(None, "b", experiment=second) as b:
        pass
    assert a.info.experiment_id != b.info.experiment_id
    assert MlflowClient().get_experiment(b.info.experiment_id).name == second


def test_a_failing_stage_marks_its_run_failed_and_the_error_goes_on():
    with pytest.raises(ZeroDivisionError), tracking.start_run(None, "boom", experiment=_experiment()) as run:
        1 / 0  # noqa: B018
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
    assert tracking.disabled_reason() is None  # the stage's own error is not a tracking failure


def test_reopening_a_run_adds_to_it():
    with tracking.start_run(None, "ensemble", experiment=_experiment()) as run:
        pass
    with tracking.start_run(None, "unused", run_id=run.info.run_id):
        tracking.log_metrics({"stg1_logloss": 0.9})
    assert MlflowClient().get_run(run.info.run_id).data.metrics["stg1_logloss"] == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------- failures


def test_unreachable_server_is_reported_once_quickly_and_costs_the_stage_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    output = tmp_path / "predictions.csv"
    started = time.monotonic()
    output.write_text("id,p\na,1\n")  # DVC outputs first, as every stage does
    with tracking.start_run(None, "vgg16", params={"seed": 1}, experiment="fisheries") as run:
        with tracking.start_run(None, "fold0", nested=True) as fold:
            tracking.log_metrics({"loss": 1.0}, step=0)
        tracking.log_artifact(output)
        tracking.log_dict({"a": 1}, "a.json")
        tracking.set_tags({"x": 1})
        result = tracking.register_best("0" * 32, "model", "fisheries-ensemble", "oof_logloss")
    elapsed = time.monotonic() - started
    assert run is None and fold is None and result is None
    assert elapsed < 10, f"a dead tracking server cost the stage {elapsed:.1f} s"
    assert output.read_text() == "id,p\na,1\n"
    assert "127.0.0.1:9" in tracking.disabled_reason()
    err = capsys.readouterr().err
    assert err.count("WARNING: MLflow tracking failed") == 1
    assert "outputs are written anyway" in err


def test_a_failure_mid_run_switches_tracking_off_but_still_closes_the_run(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    with tracking.start_run(None, "run", experiment=_experiment()) as run:
        monkeypatch.setattr(mlflow, "log_metrics", broken)
        tracking.log_metrics({"a": 1.0})
        tracking.log_metrics({"b": 2.0})  # no second warning, no second attempt
        monkeypatch.undo()
        tracking.log_metrics({"c": 3.0})  # tracking stays off for the rest of the process
    assert capsys.readouterr().err.count("WARNING: MLflow tracking failed") == 1
    finished = MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert "c" not in finished.data.metrics


# ---------------------------------------------------------------------------------------------- registry


MODEL_SCRIPT = """\
import mlflow


class Constant(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True

    def predict(self, context, model_input, params=None):
        return [0.5] * len(model_input)


mlflow.models.set_model(Constant())
"""


def test_register_best_points_the_alias_at_the_lowest_loss(tmp_path):
    script = tmp_path / "constant_model.py"
    script.write_text(MODEL_SCRIPT)
    name, experiment = f"model-{uuid.uuid4().hex[:8]}", _experiment()
    results = []
    for loss in (0.9, 0.7, 0.8):
        with tracking.start_run(None, f"ensemble-{loss}", experiment=experiment) as run:
            tracking.log_metrics({"oof_logloss": loss})
            mlflow.pyfunc.log_model(name="model", python_model=str(script), pip_requirements=["mlflow"])
        results.append(tracking.register_best(run.info.run_id, "model", name, "oof_logloss"))
    assert [r["version"] for r in results] == ["1", "2", "3"]
    assert [r["alias_version"] for r in results] == ["1", "2", "2"]  # 0.8 does not displace 0.7
    client = MlflowClient()
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "2"
    assert float(champion.tags["oof_logloss"]) == pytest.approx(0.7)
    assert client.get_run(champion.run_id).data.metrics["oof_logloss"] == pytest.approx(0.7)


def _register(script, name, experiment, loss, pool):
    with tracking.start_run(None, f"ensemble-{loss}", experiment=experiment, tags={tracking.POOL_TAG: pool}) as run:
        tracking.log_metrics({"cv_logloss": loss})
        mlflow.pyfunc.log_model(name="model", python_model=str(script), pip_requirements=["mlflow"])
    return tracking.register_best(run.info.run_id, "model", name, "cv_logloss", pool=pool)


def test_comparison_pool_separates_fold_schemes_on_the_same_images():
    ids, sha1s, labels = [f"img_{i}.jpg" for i in range(12)], [f"{i:040x}" for i in range(12)], ["ALB", "BET"] * 6
    grouped = tracking.comparison_pool(ids, sha1s, labels, [i // 4 for i in range(12)], "boat")
    leaky = tracking.comparison_pool(ids, sha1s, labels, [i % 3 for i in range(12)], "none")
    shuffled = tracking.comparison_pool(ids[::-1], sha1s[::-1], labels[::-1], [i // 4 for i in range(12)][::-1])
    relabelled = tracking.comparison_pool(ids, sha1s, labels[::-1], [i // 4 for i in range(12)])
    assert grouped["data"] == leaky["data"] and grouped["folds"] != leaky["folds"]
    assert grouped["key"] == shuffled["key"]  # row order is not part of it
    assert relabelled["data"] != grouped["data"]
    assert grouped["key"] == f"{grouped['data']}-{grouped['folds']}" and grouped["n_folds"] == 3


def test_a_leaky_run_cannot_take_the_champion_from_an_honest_one(tmp_path):
    """The README's `cv.group_by=none` experiment scores far better out of fold (0.57 against 0.89 on the
    demo) because its folds share bursts; it must not crown itself over the grouped runs on the same images."""
    script = tmp_path / "constant_model.py"
    script.write_text(MODEL_SCRIPT)
    name, experiment = f"model-{uuid.uuid4().hex[:8]}", _experiment()
    images = tracking.comparison_pool(["a", "b", "c", "d"], "wxyz", ["ALB", "BET", "ALB", "YFT"], [0, 0, 1, 1])
    honest = images["key"]
    leaky = tracking.comparison_pool(["a", "b", "c", "d"], "wxyz", ["ALB", "BET", "ALB", "YFT"], [0, 1, 0, 1])["key"]
    other_data = tracking.comparison_pool(["e", "f"], "uv", ["ALB", "NoF"], [0, 1])["key"]
    client = MlflowClient()

    first = _register(script, name, experiment, 0.89, honest)
    assert first["alias_version"] == "1" and first["pool"] == honest
    leak = _register(script, name, experiment, 0.57, leaky)
    assert leak["alias_version"] == "1", "the leaky run took the champion"
    assert leak["pool_alias"] == f"champion-{leaky}" and leak["pool_version"] == "2"
    assert str(client.get_model_version_by_alias(name, f"champion-{leaky}").version) == "2"
    better = _register(script, name, experiment, 0.85, honest)
    assert better["alias_version"] == "3"  # the same pool with a better score does take it
    worse = _register(script, name, experiment, 0.95, honest)
    assert worse["alias_version"] == "3" and worse["metric"] == pytest.approx(0.85)
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "3" and champion.tags[tracking.POOL_TAG] == honest
    assert client.get_run(champion.run_id).data.tags[tracking.POOL_TAG] == honest
    # New images (the Kaggle download after the demo): scores cannot be ranked across data sets, the newer
    # data take the alias, even with a worse-looking number.
    moved = _register(script, name, experiment, 1.2, other_data)
    assert moved["alias_version"] == "5"
