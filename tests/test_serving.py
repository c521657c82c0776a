"""The pyfunc ensemble model: logged small, registered, loaded back, and predicting from raw images exactly
what the pipeline's own pieces predict.

Built on tiny generated outputs shaped like the train and ensemble stages' (a 32 px VGG16 with random
weights, two fold heads), so the whole round trip runs in seconds on a CPU.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import cv2
import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.core import ensembling as E
from pipeline.core import serving, tracking
from pipeline.core.backbones import build_classifier, build_extractor
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.decode import decode_file, fit_square
from pipeline.core.heads import build_head

SIZE, SEED, FOLDS = 32, 7, 2


@pytest.fixture(autouse=True)
def _fresh_tracking_state():
    tracking.reset()
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking.reset()


@pytest.fixture(scope="module")
def predictions(tmp_path_factory) -> Path:
    """`<predictions>/vgg16/{extractor.json, models/head_fold<k>.keras}` as the train stage leaves them."""
    root = tmp_path_factory.mktemp("predictions")
    folder = root / "vgg16"
    (folder / "models").mkdir(parents=True)
    ext = {"backbone": "vgg16", "image_size": SIZE, "weights": "none", "pooling": "avg", "seed": SEED}
    (folder / "extractor.json").write_text(json.dumps(ext))
    for k in range(FOLDS):
        keras.utils.set_random_seed(100 + k)
        head = build_head(512, len(FISH_CLASSES), 16, 0.1, 0.1)
        # Random heads predict nearly uniform probabilities; a bias makes folds and classes differ visibly.
        dense = head.get_layer("probabilities")
        kernel, bias = dense.get_weights()
        dense.set_weights([kernel * 5, np.linspace(-1, 1, len(FISH_CLASSES)) * (k + 1)])
        # Saved as the train stage saves them: compiled, with the optimiser's state.
        head.compile(optimizer=keras.optimizers.Adam(learning_rate=0.0), loss="categorical_crossentropy")
        head.fit(np.zeros((4, 512), "float32"), np.eye(len(FISH_CLASSES))[:4], epochs=1, verbose=0)
        head.save(folder / "models" / f"head_fold{k}.keras")
    return root


def report(method: str = "weighted") -> dict:
    """The slice of `paths.ensemble_report` that serving reads: the fitted ensemble and the prior."""
    shares = np.linspace(1, 2, len(FISH_CLASSES))
    shares /= shares.sum()
    fitted = E.Fitted(method=method, model_temperatures=(1.3,), weights=(1.0,), stacker=None, stacking_c=None,
                      temperature=0.8, clip=(0.01, 0.95))
    return {
        "method": method,
        "models": ["vgg16"],
        "fitted": E.fitted_to_json(fitted),
        "chosen": {"method": method, "cv_logloss": 1.1},
        "prior": {"train_shares": dict(zip(FISH_CLASSES, shares, strict=True)),
                  "target_shares": {c: 1 / len(FISH_CLASSES) for c in FISH_CLASSES}},
    }


def images(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 9 * i, 64 - 5 * i, 3), dtype=np.uint8) for i in range(n)]


def by_hand(predictions: Path, imgs: list[np.ndarray], rep: dict, x: np.ndarray | None = None) -> np.ndarray:
    """The same prediction from the pipeline's own pieces, without serving's code paths."""
    keras.utils.set_random_seed(SEED)
    extractor = build_extractor("vgg16", SIZE, "none", "avg")
    if x is None:
        x = np.stack([fit_square(img, SIZE, "pad") for img in imgs])
    feats = np.asarray(extractor(x, training=False))
    heads = [keras.saving.load_model(predictions / "vgg16" / "models" / f"head_fold{k}.keras") for k in range(FOLDS)]
    proba = np.mean([np.asarray(h(feats, training=False)) for h in heads], axis=0)
    settings = serving.ensemble_settings(predictions, rep)
    return serving.combine([proba], settings)


# ------------------------------------------------------------------------------------------- the maths


def test_the_served_combination_is_the_ensemble_stages_predict():
    """One implementation: serving calls `ensembling.predict` on the Fitted the report carries."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, len(FISH_CLASSES), 120)
    stack = rng.dirichlet(np.ones(len(FISH_CLASSES)), size=(2, 120))
    stack[:, np.arange(120), y] += 0.5
    folds = np.arange(120) % 3
    fresh = rng.dirichlet(np.ones(len(FISH_CLASSES)), size=(2, 30))
    train, target = rng.dirichlet(np.ones(len(FISH_CLASSES))), np.full(len(FISH_CLASSES), 1 / len(FISH_CLASSES))
    for method in E.METHODS:
        fitted, _ = E.fit_ensemble(method, stack, y, folds, temperature=True, clip=True, stacking_c=(0.3,))
        settings = {"fitted": json.loads(json.dumps(E.fitted_to_json(fitted))),  # as the JSON report holds it
                    "prior": {"train": train.tolist(), "target": target.tolist()}}
        np.testing.assert_allclose(serving.combine(list(fresh), settings), E.predict(fitted, fresh, (train, target)),
                                   rtol=1e-12, atol=1e-15)


