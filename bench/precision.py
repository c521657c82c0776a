"""`train.extract_precision`'s claim (issue 13's time budget): on a CPU with native bfloat16, the frozen extractors
that `Backbone.cpu_bfloat16` marks embed faster in bfloat16 than in float32 (ConvNeXt, marked False, measured
0.65x in a one-off run).

- `bf16_extract_speedup_<backbone>`: images/s of `extract_features` (the train stage's embedding path) under
  `mixed_bfloat16` vs under float32, same extractor weights, same images, each after an untimed warm-up, the
  two arms taking turns, best of three. On a CPU without native bfloat16 TensorFlow emulates it and every ratio
  is below 1: auto keeps float32 there (`devices.native_bfloat16`).
"""

from __future__ import annotations

import time

import keras
import numpy as np

from pipeline.core import params as config
from pipeline.core.backbones import build_extractor, extract_features, extraction_precision
from pipeline.core.devices import native_bfloat16

PRECISIONS = ("float32", "mixed_bfloat16")


def _rates(name: str, size: int, images: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """Best images/s of each precision over `rounds`, the two arms taking turns (this machine's speed drifts)."""
    extractors = {}
    for precision in PRECISIONS:
        keras.utils.set_random_seed(0)
        extractors[precision] = build_extractor(name, size, "none", precision=precision)
        extract_features(extractors[precision], images[:32], 32)  # build and trace outside the timing
    best = dict.fromkeys(PRECISIONS, float("inf"))
    for _ in range(rounds):
        for precision, extractor in extractors.items():
            start = time.perf_counter()
            extract_features(extractor, images, 32)
            best[precision] = min(best[precision], time.perf_counter() - start)
    return {precision: len(images) / seconds for precision, seconds in best.items()}


def run(quick: bool = False) -> list[dict]:
    raw = config.read_params()
    size = int(raw["model"]["image_size"])
    names = list(dict.fromkeys([*raw["model"]["backbones"], *raw["crops"]["backbones"]]))
    images = np.random.default_rng(0).integers(0, 255, (64 if quick else 256, size, size, 3), dtype=np.uint8)
    native = native_bfloat16()
    rows = []
    for name in names:
        rates = _rates(name, size, images)
        f32, bf16 = rates["float32"], rates["mixed_bfloat16"]
        auto = extraction_precision("auto", name, gpus=0, native_bfloat16=native, policy="float32") or "float32"
        rows.append({"key": f"bf16_extract_speedup_{name}", "value": bf16 / f32, "target": "", "unit": "x",
                     "note": f"{name} {size}px, {len(images)} images: {bf16:.1f} vs {f32:.1f} images/s; this CPU "
                             f"{'has' if native else 'emulates'} bfloat16, auto picks {auto}"})
    return rows
