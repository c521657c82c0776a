"""Two machines train one model: the README's "Training on several machines", run on 127.0.0.1.

Each "machine" is its own folder with its own copy of the same inputs (as two checkouts are), and runs its
README block in bash with the block's addresses replaced by two free local ports; a third folder runs the
same command without `TF_CONFIG`, as one process. First both workers are killed after their first fold;
then the README's blocks resume them. The two workers must skip the fold they finished, give that
process's out-of-fold predictions, open exactly one MLflow run (with its fold runs), and the second worker
must leave nothing in its folder's outputs, nor its throw-away folder behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.competition import FISH_CLASSES
from pipeline.stages import train
from tests.factories import ROOT, free_ports, train_inputs

README = ROOT / "README.md"
SECTION = "### Training on several machines"
#: The machines' addresses in the README's TF_CONFIG (documentation addresses, RFC 5737).
ADDRESSES = ("192.0.2.10:2222", "192.0.2.11:2222")
#: Dropout masks are drawn per replica, so with dropout two workers train a different (equally good) head
#: than one process; without it they must agree draw for draw.
SETTINGS = {"model.head.dropout_in": 0.0, "model.head.dropout_out": 0.0, "cv.n_folds": 2, "train.epochs": 2,
            # Two steps an epoch, each split over the two workers, at a rate at which the head learns something.
            "train.batch_size": 16, "train.learning_rate": 0.05, "train.extract_batch_size": 128}
#: On any OOF probability. Measured here: 3.4e-4 between two workers and one process (the all-reduce adds
#: float32 gradients in another order, and Adam's normalised steps magnify that on near-zero gradients: with
#: SGD the two agree to 6e-8), against 0.26 with dropout on, whose masks differ per replica.
TOLERANCE = 2e-3
TIMEOUT = 240  # seconds: a deadlocked collective op fails the test instead of hanging it
#: The stage, killed when its second fold starts, as a user's Ctrl-C or a lost machine would.
KILLED = textwrap.dedent("""
    from pipeline.stages import train
    real = train.run_fold
    def run_fold(k, *args, **kwargs):
        if k == 1:
            raise KeyboardInterrupt("killed after fold 0")
        return real(k, *args, **kwargs)
    train.run_fold = run_fold
    train.main(["--backbone", "vgg16"])
""")


def machine_blocks() -> list[str]:
    """The README's commands for each machine: the section's bash blocks that set TF_CONFIG, in order."""
    section = README.read_text().split(SECTION, 1)[1]
    section = re.split(r"^#{2,3} ", section, maxsplit=1, flags=re.M)[0]
    blocks = [b for b in re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S) if "TF_CONFIG" in b]
    assert len(blocks) == 2 and all(a in b for a in ADDRESSES for b in blocks), "README: one block per machine"
    return blocks


def run_together(folders: list[Path], scripts: list[str], envs: list[dict[str, str]], killed: tuple[bool, ...] = ()
                 ) -> list[str]:
    """Run each folder's bash script, all at once; wait for all (killing all after TIMEOUT); their logs.
    Each must succeed, or where `killed` says so, stop on the KeyboardInterrupt planted by `KILLED`."""
    procs, logs = [], []
    for folder, script, env in zip(folders, scripts, envs, strict=True):
        if not (folder / ".venv").exists():
            (folder / ".venv").symlink_to(ROOT / ".venv")  # a checkout made as the README's first step says
        log = open(folder / "run.log", "w")  # noqa: SIM115 - closed below, after the process ends
        logs.append(log)
        procs.append(subprocess.Popen(["bash", "-c", "set -e\n" + script], cwd=folder, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    outputs = [(f / "run.log").read_text() for f in folders]
    for folder, p, out, kill in zip(folders, procs, outputs, killed or (False,) * len(procs), strict=True):
        ok = p.returncode != 0 and "killed after fold 0" in out if kill else p.returncode == 0
        assert ok, f"{folder.name} ended with {p.returncode} (timeout {TIMEOUT}s?):\n{out[-4000:]}"
    return outputs


@pytest.mark.slow
def test_two_workers_resume_train_as_one_process_and_only_the_chief_writes(tmp_path):
    blocks = machine_blocks()
    ports = free_ports(2)
    for address, port in zip(ADDRESSES, ports, strict=True):
        blocks = [b.replace(address, f"127.0.0.1:{port}") for b in blocks]
    folders = [tmp_path / "machine0", tmp_path / "machine1", tmp_path / "single"]
    settings = [train_inputs(f, **SETTINGS)[0] for f in folders]
    one_process = "\n".join(line for line in blocks[0].splitlines() if "TF_CONFIG" not in line)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri,
           # Three processes share this machine's cores: one thread each keeps them from fighting over them.
           "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    env_single = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/single.db"}
    env_single.pop("TF_CONFIG", None)
    env_killed = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/killed.db"}
    command = ".venv/bin/python -m pipeline train --backbone vgg16"
    killed = [b.replace(command, f".venv/bin/python -c '{KILLED}'") for b in blocks]
    assert all(command in b for b in blocks) and all(command not in b for b in killed)
    # The one process runs beside the killed attempt: it needs no cluster, and the cores are shared either way.
    run_together(folders, [*killed, one_process], [env_killed, env_killed, env_single], killed=(True, True, False))
    chief_log, worker_log = run_together(folders[:2], blocks, [env, env])
    assert all("fold 0: resumed" in log and "fold 1: val log loss" in log for log in (chief_log, worker_log))

    got, expected = (pd.read_csv(Path(x.paths.predictions) / "vgg16" / "oof.csv") for x in (settings[0], settings[2]))
    assert got["id"].tolist() == expected["id"].tolist()
    np.testing.assert_allclose(got[list(FISH_CLASSES)], expected[list(FISH_CLASSES)], atol=TOLERANCE)
    report, alone = (json.loads((Path(x.paths.train_reports) / "vgg16.json").read_text()) for x in settings[::2])
    assert report["cv_logloss"] == pytest.approx(alone["cv_logloss"], abs=TOLERANCE)
    assert report["devices"]["strategy"] == "MultiWorkerMirroredStrategy" and report["devices"]["workers"] == 2
    assert "MultiWorkerMirroredStrategy x2" in chief_log

    # The second machine wrote nothing of its own outputs, and removed its throw-away folder at the end.
    paths = settings[1].paths
    for key in train.WRITES:
        assert not any(Path(getattr(paths, key)).rglob("*vgg16*")), f"worker 1 wrote into paths.{key}"
    scratch = re.search(r"this worker writes under (\S+)", worker_log).group(1)
    assert not Path(scratch).exists()

    # One run per attempt, opened by the chief, with the fold runs of the folds that attempt started (the killed
    # attempt's second fold run was open when the kill came).
    assert runs_in(f"sqlite:///{tmp_path}/killed.db", settings[0]) == ("KILLED", ["vgg16-fold0", "vgg16-fold1"])
    assert runs_in(uri, settings[0]) == ("FINISHED", ["vgg16-fold1"])


def runs_in(uri: str, s: train.Settings) -> tuple[str, list[str]]:
    """The status of the store's only top-level run, and the names of its children."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(s.tracking.experiment).experiment_id])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in top] == ["vgg16"], "exactly one run, opened by the chief"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == top[0].info.run_id]
    assert len(runs) == 1 + len(children)
    return top[0].info.status, sorted(r.info.run_name for r in children)