def test_settings_read_the_report_and_the_train_outputs(predictions):
    settings = serving.ensemble_settings(predictions, report())
    (entry,) = settings["backbones"]
    assert entry["backbone"] == "vgg16" and entry["seed"] == SEED
    assert settings["fitted"]["model_temperatures"] == [1.3] and settings["fitted"]["temperature"] == 0.8
    assert [Path(h).name for h in entry["head_paths"]] == ["head_fold0.keras", "head_fold1.keras"]
    assert settings["prior"]["target"] == [pytest.approx(1 / 8)] * 8
    old = {k: v for k, v in report().items() if k != "fitted"}  # a report from before serving called predict
    with pytest.raises(serving.ServingError, match="no 'fitted' entry.*run the ensemble stage again"):
        serving.ensemble_settings(predictions, old)
    with pytest.raises(serving.ServingError, match="extractor.json"):
        serving.ensemble_settings(predictions, {**report(), "models": ["resnet50"]})


def test_served_smoothing_and_class_floors_are_the_stages_predict():
    rng = np.random.default_rng(4)
    y = rng.integers(0, len(FISH_CLASSES), 150)
    stack = rng.dirichlet(np.ones(len(FISH_CLASSES)), size=(2, 150))
    stack[:, np.arange(150), y] += 0.5
    folds, bursts = np.arange(150) % 3, np.arange(150) // 3
    keys = E.smoothing_keys(folds, bursts)
    fitted, _ = E.fit_ensemble("weighted", stack, y, folds, temperature=True, clip="per_class", smoothing=True,
                               keys=keys)
    assert fitted.smoothing > 0 and fitted.class_floors is not None
    settings = {"fitted": json.loads(json.dumps(E.fitted_to_json(fitted))), "prior": {}}
    fresh, fresh_keys = rng.dirichlet(np.ones(len(FISH_CLASSES)), size=(2, 30)), np.arange(30) // 5
    np.testing.assert_allclose(serving.combine(list(fresh), settings, fresh_keys),
                               E.predict(fitted, fresh, keys=fresh_keys), rtol=1e-12, atol=1e-15)


