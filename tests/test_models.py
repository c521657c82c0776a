"""Backbone registry and head: every backbone builds offline at a small size with the right output shape."""

import keras
import numpy as np
import pytest

from pipeline.core import backbones as models
from pipeline.core.heads import build_head


@pytest.mark.parametrize("name", sorted(models.BACKBONES))
def test_every_backbone_builds_with_random_weights(name):
    bb = models.get_backbone(name)
    size = max(bb.min_size, 32)
    extractor = models.build_extractor(name, size, weights="none")
    feats = extractor.predict(np.random.default_rng(0).integers(0, 255, (2, size, size, 3)).astype("uint8"), verbose=0)
    assert feats.shape[0] == 2 and feats.shape[1] == extractor.output_shape[-1] > 0
    assert np.isfinite(feats).all()
    assert not any(w.trainable for w in extractor.weights), "the backbone must be frozen"


def test_a_bfloat16_extractor_computes_in_bfloat16_and_gives_float32_features_close_to_float32s():
    """`extract_precision`'s bfloat16: the same weights (same seed), bfloat16 convolutions, float32 features within
    a few per cent of float32's, and Keras' global policy as it was."""
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype("uint8")
    keras.utils.set_random_seed(3)
    plain = models.build_extractor("vgg16", 32, "none")
    keras.utils.set_random_seed(3)
    half = models.build_extractor("vgg16", 32, "none", precision="mixed_bfloat16")
    assert keras.mixed_precision.global_policy().name == "float32"
    convs = [layer for layer in half.get_layer("vgg16").layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs)
    for a, b in zip(plain.weights, half.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    f32, bf16 = np.asarray(plain(x)), np.asarray(half(x))
    assert bf16.dtype == np.float32 and not np.array_equal(f32, bf16)
    assert np.abs(bf16 - f32).max() <= 0.05 * np.abs(f32).max()


@pytest.mark.parametrize(("setting", "backbone", "gpus", "native", "policy", "expected"), [
    ("auto", "vgg16", 0, True, "float32", "mixed_bfloat16"),     # a CPU with native bfloat16: the fast path
    ("auto", "resnet50", 0, True, "float32", "mixed_bfloat16"),
    ("auto", "xception", 0, True, "float32", "mixed_bfloat16"),
    ("auto", "convnext_tiny", 0, True, "float32", None),         # no fast bfloat16 kernels for it: float32
    ("auto", "vgg16", 0, False, "float32", None),                # emulated bfloat16 is slow: float32
    ("auto", "vgg16", 1, True, "mixed_float16", None),           # a GPU: mixed_precision's float16 decides
    ("auto", "vgg16", 1, True, "float32", None),                 # a GPU with mixed_precision off: float32
    ("auto", "vgg16", 0, True, "mixed_float16", None),           # mixed_precision: on, asked for explicitly
    ("bfloat16", "xception", 1, False, "float32", "mixed_bfloat16"),  # asked for: everywhere
    ("float32", "vgg16", 0, True, "float32", "float32"),
])
def test_extraction_precision_is_bfloat16_only_where_it_pays_or_is_asked_for(setting, backbone, gpus, native,
                                                                            policy, expected):
    assert models.extraction_precision(setting, backbone, gpus, native, policy) == expected


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(ValueError, match="valid backbones are .*resnet50.*vgg16"):
        models.get_backbone("vgg17")


def test_too_small_input_is_refused():
    with pytest.raises(ValueError, match="at least 71 px"):
        models.validate_model_settings(["xception"], 64, "none")


def test_missing_imagenet_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    bb = models.get_backbone("vgg16")

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(models.Backbone, "build", lambda self, **kw: offline(**kw))
    with pytest.raises(models.WeightsUnavailable) as err:
        models._resolve_weights(bb, "imagenet")
    message = str(err.value)
    assert bb.weights_file in message and str(tmp_path / "models") in message and "weights: none" in message


def test_head_outputs_probabilities_and_has_dropout_and_batchnorm():
    head = build_head(16, 8, units=8, dropout_in=0.2, dropout_out=0.5)
    kinds = {type(layer).__name__ for layer in head.layers}
    assert {"BatchNormalization", "Dropout", "Dense"} <= kinds
    out = head.predict(np.random.default_rng(0).normal(size=(5, 16)), verbose=0)
    np.testing.assert_allclose(out.sum(1), 1, atol=1e-5)


def test_fit_head_trains_the_head_keras_plain_loop_would():
    """`fit_head` runs each epoch in one compiled call and scores validation without `predict`, for speed only:
    the epochs kept, the validation log losses and the head's predictions must be those of Keras' plain loop
    (a step a call, `predict` for validation, the same early stopping)."""
    import tensorflow as tf

    from pipeline.core.heads import ValidationLogLoss, fit_head
    from pipeline.core.metrics import kaggle_log_loss
    from pipeline.core.params import Head, HeadTraining

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 24)).astype("float32"), rng.integers(0, 4, 300)
    xv, yv = rng.normal(size=(40, 24)).astype("float32"), rng.integers(0, 4, 40)
    x[np.arange(300), y] += 1.5  # something to learn, so that early stopping has an epoch to choose
    xv[np.arange(40), yv] += 1.5
    cfg = HeadTraining(epochs=30, batch_size=32, learning_rate=0.01, patience=3, label_smoothing=0.0)
    head_cfg = Head(units=16, dropout_in=0.1, dropout_out=0.3)
    tf.config.experimental.enable_op_determinism()
    # A fit of other rows first: the compiled model it leaves behind must start the next fit as a new one would.
    fit_head(x[::-1], y[::-1], xv, yv, 4, head_cfg, cfg, seed=7)
    head, history = fit_head(x, y, xv, yv, 4, head_cfg, cfg, seed=0)

    class PlainLoss(ValidationLogLoss):  # the plain loop's scoring: Keras' predict
        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = kaggle_log_loss(self.y, self.model.predict(self.x, verbose=0))

    keras.utils.set_random_seed(0)
    plain = build_head(24, 4, 16, 0.1, 0.3)
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.CategoricalCrossentropy(),
                  metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True, mode="min")
    ref = plain.fit(x, keras.utils.to_categorical(y, 4), epochs=30, batch_size=32, shuffle=True,
                    callbacks=[PlainLoss(xv, yv, 1024), stop], verbose=0)
    assert 3 < len(history["val_loss"]) < 30  # it stopped early, on an epoch it chose
    np.testing.assert_allclose(history["val_loss"], ref.history["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(head.predict(xv, verbose=0), plain.predict(xv, verbose=0), atol=1e-6)


def test_a_fit_on_the_kept_model_trains_the_head_a_first_fit_trains_and_returned_heads_stay_put():
    """`fit_head` keeps one compiled model per shape and resets it before each fit (speed only): a fit after
    others must end where the same fit on a clean slate ends, bit for bit, and a head already returned must not
    move when the kept model trains again."""
    import tensorflow as tf

    from pipeline.core import heads
    from pipeline.core.heads import fit_head
    from pipeline.core.params import Head, HeadTraining

    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(200, 12)).astype("float32"), rng.integers(0, 3, 200)
    xv, yv = rng.normal(size=(30, 12)).astype("float32"), rng.integers(0, 3, 30)
    x[np.arange(200), y] += 1.0
    cfg = HeadTraining(epochs=12, batch_size=32, learning_rate=0.01, patience=3, label_smoothing=0.0)
    head_cfg = Head(units=8, dropout_in=0.2, dropout_out=0.4)
    heads._TRAINERS.clear()
    first, first_history = fit_head(x, y, xv, yv, 3, head_cfg, cfg, seed=1)
    kept = [w.copy() for w in first.get_weights()]
    # The head comes back as trained, its optimizer's state too (a saved head reloads without a mismatch).
    assert int(first.optimizer.iterations) == len(first_history["loss"]) * -(-200 // 32)
    fit_head(x[::-1] * 2, y, xv, yv, 3, head_cfg, cfg, seed=2)  # the kept model moves on: weights, optimizer
    fit_head(x, y, None, None, 3, head_cfg, cfg, seed=3, fixed_epochs=5)
    again, again_history = fit_head(x, y, xv, yv, 3, head_cfg, cfg, seed=1)
    assert len(heads._TRAINERS) == 1  # every fit trained the one compiled model
    assert again_history == first_history
    for a, b, c in zip(first.get_weights(), again.get_weights(), kept, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)  # the first head did not move while the others trained


def test_classifier_saves_and_reloads_with_its_preprocessing(tmp_path):
    extractor = models.build_extractor("vgg16", 32, weights="none")
    clf = models.build_classifier(extractor, build_head(512, 8, 8, 0.1, 0.1))
    x = np.random.default_rng(1).integers(0, 255, (2, 32, 32, 3)).astype("float32")
    path = tmp_path / "clf.keras"
    clf.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_allclose(clf.predict(x, verbose=0), again.predict(x, verbose=0), atol=1e-5)


def test_unfreeze_top_trains_only_the_top_blocks_and_keeps_batchnorm_frozen():
    extractor = models.build_extractor("resnet50", 32, weights="none")
    unfrozen = models.unfreeze_top(extractor, "resnet50", 1)
    assert unfrozen and all(name.startswith("conv5") for name in unfrozen)
    assert not any("_bn" in name for name in unfrozen)
