"""Training-path benchmarks (issue 4), each a ratio of two runs on the same data in this process.

- `cv_cached_speedup`: 5-fold CV of the head on cached embeddings (one backbone pass, extraction included)
  vs the same folds and epochs trained end to end through the frozen backbone. Target >= 10.
- `input_over_backbone`: images/s of the input pipeline alone (read the cache, augment, batch) vs images/s
  of the backbone's forward pass at the configured size. Target >= 3.
- `extract_overhead`: embedding extraction through the pipeline (memory-mapped views, chunks) vs a bare
  `model.predict` on an in-memory array. Target <= 1.2.
- `idg_epoch_over_pipeline`: one training epoch fed by Keras' legacy `ImageDataGenerator` reading JPEGs (the
  seed-style baseline) vs the same epoch fed by the pipeline's input path; > 1 means ours is faster. A fair
  race: each arm first runs one untimed epoch (so each pays its own train-step traces, the last short batch's
  included), both feed the model uint8 batches (the model casts them, as the pipeline's does), and both are
  drawn by the same number of worker threads.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import keras
import numpy as np

from pipeline.core import params as config
from pipeline.core.augmentation import train_policy
from pipeline.core.backbones import build_classifier, build_extractor, extract_features
from pipeline.core.batches import AugmentedBatches
from pipeline.core.folds import assign_folds
from pipeline.core.heads import build_head, fit_head

BACKBONE = "resnet50"  # the fastest of the three required backbones keeps the end-to-end arm affordable


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-coloured ellipses on textured decks: enough structure for the timings to be realistic."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, n)
    images = rng.integers(60, 140, (n, size, size, 3), dtype=np.uint8)
    for img, label in zip(images, labels, strict=True):
        centre = tuple(int(c) for c in rng.integers(size // 4, 3 * size // 4, 2))
        colour = tuple(int(c) for c in (30 * label, 255 - 30 * label, 120))
        cv2.ellipse(img, centre, (size // 5, size // 10), float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return images, labels


def cv_cached_speedup(images, labels, size, cfg, n_folds=5, epochs=10) -> dict:
    groups = np.arange(len(labels)) % 10
    folds = assign_folds(labels, groups, n_folds, "boat", seed=0)
    train_cfg = SimpleNamespace(epochs=epochs, batch_size=32, learning_rate=1e-3, patience=epochs, label_smoothing=0.0)
    extractor = build_extractor(BACKBONE, size, "none")

    def cached():
        feats = extract_features(extractor, images, 32)
        for k in range(n_folds):
            tr, va = folds != k, folds == k
            fit_head(feats[tr], labels[tr], feats[va], labels[va], 8, cfg.head, train_cfg, seed=k)

    def end_to_end():
        for k in range(n_folds):
            tr, va = folds != k, folds == k
            head = build_head(extractor.output_shape[-1], 8, cfg.head.units, cfg.head.dropout_in, cfg.head.dropout_out)
            model = build_classifier(extractor, head)
            model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
            model.fit(images[tr], keras.utils.to_categorical(labels[tr], 8), batch_size=32, epochs=epochs,
                      validation_data=(images[va], keras.utils.to_categorical(labels[va], 8)), verbose=0)

    t_cached, t_e2e = _timed(cached), _timed(end_to_end)
    return {"key": "cv_cached_speedup", "value": t_e2e / t_cached, "target": ">= 10", "unit": "x",
            "note": f"{BACKBONE} {size}px, {len(labels)} images, {n_folds} folds x {epochs} epochs: "
                    f"end to end {t_e2e:.0f} s vs cached {t_cached:.1f} s"}


def input_and_extraction(images, labels, size, aug_cfg, backbones) -> list[dict]:
    rows = []
    n = len(images)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "views.npy"
        np.save(path, images)
        cache = np.load(path, mmap_mode="r")
        batches = AugmentedBatches(cache, np.arange(n), labels, 8, 32, train_policy(aug_cfg), seed=0, workers=1)
        t_input = _timed(lambda: [batches[i] for i in range(len(batches))])
        input_rate = n / t_input
        rates = {}
        for name in backbones:
            extractor = build_extractor(name, size, "none")
            extractor.predict(images[:32], batch_size=32, verbose=0)  # build and trace outside the timing
            t_bare = min(_timed(lambda e=extractor: e.predict(images, batch_size=32, verbose=0)) for _ in range(2))
            t_ours = min(_timed(lambda e=extractor: extract_features(e, cache, 32)) for _ in range(2))
            rates[name] = n / t_bare
            rows.append({"key": f"extract_overhead_{name}", "value": t_ours / t_bare, "target": "<= 1.2", "unit": "x",
                         "note": f"{name} {size}px: {n / t_ours:.1f} vs {n / t_bare:.1f} images/s"})
    fastest = max(rates, key=rates.get)
    rows.insert(0, {"key": "input_over_backbone", "value": input_rate / rates[fastest], "target": ">= 3", "unit": "x",
                    "note": f"input {input_rate:.0f} images/s (1 thread) vs {fastest}, the fastest configured "
                            f"backbone, {rates[fastest]:.1f} images/s"})
    worst = max((r for r in rows if r["key"].startswith("extract_overhead_")), key=lambda r: r["value"])
    rows.insert(1, {**worst, "key": "extract_overhead", "note": f"worst backbone: {worst['note']}"})
    return rows


#: Threads drawing batches in both arms of the ImageDataGenerator race: AugmentedBatches' default.
IDG_RACE_WORKERS = 2


class _Uint8Batches(keras.utils.PyDataset):
    """An ImageDataGenerator iterator's float batches (0-255) as uint8, drawn by `workers` threads: the same
    dtype into the model and the same worker count as the pipeline's own input, so that only the input path
    differs between the two arms of the race."""

    def __init__(self, flow, workers: int) -> None:
        super().__init__(workers=workers)
        self.flow = flow

    def __len__(self) -> int:
        return len(self.flow)

    def __getitem__(self, i: int):
        x, y = self.flow[i]
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), y

    def on_epoch_end(self) -> None:
        self.flow.on_epoch_end()


def idg_epoch_ratio(images, labels, size, cfg, aug_cfg) -> dict:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    with tempfile.TemporaryDirectory() as tmp:
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = Path(tmp) / f"class_{label}"
            folder.mkdir(exist_ok=True)
            # The seed kernels read full-size photos every epoch; store 3x the working size like a small photo.
            big = cv2.resize(img, (size * 3, size * 3))
            cv2.imwrite(str(folder / f"img_{i:05d}.jpg"), cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
        extractor = build_extractor(BACKBONE, size, "none")
        head = build_head(extractor.output_shape[-1], 8, cfg.head.units, cfg.head.dropout_in, cfg.head.dropout_out)
        model = build_classifier(extractor, head)
        model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
        idg = ImageDataGenerator(rotation_range=15, width_shift_range=0.08, height_shift_range=0.08, zoom_range=0.15,
                                 horizontal_flip=True)
        flow = idg.flow_from_directory(tmp, target_size=(size, size), batch_size=32, class_mode="categorical",
                                       seed=0)
        theirs = _Uint8Batches(flow, IDG_RACE_WORKERS)
        ours = AugmentedBatches(images, np.arange(len(images)), labels, 8, 32, train_policy(aug_cfg), seed=0,
                                workers=IDG_RACE_WORKERS)
        assert len(theirs) == len(ours)  # the same batch sizes, so the same train-step traces
        # One untimed epoch per arm: each pays its own traces (and the first reads of its files) outside the
        # timing, whichever runs first.
        warm = {name: _timed(lambda d=data: model.fit(d, epochs=1, verbose=0))
                for name, data in (("idg", theirs), ("ours", ours))}
        t_idg = _timed(lambda: model.fit(theirs, epochs=1, verbose=0))
        t_ours = _timed(lambda: model.fit(ours, epochs=1, verbose=0))
    return {"key": "idg_epoch_over_pipeline", "value": t_idg / t_ours, "target": "", "unit": "x",
            "note": f"one epoch of {len(labels)} images, {BACKBONE} {size}px, uint8 into the model, "
                    f"{IDG_RACE_WORKERS} worker threads each, after an untimed epoch each (warm-up "
                    f"{warm['idg']:.1f} s / {warm['ours']:.1f} s): ImageDataGenerator from JPEGs {t_idg:.1f} s "
                    f"vs pipeline {t_ours:.1f} s"}


def run(quick: bool = False) -> list[dict]:
    raw = config.read_params()
    model_cfg: config.Model = config.from_dict(config.Model, raw["model"], "model")
    aug_cfg: config.Augment = config.from_dict(config.Augment, raw["augment"], "augment")
    size = model_cfg.image_size
    n = 60 if quick else 200
    images, labels = _images(n, size)
    keras.utils.set_random_seed(0)
    rows = [cv_cached_speedup(images, labels, size, model_cfg, epochs=3 if quick else 10)]
    rows += input_and_extraction(images, labels, size, aug_cfg, model_cfg.backbones)
    rows.append(idg_epoch_ratio(images, labels, size, model_cfg, aug_cfg))
    return rows
