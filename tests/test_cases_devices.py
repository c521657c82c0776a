"""The course cases use several GPUs as the fisheries stage does: two virtual CPUs stand in for two GPUs.

One fresh interpreter runs all three stages, because devices can only be split before TensorFlow starts.
Data sizes are odd on purpose, so that the last batches do not split evenly over the two replicas.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from tests.factories import ROOT

SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pipeline import training
    from pipeline.cases import catsdogs, imdb, mnist
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # one per process, as configure_devices keeps
    training.configure_devices = lambda policy: mirrored
    seen = []
    real_replicas = training.replicas
    training.replicas = lambda: seen.append(real_replicas()) or seen[-1]
    out = {name: stage.main(sys.argv[1]) for name, stage in
           (("mnist", mnist), ("imdb", imdb), ("catsdogs", catsdogs))}
    out["replicas_seen"] = seen
    print("RESULT", json.dumps(out, default=float))
""")


def test_course_cases_train_under_a_multi_device_strategy(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["mnist"].update(epochs=1, batch_size=32, reports=str(tmp_path / "mnist"), test_fraction=0.5)
    raw["mnist"]["mlp"] = {"units": [16], "dropout": [0.1]}
    raw["mnist"]["cnn"].update(filters=[4, 4], dense_units=[8])
    raw["imdb"].update(demo_reviews=301, epochs=2, batch_size=32, rnn_units=8, reports=str(tmp_path / "imdb"))
    raw["catsdogs"].update(demo_images=61, image_size=32, embeddings=str(tmp_path / "cd" / "emb.npz"),
                           reports=str(tmp_path / "catsdogs"))
    raw["catsdogs"]["train"].update(epochs=2, batch_size=8)
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "params.yaml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT")).split(" ", 1)[1])
    assert out["replicas_seen"] and set(out["replicas_seen"]) == {2}  # both MNIST models and the LSTM
    assert all(np.isfinite(out["mnist"][m]["test_log_loss"]) for m in ("mlp", "cnn"))
    assert np.isfinite(out["imdb"]["model"]["test_roc_auc"]) and 0 <= out["imdb"]["model"]["test_accuracy"] <= 1
    assert np.isfinite(out["catsdogs"]["best_val_loss"])


def test_a_batch_size_the_replicas_cannot_share_is_refused_with_the_fix():
    from pipeline.training import rows_for_replicas

    assert len(rows_for_replicas(101, 32, 2, seed=0)) == 100  # the last batch of 5 loses one row
    np.testing.assert_array_equal(rows_for_replicas(101, 32, 1, seed=0), np.arange(101))
    with pytest.raises(ValueError, match="multiple of the number of GPUs"):
        rows_for_replicas(100, 33, 2, seed=0)
