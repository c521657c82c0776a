"""Trains localiser folds in two processes until killed, for tests/test_localiser.py: prints its pid, then
`trained` or the error that ended it."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from pipeline.core.params import load
from pipeline.stages import localise


def main() -> None:
    s = load(localise.Settings)
    s = dataclasses.replace(s, localise=dataclasses.replace(
        s.localise, width=64, height=48, channels=8, crop_width=32, crop_height=32, views=1, steps=100_000,
        batch_size=4))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (8, 48, 64, 3), dtype=np.uint8)
    boxes = [np.array([[10.0, 10.0, 16.0, 8.0]]) for _ in frames]
    jobs = [localise.FoldJob(k, np.arange(8), seed=k, line=k) for k in range(2)]
    print(os.getpid(), flush=True)
    try:
        list(localise.trained_folds(jobs, frames, boxes, s, processes=2))
        print("trained", flush=True)
    except RuntimeError as exc:
        print(exc, flush=True)


if __name__ == "__main__":
    main()
