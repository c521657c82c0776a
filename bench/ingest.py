"""Benchmark: ingest's parallel decode path against a plain single-process decode-and-resize loop.

Both read the same ~300 generated 320x240 JPEGs from a temporary folder, in the same process, after one
untimed pass so the page cache is warm for both; the contenders alternate and each keeps its best time, so
load from other processes on a shared machine hits both alike. The plain loop is what a notebook would do
(`cv2.imread` + `cv2.resize`); ingest's path does more per file (SHA-1 of the bytes, truncation check,
RGB conversion, boat signature, perceptual hashes) but decodes large JPEGs at reduced scale and spreads the
work over `ingest.workers` processes. `ingest_speedup` is ingest's images per second over the plain loop's;
`ingest_speedup_1280x720` repeats the race on frames of the real cameras' most common size.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.core import params as config
from pipeline.core.decode import decode_all

SIZE = 96


def make_jpegs(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (320, 240)) -> list[Path]:
    """n drawn frames (a deck, lines, a fish-like ellipse, noise) of `size`, saved as JPEG quality 90."""
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((h, w, 3), rng.integers(60, 200, 3), dtype=np.uint8)
        for _ in range(6):
            p1, p2 = rng.integers(0, w, 2), rng.integers(0, h, 2)
            cv2.line(
                img,
                (int(p1[0]), int(p2[0])),
                (int(p1[1]), int(p2[1])),
                rng.integers(0, 255, 3).tolist(),
                max(1, w // 100),
            )
        centre = (int(rng.integers(w // 8, w - w // 8)), int(rng.integers(h // 6, h - h // 6)))
        cv2.ellipse(
            img,
            centre,
            (w // 8, w // 26),
            float(rng.uniform(0, 180)),
            0,
            360,
            rng.integers(0, 255, 3).tolist(),
            -1,
        )
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def plain_loop(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        img = cv2.imread(str(p))
        if img is not None:
            cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
            n += 1
    return n


def ingest_path(paths: list[Path], workers: int) -> int:
    return sum(r.reason is None for r in decode_all(paths, SIZE, "pad", 8, workers))


def race(paths: list[Path], workers: int, repeats: int) -> tuple[float, float]:
    """Images per second of (ingest's path, the plain loop): alternating runs, best time of each."""
    plain_loop(paths)  # warm the page cache for both contenders
    best = {"ours": float("inf"), "plain": float("inf")}
    for _ in range(repeats):
        for name, fn in (("ours", lambda: ingest_path(paths, workers)), ("plain", lambda: plain_loop(paths))):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return len(paths) / best["ours"], len(paths) / best["plain"]


def run(quick: bool = False) -> list[dict]:
    try:
        workers = config.from_dict(config.Ingest, config.read_params()["ingest"], "ingest").workers
    except config.ConfigError:
        workers = 2  # run outside the repository root: the project default
    n, n_big = (120, 24) if quick else (300, 60)
    repeats = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        ours, base = race(make_jpegs(Path(tmp), n), workers, repeats)
        big_ours, big_base = race(make_jpegs(Path(tmp) / "big", n_big, size=(1280, 720)), workers, repeats)
    note = f"{n} JPEGs 320x240 -> {SIZE}px, best of {repeats}, ingest with {workers} worker processes"
    return [
        {
            "key": "ingest_speedup",
            "value": round(ours / base, 2),
            "target": 1.2,
            "unit": "x",
            "note": note + "; ours also hashes, checks and signs every file",
        },
        {
            "key": "ingest_images_per_s",
            "value": round(ours, 1),
            "target": None,
            "unit": "img/s",
            "note": note,
        },
        {
            "key": "ingest_baseline_images_per_s",
            "value": round(base, 1),
            "target": None,
            "unit": "img/s",
            "note": "single-process cv2.imread + cv2.resize, same files",
        },
        {
            "key": "ingest_speedup_1280x720",
            "value": round(big_ours / big_base, 2),
            "target": 2.0,
            "unit": "x",
            "note": f"{n_big} JPEGs 1280x720 (the real cameras' commonest size) -> {SIZE}px, same race",
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
