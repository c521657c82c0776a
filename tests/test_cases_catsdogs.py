"""Cats vs dogs: each source's loader (quarantine included), the embedding cache, the model and the stage."""

import dataclasses
import json
import zipfile

import cv2
import numpy as np
import pytest

from pipeline.core.params import CatsDogs, ConfigError, load
from pipeline.generators.cartoons import demo_images
from pipeline.stages import catsdogs
from tests.factories import ROOT, section, write_params


def _cfg(**overrides) -> CatsDogs:
    return section(CatsDogs, "catsdogs", **overrides)


def _jpeg(value: int, h: int = 40, w: int = 56) -> bytes:
    img = np.full((h, w, 3), value, np.uint8)
    cv2.circle(img, (w // 2, h // 2), 8, (255 - value, 0, value), -1)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _petimages(root):
    """A PetImages tree with the defects the real one has: an empty file, a corrupt JPEG and Thumbs.db."""
    for folder in ("Cat", "Dog"):
        (root / "PetImages" / folder).mkdir(parents=True)
    for i in range(3):
        (root / "PetImages" / "Cat" / f"{i}.jpg").write_bytes(_jpeg(40 + i))
        (root / "PetImages" / "Dog" / f"{i}.jpg").write_bytes(_jpeg(200 - i))
    (root / "PetImages" / "Cat" / "666.jpg").write_bytes(b"")
    (root / "PetImages" / "Dog" / "11702.jpg").write_bytes(_jpeg(90)[:300])  # cut short, like a failed copy
    (root / "PetImages" / "Dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff" + bytes(200) + b"\xff\xd9")
    (root / "PetImages" / "Cat" / "Thumbs.db").write_bytes(b"\x00" * 64)


def test_params_section_validates():
    cfg = load(catsdogs.Settings, ROOT / "params.yaml").catsdogs
    assert cfg.source == "demo" and cfg.weights == "none"
    with pytest.raises(ConfigError, match="not one of"):
        _cfg(source="flickr")


def test_demo_images_are_balanced_varied_and_repeatable():
    x, y = demo_images(40, 64, seed=3)
    assert x.shape == (40, 64, 64, 3) and x.dtype == np.uint8 and np.bincount(y).tolist() == [20, 20]
    x2, y2 = demo_images(40, 64, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(demo_images(40, 64, seed=4)[0], x)
    # Backgrounds vary, so mean colour alone must not give the class away.
    means = x.reshape(40, -1).mean(1)
    assert abs(means[y == 0].mean() - means[y == 1].mean()) < 2 * means.std()


def test_kaggle_zip_labels_come_from_the_names_and_bad_members_are_quarantined(tmp_path):
    data_dir = tmp_path / "raw"
    data_dir.mkdir()
    with zipfile.ZipFile(data_dir / "train.zip", "w") as zf:
        for i in range(4):
            zf.writestr(f"train/cat.{i}.jpg", _jpeg(30 + i))
            zf.writestr(f"train/dog.{i}.jpg", _jpeg(220 - i))
        zf.writestr("train/cat.99.jpg", b"not an image at all")
        zf.writestr("train/notes.txt", b"ignored")
    cfg = _cfg(source="kaggle", data_dir=str(data_dir), image_size=32, max_per_class=0)
    loaded = catsdogs.load_source(cfg, 0)
    assert loaded.images.shape == (8, 32, 32, 3)
    for name, label in zip(loaded.names, loaded.labels, strict=True):
        assert catsdogs.CLASSES[label] in name
    assert [q["file"] for q in loaded.quarantined] == ["train/cat.99.jpg"]
    assert "not an image" in loaded.quarantined[0]["reason"]
    capped = catsdogs.load_source(dataclasses.replace(cfg, max_per_class=2), 0)
    # Two names drawn per class, then decoded: a drawn corrupt file is quarantined, not replaced.
    assert len(capped.labels) + len(capped.quarantined) == 4
    assert np.bincount(capped.labels, minlength=2).max() == 2


def test_petimages_corrupt_and_empty_files_are_quarantined_with_a_reason(tmp_path):
    _petimages(tmp_path)
    cfg = _cfg(source="petimages", data_dir=str(tmp_path), image_size=32, max_per_class=0)
    loaded = catsdogs.load_source(cfg, 0)
    assert np.bincount(loaded.labels).tolist() == [3, 3]
    reasons = {q["file"].split("PetImages/")[1]: q["reason"] for q in loaded.quarantined}
    assert set(reasons) == {"Cat/666.jpg", "Dog/11702.jpg", "Dog/bad.jpg"}  # Thumbs.db is not a candidate
    assert "empty" in reasons["Cat/666.jpg"] and "truncated" in reasons["Dog/11702.jpg"]
    assert "corrupt" in reasons["Dog/bad.jpg"]


@pytest.mark.parametrize("source, missing", [("kaggle", "train.zip"), ("petimages", "PetImages")])
def test_missing_real_sources_say_where_to_put_them(tmp_path, source, missing):
    with pytest.raises(FileNotFoundError) as err:
        catsdogs.load_source(_cfg(source=source, data_dir=str(tmp_path)), 0)
    assert str(tmp_path / missing) in str(err.value) and "catsdogs.source: demo" in str(err.value)


def test_split_is_stratified_and_disjoint():
    y = np.arange(100) % 2
    rows = catsdogs.split(y, 0.3, 0.2, seed=0)
    every = np.concatenate(list(rows.values()))
    assert len(every) == len(set(every)) == 100
    assert len(rows["test"]) == 30 and np.mean(y[rows["test"]]) == 0.5


def test_embeddings_are_cached_and_recomputed_when_the_images_change(tmp_path, monkeypatch):
    x, _ = demo_images(6, 32, seed=0)
    ext = catsdogs.extractor_settings(_cfg(image_size=32), seed=0)
    cache = tmp_path / "emb.npz"
    first = catsdogs.embed(x, ext, 8, cache)
    assert first.shape == (6, 512) and cache.exists()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the extractor was rebuilt although nothing changed")

    monkeypatch.setattr(catsdogs, "build_extractor", no_rebuild)
    np.testing.assert_array_equal(catsdogs.embed(x, ext, 8, cache), first)
    with pytest.raises(AssertionError, match="rebuilt"):
        catsdogs.embed(x[::-1].copy(), ext, 8, cache)


def test_backbone_and_shared_head_take_a_finite_training_step():
    from pipeline.core.backbones import build_extractor
    from pipeline.core.heads import build_head

    extractor = build_extractor("vgg16", 32, "none", "avg")
    x, y = demo_images(8, 32, seed=1)
    features = extractor.predict(x, verbose=0)
    assert features.shape == (8, 512)
    head = build_head(512, 2, 16, 0.1, 0.1)
    head.compile(optimizer="adam", loss="categorical_crossentropy")
    loss = head.train_on_batch(features, np.eye(2)[y])
    assert np.isfinite(loss) and head.output_shape == (None, 2)


def test_stage_on_petimages_writes_quarantine_metrics_and_roc(tmp_path):
    _petimages(tmp_path / "raw")
    for i in range(3, 10):  # enough of each class for a train / val / test split
        (tmp_path / "raw" / "PetImages" / "Cat" / f"{i}.jpg").write_bytes(_jpeg(20 + 5 * i))
        (tmp_path / "raw" / "PetImages" / "Dog" / f"{i}.jpg").write_bytes(_jpeg(240 - 5 * i))
    path = write_params(tmp_path, {
        "catsdogs.source": "petimages", "catsdogs.data_dir": str(tmp_path / "raw"), "catsdogs.image_size": 32,
        "catsdogs.test_fraction": 0.3, "catsdogs.embeddings": str(tmp_path / "processed" / "emb.npz"),
        "catsdogs.reports": str(tmp_path / "reports"), "catsdogs.train.epochs": 2, "catsdogs.train.batch_size": 8,
    })
    summary = catsdogs.run(load(catsdogs.Settings, path))
    quarantine = json.loads((tmp_path / "reports" / "quarantine.json").read_text())
    assert quarantine["n_quarantined"] == summary["n_quarantined"] == 3 and quarantine["n_used"] == 20
    assert all(q["reason"] for q in quarantine["files"])
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert {"test_accuracy", "test_roc_auc", "chance_accuracy"} <= set(metrics)
    assert (tmp_path / "reports" / "roc_curve.png").stat().st_size > 1000
