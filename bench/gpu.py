"""GPU sizing: can the input pipeline feed a GPU, and what mixed precision buys (`python -m bench --only gpu`).

Measures, on whatever device Keras finds, with any Keras backend (it imports only `pipeline.models` and
`pipeline.augment`, so it also runs where TensorFlow is absent, e.g. `KERAS_BACKEND=jax`):

- the frozen extractor's forward rate for every configured backbone, at the configured size and at 224 px,
  in float32 and, when a GPU is present, in mixed precision (float16 compute);
- fine-tuning's training rate (ResNet50, top two blocks unfrozen, 224 px), float32 vs mixed precision, from
  in-memory arrays (the GPU's ceiling) and fed by `AugmentedBatches` on every core (what the train stage does);
- the input pipeline's rate (`AugmentedBatches`: read the cache, augment, batch) on one thread and on all
  cores, and so `gpu_input_over_backbone`: all cores' input rate over the fastest mixed-precision backbone
  at 224 px. Under 1, fine-tuning on that GPU waits for its input.

Rates are images per second, each the best of a few timed calls after one untimed call (compilation).
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np

from pipeline.core import params as config
from pipeline.core.augmentation import train_policy
from pipeline.core.backbones import build_classifier, build_extractor, unfreeze_top
from pipeline.core.batches import AugmentedBatches
from pipeline.core.heads import build_head

BIG = 224  # the size fine-tuning on real photos uses


def _best(fn, repeats: int = 3) -> float:
    fn()  # compile / trace, untimed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _emit(row: dict) -> dict:
    """Print a figure as soon as it is measured, so a run cut short still reports what it had."""
    print(f"  {row['key']}: {row['value']:.1f} {row['unit']} ({row['note']})", flush=True)
    return row


def _gpu_present() -> bool:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _policies(gpu: bool) -> list[str]:
    return ["float32", "mixed_float16"] if gpu else ["float32"]


def forward_rates(backbones, sizes, n, batch, gpu) -> list[dict]:
    rows = []
    for policy in _policies(gpu):
        keras.mixed_precision.set_global_policy(policy)
        for size in sizes:
            images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
            for name in backbones:
                extractor = build_extractor(name, size, "none")
                seconds = _best(lambda e=extractor, x=images: e.predict(x, batch_size=batch, verbose=0))
                rows.append(_emit({"key": f"gpu_forward_{name}_{size}_{policy}", "value": n / seconds, "target": "",
                                   "unit": "img/s", "note": f"{name} {size}px {policy}, batch {batch}, {n} images"}))
    keras.mixed_precision.set_global_policy("float32")
    return rows


def fine_tune_rates(aug_cfg, n, batch, gpu) -> list[dict]:
    """Training rate from in-memory arrays (the GPU's ceiling), then fed by AugmentedBatches (what train does)."""
    rows = []
    labels = np.arange(n) % 8
    images = np.random.default_rng(1).integers(0, 256, (n, BIG, BIG, 3), dtype=np.uint8)
    for policy in _policies(gpu):
        keras.mixed_precision.set_global_policy(policy)
        extractor = build_extractor("resnet50", BIG, "none")
        model = build_classifier(extractor, build_head(extractor.output_shape[-1], 8, 256, 0.3, 0.5))
        unfreeze_top(extractor, "resnet50", 2)
        model.compile(keras.optimizers.Adam(1e-5), "categorical_crossentropy")
        onehot = keras.utils.to_categorical(labels, 8)
        seconds = _best(lambda m=model, y=onehot: m.fit(images, y, batch_size=batch, epochs=1, verbose=0), repeats=2)
        rows.append(_emit({"key": f"gpu_fine_tune_resnet50_{BIG}_{policy}", "value": n / seconds, "target": "",
                           "unit": "img/s", "note": f"training from memory, top 2 blocks unfrozen, batch {batch}"}))
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/cache.npy", images)
        cache = np.load(f"{tmp}/cache.npy", mmap_mode="r")
        for processes in (0, cores):
            fed = AugmentedBatches(cache, np.arange(n), labels, 8, batch, train_policy(aug_cfg), seed=0,
                                   processes=processes)
            seconds = _best(lambda m=model, f=fed: m.fit(f, epochs=1, verbose=0), repeats=2)
            fed.close()
            how = f"{processes} processes" if processes else "2 threads"
            rows.append(_emit({"key": f"gpu_fine_tune_fed_{how.replace(' ', '_')}_resnet50_{BIG}_{policy}",
                               "value": n / seconds, "target": "", "unit": "img/s",
                               "note": f"training fed by AugmentedBatches ({how}), {policy}"}))
    keras.mixed_precision.set_global_policy("float32")
    return rows


def input_rates(aug_cfg, n, batch) -> list[dict]:
    """AugmentedBatches alone: threads of this process, then worker processes (the train stage's default)."""
    rows = []
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/cache.npy", np.random.default_rng(2).integers(0, 256, (n, BIG, BIG, 3), dtype=np.uint8))
        cache = np.load(f"{tmp}/cache.npy", mmap_mode="r")
        for processes, workers in [(0, 1), (0, min(4, cores)), (0, cores), (cores, cores)]:
            batches = AugmentedBatches(cache, np.arange(n), np.arange(n) % 8, 8, batch, train_policy(aug_cfg), seed=0,
                                       processes=processes)
            with ThreadPoolExecutor(workers) as pool:
                seconds = _best(lambda p=pool, b=batches: list(p.map(b.__getitem__, range(len(b)))), repeats=2)
            batches.close()
            how = f"{processes} processes" if processes else f"{workers} threads"
            rows.append(_emit({"key": f"gpu_input_{BIG}_{how.replace(' ', '_')}", "value": n / seconds, "target": "",
                               "unit": "img/s", "note": f"AugmentedBatches at {BIG}px, {how}"}))
    return rows


def run(quick: bool = False) -> list[dict]:
    raw = config.read_params()
    model_cfg: config.Model = config.from_dict(config.Model, raw["model"], "model")
    aug_cfg: config.Augment = config.from_dict(config.Augment, raw["augment"], "augment")
    gpu = _gpu_present()
    sizes = sorted({model_cfg.image_size, BIG})
    n = 64 if quick else (2048 if gpu else 256)
    rows = input_rates(aug_cfg, 128 if quick else 1024, 64)
    rows += forward_rates(model_cfg.backbones, sizes, n, 32 if quick else 128, gpu)
    rows += fine_tune_rates(aug_cfg, 32 if quick else (2048 if gpu else 128), 32 if quick else 64, gpu)
    all_cores = max(r["value"] for r in rows if r["key"].startswith("gpu_input_"))  # the best way to feed it
    policy = _policies(gpu)[-1]
    at_big = {r["key"]: r["value"] for r in rows if r["key"].endswith(f"_{BIG}_{policy}") and "forward" in r["key"]}
    fastest = max(at_big, key=at_big.get)
    rows.insert(0, {"key": "gpu_input_over_backbone", "value": all_cores / at_big[fastest], "target": "",
                    "unit": "x", "note": f"input at best {all_cores:.0f} img/s ({os.cpu_count()} cores) vs {fastest} "
                                         f"{at_big[fastest]:.0f} img/s; keras {keras.__version__} on "
                                         f"{keras.backend.backend()}, GPU {'yes' if gpu else 'no'}"})
    return rows
