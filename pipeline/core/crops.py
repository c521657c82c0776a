"""Cutting the classifier's crop: a square around the localised fish, from the frame at its own resolution.

The crop stage cuts every training and test crop with `cut`, and the served model cuts its crops with the same
function, so the classifiers see the same pixels in both. A square keeps the fish's shape whatever its angle;
the margin keeps its fins and tail inside a box that is a little off; `min_side` keeps a tiny (or NoF) box
from zooming into a few pixels of deck. Parts of the square outside the frame are black, as the letterbox
padding is.
"""

from __future__ import annotations

import cv2
import numpy as np


def square(box: tuple[float, float, float, float], margin: float, min_side: float) -> tuple[int, int, int]:
    """(left, top, side) in frame pixels of the square centred on `box` (x, y, width, height)."""
    x, y, w, h = box
    side = max(max(w, h) * (1 + 2 * margin), min_side, 1.0)
    cx, cy = x + w / 2, y + h / 2
    side_px = int(round(side))
    return int(round(cx - side_px / 2)), int(round(cy - side_px / 2)), side_px


def cut(rgb: np.ndarray, box: tuple[float, float, float, float], margin: float, min_side: float,
        size: int) -> np.ndarray:
    """The `size` × `size` uint8 RGB crop of `rgb` around `box`."""
    left, top, side = square(box, margin, min_side)
    h, w = rgb.shape[:2]
    patch = np.zeros((side, side, 3), dtype=np.uint8)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)
    if x1 > x0 and y1 > y0:
        patch[y0 - top : y1 - top, x0 - left : x1 - left] = rgb[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)
