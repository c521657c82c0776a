"""Benchmark: two localiser folds trained at once, each in its own process, against one after the other here.

The localise stage trains its fold nets `localise.processes` at a time (auto on CPUs: 2 or more). One fold leaves
much of two cores idle: a step of 32 crops is a few dozen small convolutions that two threads do not split well, and
between steps the process builds the next batch and waits on Python. The figure is the two folds' training time
one after the other in this process over their time side by side in two spawned processes (each the same
configured net, batch and threads; the weights are the same either way, tests/test_localiser.py checks it).
Starting the two processes (TensorFlow's import) is reported apart: the stage pays it once, not per fold.
Frames are noise with one box each, at the configured input size: a step costs the same whatever it shows.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from pipeline.core import params as config
from pipeline.stages import localise


def run(quick: bool = False) -> list[dict]:
    s = config.load(localise.Settings)
    steps = 200 if quick else 1200
    s = dataclasses.replace(s, localise=dataclasses.replace(s.localise, steps=steps))
    cfg, rng = s.localise, np.random.default_rng(0)
    frames = rng.integers(0, 255, (300, cfg.height, cfg.width, 3), dtype=np.uint8)
    boxes = [np.array([[rng.uniform(0, cfg.width - 30), rng.uniform(0, cfg.height - 12), 30.0, 12.0]])
             for _ in frames]
    jobs = [localise.FoldJob(k, np.arange(len(frames))[np.arange(len(frames)) % 5 != k], seed=k, line=k)
            for k in range(2)]
    started = time.perf_counter()
    apart = [seconds for _, seconds in localise.trained_folds(jobs, frames, boxes, s, processes=2)]
    apart_wall = time.perf_counter() - started
    here = [seconds for _, seconds in localise.trained_folds(jobs, frames, boxes, s, processes=1)]
    one_after_other, side_by_side = sum(here), max(apart)
    note = (f"2 folds x {steps} steps of {cfg.batch_size} crops {cfg.crop_width}x{cfg.crop_height}: "
            f"{one_after_other:.0f} s one after the other here, {side_by_side:.0f} s side by side")
    return [
        {"key": "localise_two_folds_speedup", "value": round(one_after_other / side_by_side, 2),
         "target": ">= 1.25", "unit": "x", "note": note},
        {"key": "localise_process_start_s", "value": round(apart_wall - side_by_side, 1), "target": None,
         "unit": "s", "note": "spawning the two fold processes and importing TensorFlow there, once a stage"},
    ]