def test_the_served_model_smooths_across_the_images_of_one_call(predictions, tmp_path):
    """A burst sent in one call is smoothed as the pipeline smoothed its test set; one frame alone is not, and
    `smoothing: False` turns it off. Bursts are found as ingest finds them (hashes within max_bits)."""
    rep = report()
    rep["fitted"] = {**rep["fitted"], "smoothing": 1.0}
    settings = serving.ensemble_settings(predictions, rep, bursts={"hash_size": 8, "max_bits": 4})
    serving.stage_model(settings, tmp_path)
    model = serving.EnsembleModel()
    model.load_context(SimpleNamespace(artifacts={serving.ARTIFACT_KEY: str(tmp_path)}))
    rng = np.random.default_rng(1)
    scene = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (64, 48), interpolation=cv2.INTER_LINEAR)
    # Two frames of one catch (a little sensor noise apart) and an unrelated frame.
    burst = [np.clip(scene.astype(int) + rng.integers(-3, 4, scene.shape), 0, 255).astype(np.uint8) for _ in range(2)]
    other = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    keys = serving.burst_keys(burst + [other], 8, 4)
    assert keys[0] == keys[1] != keys[2]
    out = model.predict(None, burst + [other]).to_numpy()
    plain = model.predict(None, burst + [other], params={"smoothing": False}).to_numpy()
    assert not np.allclose(plain[0], plain[1])  # the noise moves the prediction a little
    np.testing.assert_allclose(out[0], out[1])  # weight 1: both get the burst's mean
    np.testing.assert_allclose(out[2], plain[2])
    # Alone: unsmoothed (float32 convolutions of a batch of one differ from a batch of three by ~1e-7).
    np.testing.assert_allclose(model.predict(None, burst[:1]).to_numpy(), plain[:1], rtol=1e-5, atol=1e-7)


def test_a_fine_tuned_backbone_is_served_from_its_fold_classifiers(predictions, tmp_path):
    """Fine-tuning changes the backbone in every fold, so the frozen extractor must not be rebuilt for it."""
    shutil.copytree(predictions, tmp_path / "p")
    folder = tmp_path / "p" / "vgg16"
    ext_file = folder / "extractor.json"
    ext_file.write_text(json.dumps({**json.loads(ext_file.read_text()), "fine_tuned": True}))
    with pytest.raises(serving.ServingError, match="fine-tuned fold classifiers"):
        serving.ensemble_settings(tmp_path / "p", report())

    classifiers = []
    for k in range(FOLDS):
        keras.utils.set_random_seed(200 + k)  # each fold's backbone weights differ, as after fine-tuning
        head = keras.saving.load_model(folder / "models" / f"head_fold{k}.keras")
        classifiers.append(build_classifier(build_extractor("vgg16", SIZE, "none", "avg"), head))
        classifiers[-1].save(folder / "models" / f"classifier_fold{k}.keras")
    rep = report()
    settings = serving.ensemble_settings(tmp_path / "p", rep)
    staged = serving.stage_model(settings, tmp_path / "staged")
    assert staged["backbones"][0]["fine_tuned"] and not list((tmp_path / "staged").rglob("extractors"))

    model = serving.EnsembleModel()
    model.load_context(SimpleNamespace(artifacts={serving.ARTIFACT_KEY: str(tmp_path / "staged")}))
    imgs = images()
    x = np.stack([fit_square(img, SIZE, "pad") for img in imgs])
    proba = np.mean([np.asarray(c(x, training=False)) for c in classifiers], axis=0)
    np.testing.assert_allclose(model.predict(None, imgs).to_numpy(), serving.combine([proba], settings),
                               rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------------- round trip


def test_logged_registered_model_predicts_from_raw_images(predictions, tmp_path):
    name = f"fisheries-ensemble-{uuid.uuid4().hex[:6]}"
    rep = report()
    with tracking.start_run(None, "ensemble", experiment=f"serving-{uuid.uuid4().hex[:6]}") as run:
        tracking.log_metrics({"cv_logloss": 1.1})  # the headline CV, which ranks versions for the alias
        logged = serving.log_ensemble_model(predictions, rep, registered_model=name)
    assert logged is not None and logged["run_id"] == run.info.run_id
    assert logged["registered"]["alias_version"] == "1"

    # Small: heads and settings only, no backbone weights (VGG16's alone would be ~59 MB).
    local = Path(mlflow.artifacts.download_artifacts(logged["model_uri"], dst_path=str(tmp_path / "dl")))
    size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    assert size < 3_000_000, f"logged model is {size / 1e6:.1f} MB"
    assert not list(local.rglob("extractors"))

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    imgs = images()
    expected = by_hand(predictions, imgs, rep)
    out = model.predict(imgs)
    assert list(out.columns) == list(FISH_CLASSES)
    np.testing.assert_allclose(out.to_numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-9)

    # Files (what ingest decodes), a DataFrame of paths, and one array give the same answer.
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"img_{i}.png")  # lossless, so the pixels are the same
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    np.testing.assert_allclose(model.predict([str(p) for p in paths]).to_numpy(), expected, rtol=1e-5, atol=1e-7)
    frame = pd.DataFrame({"path": [str(p) for p in paths]}, index=["a", "b", "c"])
    by_frame = model.predict(frame)
    assert list(by_frame.index) == ["a", "b", "c"]
    np.testing.assert_allclose(by_frame.to_numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.predict(imgs[0]).to_numpy(), expected[:1], rtol=1e-5, atol=1e-7)

    # A camera-sized JPEG: ingest decodes it at reduced scale; the served model must see the same pixels.
    big = tmp_path / "img_big.jpg"
    frame = cv2.resize(imgs[0], (1280, 720), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(big), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    cached = decode_file(0, big, SIZE, "pad", 8).image  # exactly what ingest stores for this file
    np.testing.assert_allclose(model.predict(str(big)).to_numpy(), by_hand(predictions, [], rep, cached[None]),
                               rtol=1e-5, atol=1e-7)


def test_a_rebuilt_extractor_that_differs_is_refused(predictions, tmp_path):
    settings = serving.stage_model(serving.ensemble_settings(predictions, report()), tmp_path)
    entry = dict(settings["backbones"][0])
    for k, rel in enumerate(entry["heads"]):  # logged without the optimiser state: about a third of the size
        original = predictions / "vgg16" / "models" / f"head_fold{k}.keras"
        assert (tmp_path / rel).stat().st_size < 0.6 * original.stat().st_size
    assert serving.weights_digest(serving.load_extractor(entry, tmp_path)) == entry["weights_digest"]
    with pytest.raises(serving.ServingError, match="differs from the one logged"):
        serving.load_extractor({**entry, "seed": SEED + 1}, tmp_path)


def test_extractor_can_be_shipped_as_a_file(predictions, tmp_path):
    settings = serving.stage_model(serving.ensemble_settings(predictions, report()), tmp_path, extractors="file")
    entry = settings["backbones"][0]
    assert entry["extractor_file"] == "extractors/vgg16.keras" and (tmp_path / entry["extractor_file"]).is_file()
    x = np.stack([fit_square(img, SIZE, "pad") for img in images(2)])
    loaded = serving.load_extractor(entry, tmp_path)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(serving.build_seeded_extractor(entry)(x)),
                               rtol=1e-5, atol=1e-6)


