"""The cats-vs-dogs case's offline source: generated cartoon cats and dogs.

Pointed vs floppy or rounded ears, a short nose and whiskers vs a long snout, overlapping fur colours, on
varied backgrounds: enough for a random-initialised backbone's features to separate the classes, so the case
runs in seconds without a download.
"""

from __future__ import annotations

import cv2
import numpy as np

CAT_FUR = ((230, 140, 60), (150, 150, 150), (40, 40, 40), (235, 230, 220), (120, 90, 60), (200, 170, 120))
DOG_FUR = ((140, 90, 50), (40, 40, 40), (215, 175, 100), (235, 230, 220), (150, 150, 150), (100, 60, 30))


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


def _jitter(rng: np.random.Generator, colour, amount: float = 35.0) -> tuple[float, ...]:
    return tuple(float(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain, gradient, striped or blotchy: the backbone must not separate the classes by their setting."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.integers(0, 256, 3)
    kind, other = rng.integers(4), rng.integers(0, 256, 3)
    if kind == 1:
        t = np.linspace(0, 1, size)[:, None, None]
        img = img * (1 - t) + other * t
    elif kind == 2:
        img[:, np.arange(size) // int(rng.integers(3, 9)) % 2 == 1] = other
    elif kind == 3:
        for _ in range(int(rng.integers(3, 8))):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            cv2.circle(img, _pt(*rng.integers(0, size, 2)), int(rng.integers(2, size // 4)), colour, -1)
    return np.ascontiguousarray(img)


def draw_animal(rng: np.random.Generator, size: int, dog: bool) -> np.ndarray:
    """One cartoon cat or dog face; ears, eyes and snout carry the class, fur colours overlap."""
    img = _background(rng, size)
    s = size / 96
    cx, cy = size / 2 + rng.normal(0, 6 * s), size / 2 + rng.normal(4 * s, 5 * s)
    r = rng.uniform(20, 28) * s
    palette = DOG_FUR if dog else CAT_FUR
    fur = _jitter(rng, palette[rng.integers(len(palette))])
    dark = tuple(c * 0.5 for c in fur)
    if dog and rng.random() < 0.75:  # floppy ears hanging at the sides of the head
        for side in (-1, 1):
            cv2.ellipse(
                img,
                _pt(cx + side * r * 0.95, cy + r * 0.1),
                _pt(r * 0.35, r * 0.8),
                side * rng.uniform(5, 25),
                0,
                360,
                dark,
                -1,
            )
    elif dog:  # upright but rounded
        for side in (-1, 1):
            cv2.ellipse(
                img,
                _pt(cx + side * r * 0.6, cy - r * 0.8),
                _pt(r * 0.3, r * 0.45),
                side * 20,
                0,
                360,
                fur,
                -1,
            )
    else:  # pointed triangles with a pink inside
        for side in (-1, 1):
            b1, b2 = (cx + side * r * 0.2, cy - r * 0.7), (cx + side * r * 0.95, cy - r * 0.25)
            tip = (cx + side * r * 0.75, cy - r * 0.7 - r * rng.uniform(0.8, 1.1))
            cv2.fillPoly(img, [np.array([_pt(*b1), _pt(*tip), _pt(*b2)], np.int32)], fur)
            inner = [
                _pt(b1[0] * 0.8 + tip[0] * 0.2, b1[1] * 0.6 + tip[1] * 0.4),
                _pt(*tip),
                _pt(b2[0] * 0.8 + tip[0] * 0.2, b2[1] * 0.6 + tip[1] * 0.4),
            ]
            cv2.fillPoly(img, [np.array(inner, np.int32)], _jitter(rng, (220, 150, 160), 20))
    cv2.ellipse(img, _pt(cx, cy), _pt(r, r * rng.uniform(0.85, 1.0)), 0, 0, 360, fur, -1)
    if not dog and rng.random() < 0.5:  # tabby forehead stripes
        for k in (-1, 0, 1):
            cv2.line(
                img,
                _pt(cx + k * r * 0.3, cy - r * 0.95),
                _pt(cx + k * r * 0.25, cy - r * 0.55),
                dark,
                max(1, int(2 * s)),
            )
    for side in (-1, 1):  # eyes: round and dark for dogs, almond with a slit pupil for cats
        ex, ey = cx + side * r * 0.4, cy - r * 0.15
        if dog:
            cv2.circle(img, _pt(ex, ey), max(1, int(r * 0.12)), (30, 20, 10), -1)
        else:
            cv2.ellipse(
                img, _pt(ex, ey), _pt(r * 0.17, r * 0.11), 0, 0, 360, _jitter(rng, (160, 200, 60), 25), -1
            )
            cv2.ellipse(img, _pt(ex, ey), _pt(r * 0.03 + 1, r * 0.1), 0, 0, 360, (10, 10, 10), -1)
    if dog:  # a long, lighter snout with a big nose, sometimes a tongue
        length = r * rng.uniform(0.7, 1.0)
        snout = _jitter(rng, tuple(min(255.0, c * 1.15 + 20) for c in fur), 15)
        cv2.ellipse(img, _pt(cx, cy + r * 0.35), _pt(r * 0.45, length * 0.6), 0, 0, 360, snout, -1)
        cv2.ellipse(
            img, _pt(cx, cy + r * 0.35 + length * 0.35), _pt(r * 0.2, r * 0.13), 0, 0, 360, (15, 15, 15), -1
        )
        if rng.random() < 0.4:
            cv2.ellipse(
                img,
                _pt(cx, cy + r * 0.35 + length * 0.75),
                _pt(r * 0.15, r * 0.22),
                0,
                0,
                180,
                (230, 110, 130),
                -1,
            )
    else:  # a small pink nose and whiskers
        ny = cy + r * 0.25
        nose = np.array([_pt(cx - r * 0.1, ny), _pt(cx + r * 0.1, ny), _pt(cx, ny + r * 0.1)], np.int32)
        cv2.fillPoly(img, [nose], _jitter(rng, (230, 140, 150), 20))
        whisker = (235, 235, 235) if np.mean(fur) < 128 else (30, 30, 30)
        for side in (-1, 1):
            for k in (-1, 0, 1):
                cv2.line(
                    img,
                    _pt(cx + side * r * 0.2, ny + r * 0.15),
                    _pt(cx + side * r * 1.2, ny + r * 0.15 + k * r * 0.2),
                    whisker,
                    1,
                )
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.0))
    img += rng.normal(0, rng.uniform(3, 12), img.shape)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return np.clip(img, 0, 255).astype(np.uint8)


def demo_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` images, half cats (0) and half dogs (1) in a shuffled order."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    return np.stack([draw_animal(rng, size, bool(d)) for d in labels]), labels.astype(np.int64)
