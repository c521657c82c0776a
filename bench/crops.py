"""Benchmark: the crop stage's cutting path against a plain decode-and-slice loop.

Both read the same generated 1280x720 JPEGs (the real cameras' commonest size) with one fish-sized box each,
in the same process, after one untimed pass so the page cache is warm; the contenders alternate and each keeps
its best time, so load from other processes hits both alike. The plain loop is what a notebook would do:
`cv2.imread`, slice the box, `cv2.resize`. The stage's path (`pipeline.stages.crops.cut_all`'s per-frame work)
does more: the same checked decode as ingest (file type, truncation, RGB), a square with a margin around the box
and black where it runs off the frame. `crops_speedup` is its images per second over the plain loop's: the
price of those checks and of the square, not a target to beat.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.ingest import make_jpegs
from pipeline.core.crops import cut
from pipeline.core.decode import decode_bytes

SIZE, MARGIN, MIN_SIDE = 96, 0.25, 32  # params.yaml's crops.image_size, margin and min_side


def boxes_for(n: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    """A box of 3-15% of the frame's width per frame (the real fish's scale), some running off the frame."""
    rng = np.random.default_rng(seed)
    bw = rng.uniform(0.03, 0.15, n) * w
    bh = bw * rng.uniform(0.4, 1.0, n)
    return np.column_stack([rng.uniform(-0.02 * w, w - bw), rng.uniform(-0.02 * h, h - bh), bw, bh])


def plain_loop(paths: list[Path], boxes: np.ndarray) -> int:
    n = 0
    for p, (x, y, w, h) in zip(paths, boxes, strict=True):
        img = cv2.imread(str(p))
        x0, y0 = max(int(x), 0), max(int(y), 0)
        patch = img[y0 : int(y + h), x0 : int(x + w)]
        cv2.resize(patch, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        n += 1
    return n


def stage_path(paths: list[Path], boxes: np.ndarray) -> int:
    n = 0
    for p, box in zip(paths, boxes, strict=True):
        rgb = decode_bytes(p.read_bytes())[0]
        cut(rgb, tuple(box), MARGIN, MIN_SIDE, SIZE)
        n += 1
    return n


def run(quick: bool = False) -> list[dict]:
    n, repeats = (20, 3) if quick else (60, 5)
    with tempfile.TemporaryDirectory(prefix="bench_crops_") as tmp:
        paths = make_jpegs(Path(tmp), n, size=(1280, 720))
        boxes = boxes_for(n, 1280, 720)
        plain_loop(paths, boxes)  # warm the page cache for both
        best = {"ours": float("inf"), "plain": float("inf")}
        for _ in range(repeats):
            for name, fn in (("ours", stage_path), ("plain", plain_loop)):
                t = time.perf_counter()
                fn(paths, boxes)
                best[name] = min(best[name], time.perf_counter() - t)
    ours, base = n / best["ours"], n / best["plain"]
    note = f"{n} JPEGs 1280x720, one box each -> {SIZE}px crops, best of {repeats}, one process"
    return [
        {"key": "crops_speedup", "value": round(ours / base, 2), "target": ">= 0.8", "unit": "x",
         "note": note + "; ours checks every file and cuts a padded square"},
        {"key": "crops_images_per_s", "value": round(ours, 1), "target": None, "unit": "img/s", "note": note},
        {"key": "crops_baseline_images_per_s", "value": round(base, 1), "target": None, "unit": "img/s",
         "note": "cv2.imread + slice + cv2.resize, same files and boxes"},
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