def test_an_unpackageable_ensemble_is_skipped_with_a_message_not_a_failure(predictions, capsys):
    with tracking.start_run(None, "ensemble", experiment=f"serving-{uuid.uuid4().hex[:6]}") as run:
        old = {k: v for k, v in report().items() if k != "fitted"}
        assert serving.log_ensemble_model(predictions, old) is None
        tracking.log_metrics({"still": 1.0})
    err = capsys.readouterr().err
    assert "ensemble model is not logged" in err and "fitted" in err
    assert tracking.disabled_reason() is None
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics["still"] == 1.0
    assert serving.log_ensemble_model(predictions, report()) is None  # no open run: nothing to attach it to


# ------------------------------------------------------------------------------------------- integration


def test_served_model_reproduces_the_pipelines_own_test_predictions(tmp_path):
    """Train and ensemble stages on tiny data, then the served model on the same images: same probabilities.

    One test-time view, so the pipeline's test predictions are exactly "each fold head on the image, averaged,
    then the ensemble's calibration": what the served model computes from raw pixels. This is the check that
    the train stage and serving rebuild the same random-weight extractor from `extractor.json`.
    """
    from pipeline.core.augmentation import make_views
    from pipeline.core.params import load
    from pipeline.stages import ensemble, train
    from tests.factories import synthetic_images, tiny_params

    # bfloat16 embeddings, as auto gives on a CPU that has it: the served extractor must compute in it too
    raw = tiny_params(tmp_path, **{"augment.tta_views": 1, "cv.n_folds": 2, "train.epochs": 2,
                                   "train.extract_precision": "bfloat16"})
    manifest = synthetic_images(tmp_path, raw, n_train=48, n_test=6)
    pixels = np.load(raw["paths"]["images"])
    settings = load(train.Settings, tmp_path / "params.yaml")
    views = make_views(pixels, (manifest.split == "train").to_numpy(), settings.augment, seed=settings.seed)
    np.save(raw["paths"]["views"], views)
    train.run("vgg16", settings)
    paths = settings.paths
    report = ensemble.run(load(ensemble.Settings, tmp_path / "params.yaml"))

    with tracking.start_run(None, "ensemble", experiment=f"serving-{uuid.uuid4().hex[:6]}"):
        logged = serving.log_ensemble_model(paths.predictions, report, resize=raw["ingest"]["resize"])
    model = mlflow.pyfunc.load_model(logged["model_uri"])
    for split in ("test_stg1", "test_stg2"):
        expected = pd.read_csv(Path(paths.ensemble) / f"{split}.csv").set_index("id")
        rows = manifest.index[manifest.split == split]
        served = model.predict([pixels[i] for i in rows])
        served.index = manifest.loc[rows, "id"]
        np.testing.assert_allclose(served.to_numpy(), expected.loc[served.index, list(FISH_CLASSES)].to_numpy(),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_served_crop_model_localises_crops_and_classifies_raw_jpegs_as_the_pipeline_did(tmp_path, monkeypatch):
    """The whole crop chain from raw JPEG bytes: fold localisers → box → crop cut from the full frame → crop
    classifier → ensemble. On a tiny demo run through demo, ingest, localise, crops, train (frames and crops) and
    ensemble with one test-time view, the served model must give the pipeline's own test predictions."""
    from pipeline.core.params import load
    from pipeline.generators import demo
    from pipeline.stages import augment, crops, ensemble, ingest, localise, train
    from tests.factories import tiny_params

    raw = tiny_params(tmp_path, **{"augment.tta_views": 1, "cv.n_folds": 2, "train.epochs": 2,
                                   "demo.n_train": 40, "demo.n_test_stg1": 6, "demo.n_test_stg2": 8,
                                   "demo.width": 128, "demo.train_boats": 3, "demo.new_boats": 2,
                                   "crops.backbones": ["vgg16"],
                                   "ensemble.smoothing": False})  # per-call bursts are tested above
    params = tmp_path / "params.yaml"
    monkeypatch.chdir(tmp_path)  # the manifest's frame paths are relative to the project, as in a clone
    s = load(demo.Settings, params)
    demo.write_demo(s.demo, s.data.demo_dir)
    ingest.run(load(ingest.Settings, params), root=tmp_path)
    augment.run(load(augment.Settings, params))
    localise.run(load(localise.Settings, params))
    crops.run(load(crops.Settings, params))
    train.run("vgg16", load(train.Settings, params))
    train.run("vgg16", load(train.CropSettings, params))
    settings = load(ensemble.Settings, params)
    report = ensemble.run(settings)
    assert set(report["models"]) == {"vgg16", "vgg16-crop"}

    paths = settings.paths
    with tracking.start_run(None, "ensemble", experiment=f"serving-{uuid.uuid4().hex[:6]}"):
        logged = serving.log_ensemble_model(paths.predictions, report, ["vgg16", "vgg16-crop"],
                                            resize=raw["ingest"]["resize"], localiser=paths.localiser)
    model = mlflow.pyfunc.load_model(logged["model_uri"])
    manifest = pd.read_csv(paths.manifest, keep_default_na=False)
    for split in ("test_stg1", "test_stg2"):
        expected = pd.read_csv(Path(paths.ensemble) / f"{split}.csv").set_index("id")
        rows = manifest[manifest.split == split]
        served = model.predict([Path(p).read_bytes() for p in rows["path"]])
        served.index = rows["id"]
        np.testing.assert_allclose(served.to_numpy(), expected.loc[served.index, list(FISH_CLASSES)].to_numpy(),
                                   rtol=1e-4, atol=1e-5)
