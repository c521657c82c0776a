"""The MLflow UI, as `make ui` starts it, shows two finished runs side by side in a real browser.

Two runs with different params and a `cv_logloss` metric go into a temporary SQLite store; the server starts
on a free loopback port through `pipeline.ui` (the code `make ui` runs), Debian's headless Chromium opens the
runs-comparison view through Playwright, and the test asserts that both run names and the metric are on the
page. The screenshot goes to `reports/figures/mlflow_compare.png`; `docs/mlflow_compare.png`, the README's
copy, is written when missing or when `UPDATE_DOCS_SCREENSHOT=1`, so an ordinary test run leaves the
checkout clean. The server is stopped whatever happens.

Chromium comes from `make browser` (Debian's package, installed as root in CI); without it that test skips.
The same server also shows that experiments the UI creates and experiments the stages create keep their
artifacts in the same folder, readable by both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from pipeline.core import tracking
from pipeline.tools import ui

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO / "reports" / "figures" / "mlflow_compare.png"
DOCS_COPY = REPO / "docs" / "mlflow_compare.png"
# As root, without a sandbox; and no background traffic: this machine's closed network refuses it noisily.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
RUNS = {  # run name → (params, cv_logloss)
    "vgg16 @ exp-lean-bass": ({"model.backbones": "['vgg16']", "model.image_size": "96", "cv.group_by": "boat"},
                              0.912),
    "resnet50 @ exp-wide-tuna": ({"model.backbones": "['resnet50']", "model.image_size": "128",
                                  "cv.group_by": "boat"}, 1.137),
}

def _empty_store(tmp_path: Path) -> str:
    """A SQLite store with MLflow's schema and nothing of this test's in it yet."""
    session_db = Path(tracking.tracking_uri()[len("sqlite:///") :])
    if session_db.suffix == ".db":
        # Copy conftest's already-migrated store: creating the schema from scratch takes several seconds.
        MlflowClient(f"sqlite:///{session_db}").search_experiments(max_results=1)
        shutil.copy(session_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _add_runs(uri: str, artifacts: Path) -> tuple[str, list[str]]:
    """Two finished runs with different params and a cv_logloss; returns (experiment id, run ids)."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("fisheries-compare", artifact_location=str(artifacts / "fisheries"))
    run_ids = []
    now = int(time.time() * 1000)
    for name, (params, loss) in RUNS.items():
        run = client.create_run(experiment_id, run_name=name, tags={"stage": "train"})
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric("cv_logloss", loss, now, 0), Metric("cv_accuracy", 1.2 - loss, now, 0)])
        client.set_terminated(run.info.run_id, "FINISHED")
        run_ids.append(run.info.run_id)
    return experiment_id, run_ids


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory):
    """`make ui`'s server on a free loopback port, against a store holding the two runs; always stopped."""
    tmp = tmp_path_factory.mktemp("mlflow-ui")
    uri, artifacts = _empty_store(tmp), tmp / "mlartifacts"
    host, port = "127.0.0.1", ui.free_port()
    url = ui.url_for(host, port)
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        proc = ui.start_server(uri, artifacts, host, port, log=log, env={"MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        experiment_id, run_ids = _add_runs(uri, artifacts)  # while the server boots, most of the time here
        try:
            ui.wait_until_healthy(url, proc, timeout=45)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}\n--- server log ---\n{log_path.read_text()[-3000:]}")
        yield {"uri": uri, "url": url, "artifacts": artifacts, "experiment_id": experiment_id, "run_ids": run_ids}
    finally:
        ui.stop_server(proc)
    assert proc.poll() is not None, "the MLflow server outlived the tests"


@pytest.mark.slow
def test_ui_and_stages_put_artifacts_in_the_same_place(mlflow_ui, monkeypatch, tmp_path):
    """An experiment the UI creates is usable by a stage writing straight to SQLite, and vice versa."""
    server = MlflowClient(mlflow_ui["url"])
    made_by_ui = server.create_experiment(f"from-ui-{time.monotonic_ns()}")
    location = server.get_experiment(made_by_ui).artifact_location
    assert Path(location) == mlflow_ui["artifacts"] / made_by_ui  # a plain folder, not mlflow-artifacts:/
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_ui["uri"])
    tracking.reset()
    note = tmp_path / "note.txt"
    note.write_text("from a stage")
    with tracking.start_run(None, "stage", experiment=server.get_experiment(made_by_ui).name) as run:
        tracking.log_artifact(note)
    tracking.reset()
    assert [a.path for a in server.list_artifacts(run.info.run_id)] == ["note.txt"]
    local = Path(server.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back")))
    assert local.read_text() == "from a stage"


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="Debian's chromium is not installed (/usr/bin/chromium): run `make browser` as root")
@pytest.mark.slow
def test_mlflow_ui_compares_two_runs_in_chromium(mlflow_ui):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    query = urllib.parse.urlencode({"runs": json.dumps(mlflow_ui["run_ids"]),
                                    "experiments": json.dumps([mlflow_ui["experiment_id"]])})
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            # Tall enough for the plot and the params/metrics tables in one screenshot: the compare view
            # scrolls inside its own pane, so full_page alone does not capture what is below the fold.
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(f"{mlflow_ui['url']}/#/compare-runs?{query}", wait_until="domcontentloaded", timeout=20_000)
            for text in (*RUNS, "cv_logloss"):
                page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=20_000)
            body = page.inner_text("body")
            # For the README's picture only: the drawn plot, and no assistant side panel over the tables.
            with contextlib.suppress(sync_api.Error):
                page.locator("svg.main-svg").first.wait_for(state="visible", timeout=5_000)
            with contextlib.suppress(sync_api.Error):
                page.get_by_role("button", name="Close").first.click(timeout=2_000)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    for name in RUNS:
        assert name in body
    assert "cv_logloss" in body and "model.backbones" in body
    assert "0.912" in body and "1.137" in body  # the metric's values, side by side
    assert SCREENSHOT.stat().st_size > 10_000
    if not DOCS_COPY.exists() or os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copy(SCREENSHOT, DOCS_COPY)
