"""MNIST case: both sources' loaders (the real one on a fake cached file), the models, and the stage."""

import json

import keras
import numpy as np
import pytest

from pipeline.core.cases import DatasetUnavailable
from pipeline.core.params import ConfigError, Mlp, Mnist, from_dict, load
from pipeline.generators.digits import demo_digits
from pipeline.stages import mnist
from tests.factories import ROOT, repo_params, section, write_params

N_DIGITS = 1797  # scikit-learn's bundled digits


def _cfg(**overrides) -> Mnist:
    return section(Mnist, "mnist", **overrides)


def _fake_mnist_npz(folder, n_train=30, n_test=10):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.uint8) % 10,
    }
    np.savez(folder / "mnist.npz", **arrays)
    return arrays


@pytest.fixture
def offline(monkeypatch):
    """Keras' downloader fails as it does offline; records calls, which a cached file must not make."""
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3] offline")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", no_network)
    return calls


def test_params_section_validates_and_rejects_unknown_keys():
    s = load(mnist.Settings, ROOT / "params.yaml")
    assert s.mnist.source == "demo" and isinstance(s.seed, int)
    raw = repo_params()["mnist"]
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(Mnist, {**raw, "epoch": 3}, "mnist")
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(Mnist, {**raw, "source": "kaggle"}, "mnist")


def test_demo_digits_are_centred_like_mnist_and_scaled_to_unit_range():
    x, y = demo_digits(28)
    assert x.shape == (N_DIGITS, 28, 28, 1) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
    assert set(np.unique(y)) == set(range(10))
    # MNIST keeps a 4-pixel empty frame around its 20x20 digits; the demo does too.
    assert x[:, :4].max() == 0 and x[:, -4:].max() == 0 and x[:, :, :4].max() == 0


def test_demo_split_is_stratified_disjoint_and_repeatable():
    cfg = _cfg(test_fraction=0.25)
    a, b = mnist.load_source(cfg, seed=1), mnist.load_source(cfg, seed=1)
    np.testing.assert_array_equal(a["y_test"], b["y_test"])
    assert len(a["y_test"]) == pytest.approx(0.25 * N_DIGITS, abs=1)
    shares = np.bincount(a["y_test"], minlength=10) / len(a["y_test"])
    assert shares.min() > 0.08 and shares.max() < 0.12
    flat_train = {row.tobytes() for row in a["x_train"]}
    assert sum(row.tobytes() in flat_train for row in a["x_test"]) < 5  # the bundled set has a few duplicates
    assert not np.array_equal(mnist.load_source(cfg, seed=2)["y_test"], a["y_test"])


def test_keras_source_reads_the_cached_file_in_keras_home(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    arrays = _fake_mnist_npz(tmp_path / "kh" / "datasets")
    data = mnist.load_source(_cfg(source="keras", max_train=0), seed=0)
    assert data["x_train"].shape == (30, 28, 28, 1) and data["x_test"].shape == (10, 28, 28, 1)
    np.testing.assert_allclose(data["x_test"][..., 0], arrays["x_test"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(data["y_train"], arrays["y_train"])
    assert offline == []  # a cached file never triggers a download
    capped = mnist.load_source(_cfg(source="keras", max_train=12, image_size=32), seed=0)
    assert capped["x_train"].shape == (12, 32, 32, 1) and len(capped["y_test"]) == 10


def test_missing_mnist_npz_offline_names_the_file_the_folder_and_the_fix(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    with pytest.raises(DatasetUnavailable) as err:
        mnist.load_source(_cfg(source="keras"), seed=0)
    message = str(err.value)
    assert "mnist.npz" in message and str(tmp_path / "empty" / "datasets") in message
    assert "keras.datasets.mnist.load_data()" in message and "mnist.source: demo" in message
    assert "URL fetch failure" in message and len(offline) == 1


@pytest.mark.parametrize("builder", ["mlp", "cnn"])
def test_models_follow_the_course_and_take_a_finite_training_step(builder):
    cfg = _cfg()
    model = mnist.build_mlp(cfg.mlp, 28) if builder == "mlp" else mnist.build_cnn(cfg.cnn, 28)
    kinds = [type(layer).__name__ for layer in model.layers]
    if builder == "mlp":
        assert kinds.count("BatchNormalization") == kinds.count("Dropout") == len(cfg.mlp.units)
    else:
        convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
        assert [c.kernel_size for c in convs] == [(5, 5), (5, 5)] and kinds.count("MaxPooling2D") == 2
        assert kinds.count("Dropout") == len(cfg.cnn.dense_units)
    assert model.output_shape == (None, 10)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    loss = model.train_on_batch(x, np.arange(8) % 10)
    assert np.isfinite(loss)
    np.testing.assert_allclose(model.predict(x, verbose=0).sum(axis=1), 1.0, atol=1e-5)


def test_mlp_with_mismatched_dropout_rates_fails_loudly():
    with pytest.raises(ConfigError, match="dropout"):
        mnist.build_mlp(Mlp(units=(32, 16), dropout=(0.1,)), 28)


def test_stage_writes_metrics_and_confusion_matrix(tmp_path):
    path = write_params(tmp_path, {"mnist.epochs": 3, "mnist.reports": str(tmp_path / "reports" / "mnist"),
                                   "mnist.test_fraction": 0.5, "mnist.mlp": {"units": [16], "dropout": [0.1]},
                                   "mnist.cnn.filters": [4, 4], "mnist.cnn.dense_units": [16]})
    s = load(mnist.Settings, path)
    summary = mnist.run(s)
    saved = json.loads((tmp_path / "reports" / "mnist" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["n_test"] + saved["n_train"] == N_DIGITS
    assert saved["n_test"] == pytest.approx(s.mnist.test_fraction * N_DIGITS, abs=1)
    for name in ("mlp", "cnn"):
        # Three epochs of tiny models on half the digits: well above chance (0.1), far from done (0.55-0.7).
        assert saved[name]["test_accuracy"] > 0.3 and np.isfinite(saved[name]["test_log_loss"])
    assert (tmp_path / "reports" / "mnist" / "confusion_matrix.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_cnn_beats_the_mlp_on_the_demo_digits(tmp_path):
    """The course's point: convolutions see strokes, a flat MLP sees pixels (the stage writes the flag)."""
    path = write_params(tmp_path, {"mnist.epochs": 6, "mnist.reports": str(tmp_path / "mnist")})
    summary = mnist.run(load(mnist.Settings, path))
    assert summary["cnn_beats_mlp"], summary
    assert summary["cnn"]["test_accuracy"] > summary["mlp"]["test_accuracy"] > 0.85
