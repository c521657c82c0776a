"""Generate an offline stand-in for the Kaggle fisheries download, so the whole pipeline runs without it.

The folder it writes (`data.demo_dir`) has exactly Kaggle's layout (`train/<CLASS>/img_XXXXX.jpg`,
`test_stg1/img_XXXXX.jpg`, `test_stg2/image_XXXXX.jpg`, both sample submissions), the community's box
annotations of the training frames in their Sloth JSON format (`annotations/<class>_labels.json`, one file
per class with fish, none for NoF), plus the answers Kaggle never shipped: `solution.csv` (the test labels),
`solution_boxes.csv` (the test fish's true boxes) and `boats.csv` (the true boat of every frame). The frames
are drawn scenes, not noise, at the real cameras' scale: frames `demo.width` wide (640 by default) in the
real cameras' aspect ratios, on which the catch covers 3-15% of the width and the deck, the gear and the
crew the rest; now and then a haul of several fish, some lying across the frame's edge, some partly hidden
by a glove, a net, a hose or a crewman. They carry the traits that decided the real competition: a few
boats whose fixed cameras make their frames near-duplicates, night-vision frames, three tunas that differ
mostly in fin colour and length, skewed class shares, and a stage 2 made only of boats never seen in
training, with shifted shares. A whole-frame model sees a few pixels of fish: that is the point.
The annotation files are drawn as people drew the real ones: boxes a little loose (LABEL_JITTER), floats,
some starting at a negative x or y, a few entries with an empty list (EMPTY_ENTRY_SHARE), no box for a
fish hidden past recognition (MIN_BOXED).
Everything is seeded by `demo.seed`; every boat and every image has its own generator, so one frame can be
redrawn alone and the files are byte-identical from run to run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.core.competition import ANNOTATION_FILES, FISH_CLASSES, SUBMISSION_HEADER
from pipeline.core.params import Data, Demo, load, stage_parser

#: Kaggle's training counts; the demo's training and stage-1 shares follow them.
TRAIN_COUNTS = {"ALB": 1719, "BET": 200, "DOL": 117, "LAG": 67, "NoF": 465, "OTHER": 299, "SHARK": 176,
                "YFT": 734}
#: Stage 2 (new boats only) had twice the bigeye and a quarter of the sharks; other classes keep their ratios.
STAGE2_OVERRIDES = {"BET": 0.108, "SHARK": 0.012}
MIN_TRAIN_PER_CLASS = 5
#: The real camera sizes (width, height); the first three are the most common and so weigh most.
CAMERA_SIZES = ((1280, 720), (1280, 750), (1280, 974), (1192, 670), (1244, 700),
                (1276, 718), (1334, 750), (1518, 854), (1732, 974), (1280, 924))
CAMERA_WEIGHTS = (0.3, 0.2, 0.2, 0.05, 0.05, 0.05, 0.05, 0.04, 0.03, 0.03)
JPEG_QUALITY = 90
#: The folder of the community-format box files, inside the demo download (ingest's `data.annotations_dir`).
ANNOTATIONS = "annotations"
#: Share of annotated training frames whose entry lists no box, and how far a drawn box's edges stray from
#: the fish (a share of the box's side, one standard deviation).
EMPTY_ENTRY_SHARE = 0.02
LABEL_JITTER = 0.02


# The fish is drawn head-right on a fixed canvas, then rotated and scaled into the frame.
CANVAS_W, CANVAS_H = 320, 208
BODY_LEN, SNOUT_X, MID_Y = 160.0, 250.0, 104.0
PEDUNCLE_X = SNOUT_X - BODY_LEN
#: Total fish length (tail tip to nose) as a share of the frame width, per class, before the boat's camera
#: distance (`Boat.fish_scale`) and the bycatch kinds' own sizes; every fish ends up within LENGTH_LIMITS.
#: On the real boats the catch covers a few per cent to a sixth of the frame's width: the camera, the deck and
#: the crew fill the rest, which is what a whole-frame model learns instead of the fish.
FISH_LENGTH = {"ALB": (0.07, 0.11), "BET": (0.08, 0.13), "YFT": (0.08, 0.13), "DOL": (0.08, 0.13),
               "LAG": (0.06, 0.09), "SHARK": (0.11, 0.15), "OTHER": (0.06, 0.13)}
LENGTH_LIMITS = (0.03, 0.15)
#: Chance that a frame holds several fish of its class, and the most it holds. The community's boxes count
#: about 1.5 fish per ALB, BET and LAG frame, 1.3 per OTHER, 1.1 per DOL, SHARK and YFT (NCFM.md), up to nine
#: albacore in one frame; beyond the first, a count is 1 + Geometric(0.6), capped.
SEVERAL_FISH = {"ALB": (0.3, 9), "BET": (0.3, 4), "DOL": (0.06, 2), "LAG": (0.3, 3), "OTHER": (0.2, 3),
                "SHARK": (0.1, 2), "YFT": (0.1, 3)}
#: Share of fish lying across the frame's edge, so that their boxes start at a negative x or y or end past
#: the width or height, as a few of the real boxes do.
EDGE_SHARE = 0.04
#: What partly hides the main fish, by frame: a gloved hand, a patch of net, gear dropped on it (exclusive
#: choices), and, independently, a crewman handling it (his arms and gloves over it).
GLOVE_SHARE, NET_SHARE, GEAR_SHARE, PERSON_SHARE = 0.14, 0.06, 0.07, 0.15
#: A glove on a fish is at most this share of the fish's length across: a hand holds a small fish, never hides it.
GLOVE_CAP = 0.18
#: Crew or gear that would leave less than this share of the main fish in view is left out of the frame.
MIN_VISIBLE = 0.4
#: A fish less than this much in view gets no box: a person drawing boxes would not see it. (Only fish beside
#: the main one can end up so hidden, under the main fish or the crew.)
MIN_BOXED = 0.25
#: How far the mast sways between frames, as a share of the frame width, in x and y.
SWAY = 0.008
DECK_RELIEF = 0.5


def _rgb(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32) / 255.0


# Decks and boat paint are mostly the washed-out greys, whites and blues of working boats; the saturated
# yellows, greens and reds that set some fish apart turn up only on the crew and their loose gear, which
# move from frame to frame. Saturated fixtures would tie those colours to a boat, and with six boats a
# model would learn the boat instead of the fish.
DECK_COLOURS = [_rgb(132, 138, 142), _rgb(140, 140, 135), _rgb(118, 126, 120), _rgb(140, 130, 118),
                _rgb(116, 116, 120), _rgb(110, 118, 130), _rgb(140, 136, 128), _rgb(126, 132, 138)]
PAINT_COLOURS = [_rgb(205, 125, 70), _rgb(70, 95, 150), _rgb(222, 222, 215), _rgb(35, 35, 38),
                 _rgb(140, 140, 145), _rgb(170, 178, 186), _rgb(60, 62, 70)]
GEAR_COLOURS = [_rgb(215, 125, 55), _rgb(205, 190, 80), _rgb(60, 90, 160), _rgb(222, 222, 215),
                _rgb(80, 130, 80), _rgb(30, 30, 32), _rgb(170, 60, 55)]


def _pick(rng: np.random.Generator, palette: list[np.ndarray]) -> np.ndarray:
    return palette[rng.integers(len(palette))]


# ------------------------------------------------------------------------------------------------ plan


def allocate(n: int, shares: np.ndarray, minimum: int = 0) -> np.ndarray:
    """Split `n` into integer counts proportional to `shares` (largest remainder), each at least `minimum`.

    The floor is taken from the largest counts, so the rare classes reach it without distorting the rest.
    """
    shares = np.asarray(shares, dtype=np.float64) / np.sum(shares)
    if minimum * len(shares) > n:
        raise ValueError(f"cannot give each of {len(shares)} parts {minimum} of only {n}")
    exact = shares * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    while counts.min() < minimum:
        counts[np.argmin(counts)] += 1
        counts[np.argmax(counts)] -= 1
    return counts


def class_shares(stage: int) -> np.ndarray:
    """Class shares in `FISH_CLASSES` order: the real training shares, or stage 2's shifted ones."""
    train = np.array([TRAIN_COUNTS[c] for c in FISH_CLASSES], dtype=np.float64)
    train /= train.sum()
    if stage != 2:
        return train
    fixed = np.array([STAGE2_OVERRIDES.get(c, np.nan) for c in FISH_CLASSES])
    free = np.isnan(fixed)
    out = fixed.copy()
    out[free] = train[free] / train[free].sum() * (1.0 - np.nansum(fixed))
    return out


def _interleave(rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
    """Indices `i` repeated `counts[i]` times, ordered so that any stretch holds each index near its share."""
    keys = np.concatenate([(np.arange(c) + rng.uniform()) / c for c in counts])
    return np.repeat(np.arange(len(counts)), counts)[np.argsort(keys, kind="stable")]


def plan(cfg: Demo) -> pd.DataFrame:
    """Every image to draw: `key` (seeds its generator), `image` (manifest id), `path` (inside the folder),
    `split`, `label`, `boat` and `night`.

    Train and stage-1 numbers come from one shuffled numbering and stage-2 numbers are shuffled too, so a
    file name says nothing about its class, boat or split. Boats `0 .. train_boats-1` fill train and
    stage 1; boats `train_boats ..` appear only in stage 2, as on Kaggle.
    """
    if cfg.n_train < MIN_TRAIN_PER_CLASS * len(FISH_CLASSES):
        raise ValueError(f"demo.n_train must be at least {MIN_TRAIN_PER_CLASS * len(FISH_CLASSES)}")
    if cfg.train_boats < 1 or (cfg.n_test_stg2 > 0 and cfg.new_boats < 1):
        raise ValueError("demo.train_boats must be at least 1, and demo.new_boats too if there is a stage 2")
    if cfg.n_train + cfg.n_test_stg1 > 99_999 or cfg.n_test_stg2 > 99_999:
        raise ValueError("image numbers have five digits: at most 99,999 images per numbering")
    if not 0.0 <= cfg.night_share <= 1.0 or cfg.width < 64 or min(cfg.n_test_stg1, cfg.n_test_stg2) < 0:
        raise ValueError("demo.night_share must lie in [0, 1], demo.width be at least 64, test sizes >= 0")
    if cfg.burst < 1.0:
        raise ValueError("demo.burst (mean frames per catch) must be at least 1")
    rng = np.random.default_rng([cfg.seed, 0])
    # Uneven boats, as on Kaggle where a few boats shot most of the frames.
    train_boats = np.arange(cfg.train_boats)
    new_boats = np.arange(cfg.train_boats, cfg.train_boats + cfg.new_boats)
    train_weights = rng.dirichlet(np.full(cfg.train_boats, 3.0))
    new_weights = rng.dirichlet(np.full(max(cfg.new_boats, 1), 3.0))[: cfg.new_boats]

    parts = []
    for split, n, stage, boats, weights, floor in (
        ("train", cfg.n_train, 1, train_boats, train_weights, MIN_TRAIN_PER_CLASS),
        ("test_stg1", cfg.n_test_stg1, 1, train_boats, train_weights, 0),
        ("test_stg2", cfg.n_test_stg2, 2, new_boats, new_weights, 0),
    ):
        if n == 0:
            continue
        labels = np.repeat(FISH_CLASSES, allocate(n, class_shares(stage), floor))
        # Each class is spread over the boats in their shares: in a few hundred frames, chance ties between
        # a boat and a class would be the easiest thing for a model to learn, and the least true.
        boat = boats[_interleave(rng, allocate(n, weights, 1 if n >= len(boats) else 0))]
        order = rng.permutation(n)
        parts.append(pd.DataFrame({"split": split, "label": labels[order], "boat": boat[order]}))
    rows = pd.concat(parts, ignore_index=True)
    rows["event"] = _bursts(rng, rows, cfg.burst)
    rows["night"] = _night_events(rng, rows, cfg.night_share)

    first = (rows.split != "test_stg2").to_numpy()
    numbers = np.zeros(len(rows), dtype=int)
    pool = min(100_000, max(2 * int(first.sum()), 100))
    numbers[first] = rng.choice(pool, int(first.sum()), replace=False)
    numbers[~first] = rng.permutation(int((~first).sum())) + 1
    rows["image"] = [f"img_{k:05d}.jpg" if f else f"test_stg2/image_{k:05d}.jpg"
                     for k, f in zip(numbers, first, strict=True)]
    rows["path"] = [
        f"train/{lab}/{img}" if split == "train" else (f"test_stg1/{img}" if split == "test_stg1" else img)
        for split, lab, img in zip(rows.split, rows.label, rows.image, strict=True)
    ]
    rows.insert(0, "key", np.arange(len(rows)))
    return rows[["key", "image", "path", "split", "label", "boat", "event", "night"]]


def _bursts(rng: np.random.Generator, rows: pd.DataFrame, burst: float) -> np.ndarray:
    """Event number of every row: the frames one catch was filmed in.

    The cameras record video, so one fish on deck shows up in a run of nearly identical frames; that, more
    than the deck, is what a random split leaks. Runs are 1 + Poisson(`burst` - 1) frames of one boat and
    class. Train and stage 1 come from the same trips, so a run may straddle them (Kaggle's stage-1 test
    held near-copies of training frames); stage 2 has runs of its own.
    """
    event = np.empty(len(rows), dtype=int)
    stage = np.where(rows.split == "test_stg2", 2, 1)
    number = 0
    for idx in rows.groupby([stage, rows.boat, rows.label], sort=True).indices.values():
        idx = rng.permutation(idx)
        while len(idx):
            size = 1 + int(rng.poisson(burst - 1.0))
            event[idx[:size]] = number
            idx, number = idx[size:], number + 1
    return event


def _night_events(rng: np.random.Generator, rows: pd.DataFrame, share: float) -> np.ndarray:
    """Night flag of every row, a whole event at a time, so that each stage's night share is close to `share`.

    Chosen within each class, so that no class is mostly filmed at night: with a few events per rare class, a
    draw over the whole stage can give one class half its frames at night and another none, a cue that has
    nothing to do with the fish.
    """
    night = np.zeros(len(rows), dtype=bool)
    stage2 = (rows.split == "test_stg2").to_numpy()
    for in_stage in (~stage2, stage2):
        for label in FISH_CLASSES:
            chosen = in_stage & (rows.label == label).to_numpy()
            target, taken = share * chosen.sum(), 0
            for event in rng.permutation(rows.event[chosen].unique()):
                frames = (rows.event == event).to_numpy()
                if abs(taken + frames.sum() - target) < abs(taken - target):
                    night |= frames
                    taken += int(frames.sum())
    return night


# ----------------------------------------------------------------------------------------- the boats


@dataclass(frozen=True, eq=False)
class Boat:
    """One boat and its fixed camera: the frame size, the static deck with fixtures, and its lighting."""

    boat_id: int
    width: int
    height: int
    deck: np.ndarray  # float32 (H, W, 3) in [0, 1], unlit
    light: np.ndarray  # float32 (H, W, 1), multiplied in after everything is drawn
    shadow: tuple[float, float]  # which way shadows fall: a unit vector, away from the light
    fish_scale: float  # the camera's distance from the deck: every fish on this boat looks this much larger


def _noise(rng: np.random.Generator, h: int, w: int, cell: float, aspect: float = 1.0) -> np.ndarray:
    """Smooth noise of about unit spread; `aspect` > 1 stretches it along x (wood grain)."""
    gh = max(2, int(h / cell) + 2)
    gw = max(2, int(w / (cell * aspect)) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _deck_texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray) -> np.ndarray:
    """A flat deck of planks, painted stripes, non-slip speckle or a rubber mat, before the perspective."""
    kind = rng.choice(["planks", "stripes", "speckle", "mat"])
    shade = np.zeros((h, w), np.float32)
    ys, xs = np.mgrid[0:h, 0:w]
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = base
    if kind == "planks":
        pw = rng.uniform(0.04, 0.08) * w
        plank = (ys / pw).astype(int)
        shade += rng.normal(0, 0.07, plank.max() + 1).astype(np.float32)[plank]
        shade += 0.05 * _noise(rng, h, w, 3, aspect=12)
        shade -= 0.35 * (ys % pw < max(1.0, pw * 0.1))
        joints = rng.uniform(0, w, plank.max() + 1)[plank]
        shade -= 0.25 * (np.abs((xs - joints) % (w * 0.6)) < 1.2)
    elif kind == "stripes":
        shade += 0.05 * _noise(rng, h, w, 20)
        paint = _pick(rng, PAINT_COLOURS)
        for _ in range(rng.integers(1, 4)):
            y0, thick = rng.uniform(0, h), rng.uniform(0.02, 0.06) * h
            band = (np.abs(ys - y0) < thick)[..., None]
            tex = np.where(band, 0.45 * paint + 0.55 * base, tex)
        shade += 0.06 * (_noise(rng, h, w, 2) > 1.2)
    elif kind == "speckle":
        shade += 0.09 * rng.standard_normal((h, w)).astype(np.float32) + 0.08 * _noise(rng, h, w, 25)
    else:
        step = rng.uniform(0.025, 0.045) * w
        shade -= 0.22 * ((xs % step < 1.5) | (ys % step < 1.5))
        shade += 0.04 * _noise(rng, h, w, 30)
    # Grime and wear: the large soft blotches every working deck has.
    shade += 0.06 * _noise(rng, h, w, max(h, w) / 4)
    return np.clip(tex * (1.0 + DECK_RELIEF * shade[..., None]), 0, 1)


def _camera_warp(rng: np.random.Generator, flat: np.ndarray, w: int, h: int) -> np.ndarray:
    """Project the flat deck as a tilted, rolled camera sees it: the lines converge towards the far side."""
    tilt, roll = rng.uniform(0.15, 0.45), np.deg2rad(rng.uniform(-12, 12))
    quad = np.array([[-tilt * w, -0.1 * h], [w * (1 + tilt), -0.1 * h], [w * 1.1, h * 1.1],
                     [-0.1 * w, h * 1.1]], np.float32)
    if rng.random() < 0.5:  # the camera looks the other way along the deck
        quad[:, 1] = h - quad[:, 1]
    quad = np.roll(quad, int(rng.integers(4)), axis=0)  # planks run across or along the view
    centre = np.array([w / 2, h / 2], np.float32)
    rot = np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]], np.float32)
    quad = (quad - centre) @ rot.T * 1.3 + centre  # enlarged so the rolled deck still fills the frame
    fh, fw = flat.shape[:2]
    src = np.array([[0, 0], [fw, 0], [fw, fh], [0, fh]], np.float32)
    return cv2.warpPerspective(flat, cv2.getPerspectiveTransform(src, quad), (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)


def _bezier(p: np.ndarray, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]


def _pts(points: np.ndarray) -> list[np.ndarray]:
    """Sub-pixel polygon vertices for OpenCV drawing calls made with shift=3."""
    return [np.round(np.asarray(points, np.float64) * 8).astype(np.int32).reshape(-1, 1, 2)]


def _ipt(p: np.ndarray) -> tuple[int, int]:
    return int(p[0]), int(p[1])


def _rail(rng: np.random.Generator, img: np.ndarray) -> None:
    """Open sea or the inside of the hull along one side, behind a rail with its posts."""
    h, w = img.shape[:2]
    side = rng.integers(4)  # top, right, bottom, left
    depth = rng.uniform(0.08, 0.2) * (h if side in (0, 2) else w)
    ys, xs = np.mgrid[0:h, 0:w]
    beyond = {0: ys < depth, 1: xs > w - depth, 2: ys > h - depth, 3: xs < depth}[side]
    if rng.random() < 0.55:  # choppy sea
        sea = _rgb(52, 78, 94) * rng.uniform(0.7, 1.3)
        waves = 0.12 * _noise(rng, h, w, 4, aspect=5) + 0.05 * rng.standard_normal((h, w)).astype(np.float32)
        img[beyond] = np.clip(sea * (1 + waves[..., None]), 0, 1)[beyond]
    else:
        hull = _pick(rng, DECK_COLOURS) * rng.uniform(0.8, 1.1)
        img[beyond] = np.clip(hull * (1 + 0.04 * _noise(rng, h, w, 15))[..., None], 0, 1)[beyond]
    rail = _pick(rng, PAINT_COLOURS) * 0.8 + 0.15
    shine = np.minimum(rail + 0.25, 1).tolist()
    thick = max(2, int(0.018 * w))
    if side in (0, 2):
        y = int(depth if side == 0 else h - depth)
        cv2.line(img, (0, y), (w, y), rail.tolist(), thick, cv2.LINE_AA)
        cv2.line(img, (0, y - thick // 2), (w, y - thick // 2), shine, 1)
        for x in np.arange(rng.uniform(0, 40), w, rng.uniform(0.12, 0.2) * w):
            cv2.line(img, (int(x), 0 if side == 0 else h), (int(x), y), rail.tolist(), thick, cv2.LINE_AA)
    else:
        x = int(w - depth if side == 1 else depth)
        cv2.line(img, (x, 0), (x, h), rail.tolist(), thick, cv2.LINE_AA)
        cv2.line(img, (x - thick // 2, 0), (x - thick // 2, h), shine, 1)
        for y in np.arange(rng.uniform(0, 40), h, rng.uniform(0.15, 0.25) * h):
            cv2.line(img, (x, int(y)), (w if side == 1 else 0, int(y)), rail.tolist(), thick, cv2.LINE_AA)


def _add_fixtures(rng: np.random.Generator, img: np.ndarray) -> None:
    """What is bolted to a boat: a rail, a fish box, usually a hose, maybe a hatch and a coil of rope."""
    h, w = img.shape[:2]
    _rail(rng, img)

    bw, bh = rng.uniform(0.12, 0.2) * w, rng.uniform(0.1, 0.17) * w
    cx, cy = rng.choice([rng.uniform(0.1, 0.25), rng.uniform(0.75, 0.9)]) * w, rng.uniform(0.25, 0.8) * h
    box_col = 0.55 * _pick(rng, PAINT_COLOURS) * rng.uniform(0.75, 1.0) + 0.45 * img[int(cy), int(cx)]
    corners = cv2.boxPoints(((float(cx), float(cy)), (float(bw), float(bh)), float(rng.uniform(-20, 20))))
    cv2.fillPoly(img, _pts(corners + [3, 4]), (box_col * 0.45).tolist(), cv2.LINE_AA, shift=3)  # its side
    cv2.fillPoly(img, _pts(corners), box_col.tolist(), cv2.LINE_AA, shift=3)
    inner = (corners - [cx, cy]) * 0.8 + [cx, cy]
    cv2.polylines(img, _pts(inner), True, (box_col * 0.7).tolist(), max(1, int(0.006 * w)), cv2.LINE_AA,
                  shift=3)

    if rng.random() < 0.85:  # a hose snaking in from an edge
        hose = _pick(rng, PAINT_COLOURS)
        ctrl = rng.uniform([0, 0], [w, h], (4, 2))
        ctrl[0] = [rng.choice([0, w]), rng.uniform(0, h)]
        curve = _bezier(ctrl)
        thick = max(2, int(rng.uniform(0.012, 0.022) * w))
        cv2.polylines(img, _pts(curve + 2), False, (hose * 0.3).tolist(), thick, cv2.LINE_AA, shift=3)
        cv2.polylines(img, _pts(curve), False, hose.tolist(), thick, cv2.LINE_AA, shift=3)
        cv2.polylines(img, _pts(curve - 1), False, np.minimum(hose + 0.3, 1).tolist(), 1, cv2.LINE_AA,
                      shift=3)
    if rng.random() < 0.5:  # a hatch cover let into the deck
        hx, hy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.35, 0.75) * h
        hs = rng.uniform(0.1, 0.18) * w
        cv2.rectangle(img, (int(hx - hs), int(hy - hs * 0.7)), (int(hx + hs), int(hy + hs * 0.7)),
                      (img[int(hy), int(hx)] * 0.6).tolist(), max(1, int(0.008 * w)), cv2.LINE_AA)
    if rng.random() < 0.4:
        rx, ry, rr = rng.uniform(0.1, 0.9) * w, rng.uniform(0.2, 0.9) * h, rng.uniform(0.04, 0.07) * w
        rope = _rgb(200, 180, 120) * rng.uniform(0.6, 1.1)
        for k in range(4):
            cv2.circle(img, (int(rx), int(ry)), int(rr * (1 - 0.18 * k)), rope.tolist(), 2, cv2.LINE_AA)


def draw_boat(rng: np.random.Generator, boat_id: int, width: int) -> Boat:
    """A boat: its camera's frame size, deck colour and texture, perspective, fixtures and lighting."""
    cam_w, cam_h = CAMERA_SIZES[rng.choice(len(CAMERA_SIZES), p=CAMERA_WEIGHTS)]
    height = max(2, int(round(width * cam_h / cam_w / 2)) * 2)
    base = _pick(rng, DECK_COLOURS) * rng.uniform(0.9, 1.05) * rng.uniform(0.96, 1.04, 3).astype(np.float32)
    flat = _deck_texture(rng, height, width, np.clip(base, 0, 1))
    deck = np.ascontiguousarray(_camera_warp(rng, flat, width, height))
    _add_fixtures(rng, deck)

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (xs / width - 0.5) * np.cos(angle) + (ys / height - 0.5) * np.sin(angle)
    vignette = 1.0 - rng.uniform(0.05, 0.25) * (((xs / width - 0.5) ** 2 + (ys / height - 0.5) ** 2) * 2)
    light = rng.uniform(0.9, 1.08) * (1.0 + rng.uniform(0.05, 0.25) * gradient) * vignette
    cast = rng.uniform(0.94, 1.06, 3).astype(np.float32)  # the camera's white balance
    deck = np.clip(deck * cast, 0, 1).astype(np.float32)
    shadow = (float(-np.cos(angle)), float(-np.sin(angle)))
    # Drawn last, so the deck and its light stay what they were before the fish had a scale of their own.
    fish_scale = float(rng.uniform(0.85, 1.15))
    return Boat(boat_id, width, height, deck, light[..., None].astype(np.float32), shadow, fish_scale)


# ------------------------------------------------------------------------------------------- the fish


def _jitter(rng: np.random.Generator, colour: np.ndarray, amount: float = 0.08) -> np.ndarray:
    return np.clip(colour * rng.uniform(1 - amount, 1 + amount, 3), 0, 1).astype(np.float32)


def fish_spec(rng: np.random.Generator, label: str) -> dict:
    """The look of one fish of class `label`: body shape, colours, fins, tail and pattern.

    The three tunas share body colours and differ in what the real ones differ in: the albacore's very long
    pectoral fin and white-edged tail, the bigeye's deep body, big eye and dusky-yellow fins, the yellowfin's
    gold side stripe and long, bright yellow second dorsal and anal fins; the ranges overlap on purpose.
    Fins are (start, end, height): start and end along the body from tail (0) to nose (1), height in body
    depths.
    """
    s = {"elong": 4.0, "a": 0.9, "b": 0.75, "ped": 0.09, "lat": rng.uniform(0.45, 0.6),
         "back": _jitter(rng, _rgb(28, 38, 76)), "belly": _jitter(rng, _rgb(192, 196, 206)),
         "band": None, "pattern": None, "tail": "lunate", "tail_depth": 0.2, "tail_span": 1.1,
         "tail_edge": None, "dorsal1": (0.56, 0.68, 0.25), "dorsal2": (0.38, 0.45, 0.3),
         "anal": (0.36, 0.43, 0.3), "finlets": True, "pectoral": 0.2, "eye": 0.065, "bill": 0.0,
         "pec_edge": None, "finlet_size": 1.0, "band_width": 0.06, "size": 1.0}
    fin_dark = _jitter(rng, _rgb(50, 55, 68), 0.15)
    s.update(fin_d1=fin_dark, fin_d2=fin_dark, fin_anal=fin_dark, fin_tail=fin_dark, fin_pec=fin_dark,
             finlet=fin_dark)
    if label == "ALB":
        dusky = (_rgb(150, 140, 90) * rng.uniform(0.5, 1.0)).astype(np.float32)
        s.update(elong=rng.uniform(3.1, 3.7), pectoral=rng.uniform(0.42, 0.55), tail_edge=_rgb(240, 240, 236),
                 back=_jitter(rng, _rgb(78, 104, 150)), belly=_jitter(rng, _rgb(228, 232, 240), 0.04),
                 lat=rng.uniform(0.3, 0.42), fin_pec=_jitter(rng, _rgb(60, 72, 100), 0.1),
                 pec_edge=_rgb(240, 240, 236), dorsal2=(0.38, 0.45, rng.uniform(0.22, 0.35)), fin_d2=dusky,
                 band=(_rgb(150, 175, 215), 0.4, rng.uniform(0.3, 0.6)))
    elif label == "BET":
        yellow = _jitter(rng, _rgb(245, 210, 40), 0.1)
        dusky = 0.6 * yellow + 0.4 * fin_dark
        s.update(elong=rng.uniform(2.5, 3.0), pectoral=rng.uniform(0.24, 0.34), eye=rng.uniform(0.09, 0.11),
                 back=_jitter(rng, _rgb(30, 16, 50)), belly=_jitter(rng, _rgb(200, 190, 215)),
                 lat=rng.uniform(0.55, 0.68), dorsal2=(0.38, 0.45, rng.uniform(0.3, 0.5)),
                 anal=(0.36, 0.43, rng.uniform(0.3, 0.5)), fin_d2=dusky, fin_anal=dusky, finlet=yellow,
                 finlet_size=1.8, band=(_rgb(120, 70, 200), 0.4, rng.uniform(0.5, 0.8)))
    elif label == "YFT":
        yellow = _jitter(rng, _rgb(250, 205, 25), 0.08)
        s.update(elong=rng.uniform(3.2, 3.8), pectoral=rng.uniform(0.17, 0.26),
                 dorsal2=(0.37, 0.45, rng.uniform(0.7, 1.1)), anal=(0.35, 0.43, rng.uniform(0.7, 1.1)),
                 fin_d2=yellow, fin_anal=yellow, finlet=yellow, fin_tail=0.5 * yellow + 0.5 * fin_dark,
                 band=(_rgb(250, 200, 30), 0.42, rng.uniform(0.75, 1.0)), band_width=0.12,
                 pattern=("bars", _rgb(225, 228, 235), 0.25))
    elif label == "DOL":
        green, gold = _jitter(rng, _rgb(30, 180, 150), 0.15), _jitter(rng, _rgb(175, 220, 50), 0.1)
        fin = _jitter(rng, _rgb(30, 120, 200), 0.15)
        s.update(elong=rng.uniform(3.6, 4.4), a=1.3, b=0.35, back=green, belly=gold,
                 lat=rng.uniform(0.35, 0.5), tail="forked", tail_depth=0.22, tail_span=1.3,
                 dorsal1=(0.1, 0.93, 0.22), dorsal2=None, anal=(0.08, 0.45, 0.2), finlets=False,
                 pectoral=0.12, fin_d1=fin, fin_anal=fin, fin_tail=0.5 * fin + 0.5 * gold, fin_pec=gold,
                 pattern=("spots", _rgb(40, 90, 170), 0.8))
    elif label == "LAG":
        red = _jitter(rng, _rgb(215, 35, 35), 0.1)
        s.update(elong=rng.uniform(1.6, 2.0), a=0.7, b=0.55, ped=0.12, back=_jitter(rng, _rgb(150, 60, 95)),
                 belly=_jitter(rng, _rgb(230, 120, 120)), tail_depth=0.18, tail_span=0.7,
                 dorsal1=(0.55, 0.75, 0.65), dorsal2=(0.15, 0.5, 0.08), anal=(0.15, 0.45, 0.08),
                 finlets=False, pectoral=0.25, eye=0.07, fin_d1=red, fin_d2=red, fin_anal=red, fin_tail=red,
                 fin_pec=red, pattern=("spots", _rgb(238, 238, 235), 1.0))
    elif label == "SHARK":
        # Mostly blue sharks, the longliners' usual shark: a vivid indigo back; the rest silky or mako grey.
        blue = rng.random() < 0.7
        grey = _jitter(rng, _rgb(60, 110, 230) if blue else _rgb(112, 116, 122), 0.1)
        s.update(elong=rng.uniform(5.0, 6.5), a=1.0, b=0.65, ped=0.12, back=grey,
                 belly=_jitter(rng, _rgb(215, 215, 208)), lat=rng.uniform(0.55, 0.7), tail="shark",
                 tail_depth=0.28, tail_span=1.6, dorsal1=(0.48, 0.62, rng.uniform(0.8, 1.1)),
                 dorsal2=(0.12, 0.17, 0.25), anal=(0.12, 0.17, 0.2), finlets=False, pectoral=0.2, eye=0.04,
                 fin_d1=grey, fin_d2=grey, fin_anal=grey, fin_tail=grey, fin_pec=grey * 0.9)
    elif label == "OTHER":
        s.update(_odd_fish(rng))
    else:
        raise ValueError(f"no fish is drawn for {label!r}")
    return s


def _odd_fish(rng: np.random.Generator) -> dict:
    """One of the bycatch kinds lumped into OTHER: snapper, wahoo, marlin, sunfish, triggerfish or escolar."""
    kind = rng.choice(["snapper", "wahoo", "marlin", "sunfish", "trigger", "escolar"])
    if kind == "snapper":
        red = _jitter(rng, _rgb(200, 70, 70), 0.15)
        return dict(elong=rng.uniform(2.5, 3.0), back=red, belly=_jitter(rng, _rgb(232, 165, 150)),
                    tail="forked", dorsal1=(0.25, 0.7, 0.3), dorsal2=None, anal=(0.2, 0.35, 0.25),
                    finlets=False, fin_d1=red, fin_anal=red, fin_tail=red, fin_pec=red, pectoral=0.18)
    if kind == "wahoo":
        steel = _jitter(rng, _rgb(45, 75, 115), 0.15)
        return dict(elong=rng.uniform(7.0, 9.0), back=steel, belly=_jitter(rng, _rgb(200, 205, 210)),
                    dorsal1=(0.35, 0.75, 0.12), dorsal2=None, pectoral=0.08,
                    pattern=("stripes", steel * 0.5, 0.8), fin_d1=steel, fin_tail=steel)
    if kind == "marlin":
        blue = _jitter(rng, _rgb(25, 45, 95), 0.15)
        return dict(elong=rng.uniform(5.5, 7.0), back=blue, belly=_jitter(rng, _rgb(205, 210, 220)), bill=0.3,
                    tail_span=1.4, dorsal1=(0.55, 0.85, 0.7), dorsal2=None, finlets=False,
                    pattern=("stripes", _rgb(120, 170, 230), 0.6), fin_d1=blue, fin_tail=blue)
    if kind == "sunfish":
        grey = _jitter(rng, _rgb(145, 145, 138), 0.12)
        return dict(elong=rng.uniform(1.3, 1.6), size=0.6, a=0.6, b=0.6, ped=0.5, back=grey, belly=grey * 1.2,
                    tail="truncate", tail_depth=0.06, tail_span=0.9, dorsal1=(0.12, 0.25, 0.9), dorsal2=None,
                    anal=(0.12, 0.25, 0.9), finlets=False, fin_d1=grey, fin_anal=grey, fin_tail=grey,
                    pectoral=0.08, eye=0.05)
    if kind == "trigger":
        brown = _jitter(rng, _rgb(125, 102, 80), 0.15)
        return dict(elong=rng.uniform(2.0, 2.4), size=0.75, back=brown, belly=_jitter(rng, _rgb(175, 160, 140)),
                    tail="truncate", tail_depth=0.12, dorsal1=(0.2, 0.4, 0.5), dorsal2=(0.55, 0.62, 0.3),
                    anal=(0.2, 0.4, 0.45), finlets=False, fin_d1=brown, fin_d2=brown, fin_anal=brown,
                    fin_tail=brown, pattern=("spots", _rgb(80, 120, 170), 0.5))
    black = _jitter(rng, _rgb(62, 52, 46), 0.15)
    return dict(elong=rng.uniform(4.2, 5.0), back=black, belly=black * 1.3, tail="forked", finlets=True,
                dorsal2=(0.35, 0.45, 0.3), fin_d1=black, fin_d2=black, fin_anal=black, fin_tail=black,
                finlet=black)


def _fill(rgb: np.ndarray, alpha: np.ndarray, points: np.ndarray, colour: np.ndarray) -> None:
    """Paint a polygon onto the canvas, touching only its bounding box (the generator's hot loop)."""
    points = np.asarray(points, np.float64)
    x0, y0 = np.maximum(np.floor(points.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 2, [alpha.shape[1], alpha.shape[0]])
    if x1 <= x0 or y1 <= y0:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, _pts(points - [x0, y0]), 255, cv2.LINE_AA, shift=3)
    m = mask.astype(np.float32) * np.float32(1 / 255)
    box = rgb[y0:y1, x0:x1]
    box += (colour - box) * m[..., None]
    np.maximum(alpha[y0:y1, x0:x1], m, out=alpha[y0:y1, x0:x1])


def _tail(s: dict, depth: float) -> np.ndarray:
    td, span, pw = s["tail_depth"] * BODY_LEN, s["tail_span"] * depth, s["ped"] * depth / 2 + 1
    x0, xp, y = PEDUNCLE_X + 4, PEDUNCLE_X, MID_Y
    if s["tail"] == "shark":  # the long upper lobe of a shark's tail
        return np.array([(x0, y - pw), (xp - td, y - span * 0.55), (xp - td * 0.75, y - span * 0.4),
                         (xp - td * 0.3, y + span * 0.05), (xp - td * 0.45, y + span * 0.3), (x0, y + pw)])
    if s["tail"] == "truncate":
        return np.array([(x0, y - pw), (xp - td, y - span / 2), (xp - td, y + span / 2), (x0, y + pw)])
    notch, inner = (0.35, 0.55) if s["tail"] == "lunate" else (0.45, 0.7)
    return np.array([(x0, y - pw), (xp - td, y - span / 2), (xp - td * inner, y - span * 0.15),
                     (xp - td * notch, y), (xp - td * inner, y + span * 0.15), (xp - td, y + span / 2),
                     (x0, y + pw)])


def render_fish(rng: np.random.Generator, s: dict) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Draw the fish `s` head-right on the canvas: premultiplied RGB, alpha, and its x extent (tail, nose)."""
    rgb = np.zeros((CANVAS_H, CANVAS_W, 3), np.float32)
    alpha = np.zeros((CANVAS_H, CANVAS_W), np.float32)
    depth = BODY_LEN / s["elong"]
    t = np.linspace(0, 1, 48)
    prof = t ** s["a"] * (1 - t) ** s["b"]
    prof = np.maximum((prof / prof.max()) ** 0.75, s["ped"] * (1 - t))  # fuller than a bare beta curve
    top, bottom = MID_Y - depth / 2 * prof, MID_Y + depth / 2 * prof

    def edge_point(tt: float, sign: float) -> tuple[float, float]:
        return PEDUNCLE_X + tt * BODY_LEN, float(np.interp(tt, t, top if sign > 0 else bottom))

    # Tail and fins first: the body covers their roots.
    tail = _tail(s, depth)
    _fill(rgb, alpha, tail, s["fin_tail"])
    if s["tail_edge"] is not None:
        cv2.polylines(rgb, _pts(tail[1:-1]), False, s["tail_edge"].tolist(), 2, cv2.LINE_AA, shift=3)
    fins = (("dorsal1", "fin_d1", 1.0), ("dorsal2", "fin_d2", 1.0), ("anal", "fin_anal", -1.0))
    for key, colour, sign in fins:
        if s[key] is None:
            continue
        t0, t1, height = s[key]
        (xa, ya), (xb, yb) = edge_point(t0, sign), edge_point(t1, sign)
        reach = height * depth
        tip_y = min(ya, yb) - reach if sign > 0 else max(ya, yb) + reach
        tip = (xa - 0.04 * BODY_LEN * height / 0.3, tip_y)  # swept back, the taller the further
        lead = ((xa + xb) / 2, (ya + yb) / 2 - sign * reach * 0.6)
        _fill(rgb, alpha, np.array([(xb + 2, yb + 2 * sign), lead, tip, (xa + 3, (ya + tip_y) / 2),
                                    (xa, ya + 2 * sign)]), s[colour])
    if s["finlets"]:
        for tt in np.linspace(0.05, 0.32, 6):
            for sign in (1.0, -1.0):
                x, y = edge_point(float(tt), sign)
                k = s["finlet_size"]
                _fill(rgb, alpha, np.array([(x + 3 * k, y), (x - 2 * k, y - sign * 0.08 * k * depth),
                                            (x - 3 * k, y)]), s["finlet"])
    if s["bill"] > 0:
        _fill(rgb, alpha, np.array([(SNOUT_X - 6, MID_Y - 3), (SNOUT_X + s["bill"] * BODY_LEN, MID_Y + 1),
                                    (SNOUT_X - 6, MID_Y + 3)]), s["back"])

    # The body, shaded from dark back to pale belly and rounded by darker edges; only its box is touched.
    r0, r1 = int(MID_Y - depth / 2) - 2, int(MID_Y + depth / 2) + 3
    c0, c1 = int(PEDUNCLE_X) - 2, int(SNOUT_X) + 3
    body = np.zeros((r1 - r0, c1 - c0), np.uint8)
    bx = PEDUNCLE_X + t * BODY_LEN
    outline = np.concatenate([np.stack([bx, top], 1), np.stack([bx, bottom], 1)[::-1]])
    cv2.fillPoly(body, _pts(outline - [c0, r0]), 255, cv2.LINE_AA, shift=3)
    xs = np.arange(c0, c1, dtype=np.float32)
    tt = (xs - PEDUNCLE_X) / BODY_LEN
    top_x, bot_x = np.interp(tt, t, top), np.interp(tt, t, bottom)
    ys = np.arange(r0, r1, dtype=np.float32)[:, None]
    vv = np.clip((ys - top_x) / np.maximum(bot_x - top_x, 1e-3), 0, 1).astype(np.float32)  # 0 back, 1 belly
    w_belly = np.clip((vv - s["lat"] + 0.12) / 0.24, 0, 1)[..., None]
    colour = s["back"] * (1 - w_belly) + s["belly"] * w_belly
    if s["band"] is not None:
        band_col, pos, strength = s["band"]
        band = strength * np.exp(-(((vv - pos) / s["band_width"]) ** 2)) * ((tt > 0.12) & (tt < 0.88))
        colour += (band_col - colour) * band[..., None]
    if s["pattern"] is not None:
        kind, pcol, strength = s["pattern"]
        if kind == "spots":
            spots = np.zeros(body.shape, np.float32)
            for _ in range(int(rng.integers(12, 30))):
                cx = rng.uniform(PEDUNCLE_X + 10, SNOUT_X - 12)
                cy = rng.uniform(MID_Y - depth / 2, MID_Y + depth / 2)
                radius = int(rng.uniform(1.5, 3.5))
                cv2.circle(spots, (int(cx - c0), int(cy - r0)), radius, 1.0, -1, cv2.LINE_AA)
            mask = strength * spots
        else:  # vertical bars on the belly, or stripes down the back
            period = rng.uniform(9, 15)
            mask = np.clip((np.sin(2 * np.pi * xs / period + rng.uniform(0, 6)) - 0.3) * 3, 0, 1) * strength
            mask = mask * ((vv > 0.5) if kind == "bars" else (vv < 0.7)) * ((tt > 0.1) & (tt < 0.85))
        colour += (pcol - colour) * mask[..., None]
    colour *= (0.72 + 0.28 * np.sqrt(np.clip(np.sin(np.pi * vv), 0, 1)))[..., None]
    colour += 0.18 * np.exp(-(((vv - 0.28) / 0.07) ** 2))[..., None]  # a wet sheen
    m = (body.astype(np.float32) / 255.0)[..., None]
    box = rgb[r0:r1, c0:c1]
    box += (np.clip(colour, 0, 1) - box) * m
    np.maximum(alpha[r0:r1, c0:c1], m[..., 0], out=alpha[r0:r1, c0:c1])

    if s["pectoral"] > 0:
        ox, oy = edge_point(0.78, 1.0)[0], MID_Y + 0.05 * depth
        length, width = s["pectoral"] * BODY_LEN, max(3.0, 0.09 * depth)
        pec = np.array([(ox, oy - width), (ox - length, oy + 0.15 * depth), (ox - 0.15 * length, oy + width)])
        _fill(rgb, alpha, pec, s["fin_pec"])
        if s["pec_edge"] is not None:
            cv2.polylines(rgb, _pts(pec[1:]), False, s["pec_edge"].tolist(), 3, cv2.LINE_AA, shift=3)
    eye = (int(edge_point(0.915, 1.0)[0] * 8), int((MID_Y - 0.1 * depth) * 8))
    radius = max(2.0, s["eye"] * depth * 1.6)
    cv2.circle(rgb, eye, int(radius * 8), (0.75, 0.72, 0.6), -1, cv2.LINE_AA, shift=3)
    cv2.circle(rgb, eye, int(radius * 5.5), (0.04, 0.04, 0.05), -1, cv2.LINE_AA, shift=3)
    return rgb, alpha, (PEDUNCLE_X - s["tail_depth"] * BODY_LEN, SNOUT_X + s["bill"] * BODY_LEN)


# ----------------------------------------------------------------------------------------- the scene


@dataclass(frozen=True)
class Frame:
    """One drawn frame and the truth about the fish in it."""

    image: np.ndarray  # RGB uint8 (H, W, 3)
    boxes: np.ndarray  # float64 (n, 4): x, y, width, height of each fish in frame pixels; may pass the edge
    visible: np.ndarray  # float64 (n,): share of each fish's pixels in the frame that nothing drawn later hides


@dataclass(frozen=True)
class Sprite:
    """One fish drawn head-right and already shrunk to its size in the frame (premultiplied RGB, alpha)."""

    rgb: np.ndarray
    alpha: np.ndarray
    scale: tuple[float, float]  # sprite pixels per canvas pixel, along x and y
    middle: tuple[float, float]  # halfway from tail tip to nose, in sprite pixels: what the fish turns about
    length: float  # tail tip to nose, in frame pixels


@dataclass(frozen=True)
class Laid:
    """A fish on the frame: where it went, its box, and its own pixels as they were right after it was laid."""

    M: np.ndarray  # canvas-to-frame affine (2x3), so canvas points (`_on_fish`) map onto the frame
    length: float
    box: np.ndarray  # x, y, width, height
    window: tuple[slice, slice]  # rows and columns of the frame that `mask` covers
    mask: np.ndarray  # bool: the fish's own pixels (alpha > 0.5) inside `window`
    pixels: np.ndarray  # the frame's values at `mask` once the fish was laid


def fish_sprite(rng: np.random.Generator, label: str, width: int, scale: float = 1.0) -> Sprite:
    """Draw one fish of `label` and shrink it to its length in a frame `width` pixels wide.

    Shrinking the canvas with area averaging before it is rotated into place keeps the fins and the eye from
    aliasing into speckle, and keeps the warp as small as the fish.
    """
    spec = fish_spec(rng, label)
    rgb, alpha, (tail_x, nose_x) = render_fish(rng, spec)
    if rng.random() < 0.5:  # lying on its other side
        rgb, alpha = rgb[::-1].copy(), alpha[::-1].copy()
    frac = float(np.clip(rng.uniform(*FISH_LENGTH[label]) * spec["size"] * scale, *LENGTH_LIMITS))
    k = frac * width / (nose_x - tail_x)
    size = (max(2, round(CANVAS_W * k)), max(2, round(CANVAS_H * k)))
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
    rgb, alpha = cv2.resize(rgb, size, interpolation=interp), cv2.resize(alpha, size, interpolation=interp)
    sx, sy = size[0] / CANVAS_W, size[1] / CANVAS_H
    return Sprite(rgb, alpha, (sx, sy), ((tail_x + nose_x) / 2 * sx, MID_Y * sy), frac * width)


def fish_matrix(sprite: Sprite, centre: np.ndarray, angle: float, nudge: np.ndarray | None = None) -> np.ndarray:
    """The sprite-to-frame affine that turns the fish by `angle` degrees and puts its middle at `centre`."""
    M = cv2.getRotationMatrix2D(sprite.middle, angle, 1.0)
    M[:, 2] += np.asarray(centre, np.float64) - sprite.middle
    return M if nudge is None else nudge @ np.vstack([M, [0.0, 0.0, 1.0]])


def _warp_sprite(sprite: Sprite, M: np.ndarray, pad: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """The sprite warped into its own window of the frame (which may reach past the frame's edges)."""
    h, w = sprite.alpha.shape
    corners = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], np.float64) @ M.T
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - pad
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + pad
    local = M.copy()
    local[:, 2] -= [x0, y0]
    size = (int(x1 - x0), int(y1 - y0))
    alpha = cv2.warpAffine(sprite.alpha, local, size, flags=cv2.INTER_LINEAR)
    rgb = cv2.warpAffine(sprite.rgb, local, size, flags=cv2.INTER_LINEAR)
    return int(x0), int(y0), rgb, alpha


def _alpha_box(x0: int, y0: int, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tight box (x, y, width, height) around a warped fish, and its mask (the pixels at least half fish).

    The box takes every pixel at least a quarter fish, so that a fin tip or a bill a pixel thin, which
    anti-aliasing never draws at full strength, is inside it as a person drawing the box would put it.
    """
    top = float(alpha.max())  # a fish of a pixel or two is never anywhere whole
    mask = alpha > min(0.5, top / 2)
    rim = alpha > min(0.25, top / 2)
    rows, cols = np.flatnonzero(rim.any(axis=1)), np.flatnonzero(rim.any(axis=0))
    box = np.array([x0 + cols[0], y0 + rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1], np.float64)
    return box, mask


def footprint(sprite: Sprite, centre: np.ndarray, angle: float) -> np.ndarray:
    """The box the fish would have at `centre`, turned by `angle`, without drawing it."""
    x0, y0, _, alpha = _warp_sprite(sprite, fish_matrix(sprite, centre, angle), 1)
    return _alpha_box(x0, y0, alpha)[0]


def lay_fish(img: np.ndarray, sprite: Sprite, M: np.ndarray, shadow: tuple[float, float] = (0.0, 0.0)) -> Laid:
    """Composite the sprite onto `img` (float RGB, changed in place) through the sprite-to-frame affine `M`.

    The fish casts a soft shadow a few per cent of its length long in the boat's light direction `shadow`.
    Only the fish's window is touched, clipped to the frame, so a fish may hang over an edge.
    """
    h, w = img.shape[:2]
    sigma = max(0.7, 0.02 * sprite.length)
    offset = np.asarray(shadow, np.float64) * 0.03 * sprite.length
    x0, y0, rgb, alpha = _warp_sprite(sprite, M, int(np.ceil(3 * sigma + np.abs(offset).max())) + 2)
    box, mask = _alpha_box(x0, y0, alpha)
    shift = np.float32([[1, 0, offset[0]], [0, 1, offset[1]]])
    dark = cv2.warpAffine(cv2.GaussianBlur(alpha, (0, 0), sigma), shift, alpha.shape[::-1])
    fy0, fx0 = max(y0, 0), max(x0, 0)
    fy1, fx1 = min(y0 + alpha.shape[0], h), min(x0 + alpha.shape[1], w)
    window = (slice(fy0, fy1), slice(fx0, fx1))
    local = (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))
    region = img[window]
    region *= (1.0 - 0.45 * dark[local])[..., None]
    region *= (1.0 - alpha[local])[..., None]
    region += rgb[local]
    canvas = np.diag([sprite.scale[0], sprite.scale[1], 1.0])
    return Laid((np.vstack([M, [0.0, 0.0, 1.0]]) @ canvas)[:2], sprite.length, box, window, mask[local],
                region[mask[local]].copy())


def visible_share(img: np.ndarray, fish: Laid) -> float:
    """Share of the fish's pixels in the frame that still show it: what crew, gear or other fish left uncovered."""
    if not fish.mask.any():
        return 0.0
    now = img[fish.window][fish.mask]
    return float(np.mean(np.abs(now - fish.pixels).max(axis=1) < 0.02))


def place_fish(rng: np.random.Generator, img: np.ndarray, label: str, shadow: tuple[float, float] = (0.0, 0.0),
               scale: float = 1.0) -> Laid:
    """Draw and lay one fish of `label` anywhere in the frame's middle: the one-call form tests and figures use."""
    h, w = img.shape[:2]
    sprite = fish_sprite(rng, label, w, scale)
    centre = rng.uniform([0.2 * w, 0.25 * h], [0.8 * w, 0.75 * h])
    return lay_fish(img, sprite, fish_matrix(sprite, centre, float(rng.uniform(0, 360))), shadow)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _spot(rng: np.random.Generator, w: int, h: int, length: float, main: tuple | None) -> tuple[np.ndarray, float]:
    """Where a fish lies and how it is turned: `main` (centre, angle, length) is the catch it was landed with.

    Now and then a fish lies across the frame's edge, as in the real boxes with a negative x or y. Fish landed
    together lie beside each other, often side by side in a row.
    """
    if rng.random() < EDGE_SHARE:
        side, along, inward = rng.integers(4), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.35) * length
        centre = {0: (along * w, inward), 1: (w - inward, along * h), 2: (along * w, h - inward),
                  3: (inward, along * h)}[int(side)]
        return np.array(centre, np.float64), float(rng.uniform(0, 360))
    if main is None or rng.random() < 0.3:
        return rng.uniform([0.12 * w, 0.15 * h], [0.88 * w, 0.85 * h]), float(rng.uniform(0, 360))
    centre, angle, reach = main
    if rng.random() < 0.6:  # in a row: parallel, a body depth or two apart
        angle = angle + rng.normal(0, 12) + (180.0 if rng.random() < 0.3 else 0.0)
        t = np.deg2rad(angle)
        across, along = np.array([np.sin(t), np.cos(t)]), np.array([np.cos(t), -np.sin(t)])
        side = rng.choice([-1.0, 1.0])
        return centre + across * side * rng.uniform(0.3, 0.6) * reach + along * rng.normal(0, 0.15) * reach, angle
    t = rng.uniform(0, 2 * np.pi)
    beside = centre + np.array([np.cos(t), np.sin(t)]) * rng.uniform(0.6, 1.2) * (reach + length)
    return beside, float(rng.uniform(0, 360))


def _count_fish(rng: np.random.Generator, label: str) -> int:
    share, most = SEVERAL_FISH[label]
    return 1 if rng.random() >= share else min(most, 1 + int(rng.geometric(0.6)))


def _on_fish(rng: np.random.Generator, M: np.ndarray, start: float = 0.1, stop: float = 0.9) -> np.ndarray:
    """A random point on the fish's body between `start` and `stop` (0 its tail, 1 its nose), in frame pixels
    (`M`: canvas to frame)."""
    x = PEDUNCLE_X + rng.uniform(start, stop) * BODY_LEN
    return M @ np.array([x, MID_Y + rng.uniform(-6, 6), 1.0])


def _glove(rng: np.random.Generator, img: np.ndarray, at: np.ndarray, colour: np.ndarray, r: float) -> None:
    """A gloved hand of radius `r`: a palm and four fingers pointing one way."""
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    side = np.array([-direction[1], direction[0]])
    for k in np.linspace(-0.6, 0.6, 4):
        start = at + side * k * r
        cv2.line(img, _ipt(start), _ipt(start + direction * r * 1.5), colour.tolist(), max(1, int(r * 0.45)),
                 cv2.LINE_AA)
    cv2.ellipse(img, _ipt(at), (max(1, int(r)), max(1, int(r * 0.8))), float(np.degrees(angle)), 0, 360,
                (colour * 0.85).tolist(), -1, cv2.LINE_AA)


def _window(img: np.ndarray, centre: np.ndarray, radius: float) -> tuple[slice, slice] | None:
    h, w = img.shape[:2]
    x0, y0 = max(0, int(centre[0] - radius)), max(0, int(centre[1] - radius))
    x1, y1 = min(w, int(centre[0] + radius) + 1), min(h, int(centre[1] + radius) + 1)
    return (slice(y0, y1), slice(x0, x1)) if x1 > x0 and y1 > y0 else None


def _net(rng: np.random.Generator, img: np.ndarray, at: np.ndarray, length: float) -> None:
    """A patch of net, about the fish's size, laid over part of it."""
    step, angle = max(3.0, rng.uniform(0.07, 0.12) * length), rng.uniform(0, np.pi / 2)
    radius = rng.uniform(0.3, 0.55) * length
    axes, tilt = (int(radius), int(radius * 0.7)), float(rng.uniform(0, 180))
    colour = _pick(rng, GEAR_COLOURS)
    window = _window(img, at, radius + 4)
    if window is None:
        return
    ys, xs = np.mgrid[window].astype(np.float32)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    mesh = ((u % step < 1.2) | (v % step < 1.2)).astype(np.float32)
    region = np.zeros(mesh.shape, np.float32)
    cv2.ellipse(region, (int(at[0]) - window[1].start, int(at[1]) - window[0].start), axes, tilt, 0, 360, 1.0, -1)
    m = (0.85 * mesh * cv2.GaussianBlur(region, (0, 0), max(0.8, 0.04 * radius)))[..., None]
    img[window] += (colour - img[window]) * m


def _gear_over(rng: np.random.Generator, img: np.ndarray, fish: Laid) -> None:
    """Gear left lying over part of a fish: a hose across its body, or a bucket set down on one end."""
    at, length = _on_fish(rng, fish.M), fish.length
    if rng.random() < 0.5:
        t = rng.uniform(0, 2 * np.pi)
        d, across = np.array([np.cos(t), np.sin(t)]), np.array([-np.sin(t), np.cos(t)])
        half, bend = rng.uniform(0.8, 1.5) * length, across * rng.normal(0, 0.25) * length
        curve = _bezier(np.array([at - d * half, at - d * half / 3 + bend, at + d * half / 3 - bend, at + d * half]))
        hose = _pick(rng, PAINT_COLOURS)
        thick = max(2, int(rng.uniform(0.07, 0.12) * length))
        cv2.polylines(img, _pts(curve + 1), False, (hose * 0.3).tolist(), thick, cv2.LINE_AA, shift=3)
        cv2.polylines(img, _pts(curve), False, hose.tolist(), thick, cv2.LINE_AA, shift=3)
    else:
        end = fish.M @ np.array([PEDUNCLE_X + (0.0 if rng.random() < 0.5 else BODY_LEN), MID_Y, 1.0])
        r, colour = rng.uniform(0.2, 0.32) * length, _pick(rng, GEAR_COLOURS)
        cv2.circle(img, _ipt(end), max(2, int(r)), colour.tolist(), -1, cv2.LINE_AA)
        cv2.circle(img, _ipt(end), max(1, int(r * 0.8)), (colour * 0.55).tolist(), -1, cv2.LINE_AA)


def _person(rng: np.random.Generator, img: np.ndarray, hands: list[np.ndarray], glove_cap: float) -> None:
    """A crewman seen from above, an arm's length from what he handles, arms reaching to `hands`.

    He is sized by the frame (the camera's distance), not by the fish; his gloves are capped at `glove_cap`
    pixels so that a small fish in his hands is held, not hidden.
    """
    h, w = img.shape[:2]
    s = float(min(h, w))
    target = np.mean(hands, axis=0)
    t = rng.uniform(0, 2 * np.pi)
    body = target + np.array([np.cos(t), np.sin(t)]) * rng.uniform(0.24, 0.36) * s
    facing = target - body
    facing /= np.linalg.norm(facing) + 1e-6
    across = np.array([-facing[1], facing[0]])
    jacket = _pick(rng, GEAR_COLOURS) * rng.uniform(0.7, 1.0)
    glove = _pick(rng, GEAR_COLOURS)
    for sign, hand in zip((-1, 1), hands, strict=True):
        shoulder = body + across * sign * 0.11 * s + facing * 0.04 * s
        cv2.line(img, _ipt(shoulder), _ipt(hand), (jacket * 0.85).tolist(), max(2, int(0.035 * s)), cv2.LINE_AA)
    cv2.ellipse(img, _ipt(body), (max(2, int(0.09 * s)), max(2, int(0.15 * s))),
                float(np.degrees(np.arctan2(facing[1], facing[0]))), 0, 360, jacket.tolist(), -1, cv2.LINE_AA)
    hat = _pick(rng, GEAR_COLOURS) if rng.random() < 0.6 else _rgb(170, 125, 95)
    cv2.circle(img, _ipt(body + facing * 0.08 * s), max(2, int(0.055 * s)), hat.tolist(), -1, cv2.LINE_AA)
    for hand in hands:
        _glove(rng, img, hand, glove, min(0.03 * s, glove_cap))


def _clutter(rng: np.random.Generator, img: np.ndarray, most: int = 3) -> None:
    """Loose things that move between frames (at most `most`): buckets, blood or water stains, tools."""
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(0, most + 1))):
        x, y = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
        kind = rng.integers(3)
        if kind == 0:
            r = rng.uniform(0.015, 0.03) * w
            col = _pick(rng, GEAR_COLOURS)
            cv2.circle(img, (int(x), int(y)), max(2, int(r)), col.tolist(), -1, cv2.LINE_AA)
            cv2.circle(img, (int(x), int(y)), max(1, int(r * 0.8)), (col * 0.55).tolist(), -1, cv2.LINE_AA)
        elif kind == 1:
            window = _window(img, np.array([x, y]), 0.12 * w)
            stain = np.zeros((window[0].stop - window[0].start, window[1].stop - window[1].start), np.float32)
            for _ in range(4):
                centre = (int(x + rng.normal(0, 0.02 * w)) - window[1].start,
                          int(y + rng.normal(0, 0.02 * w)) - window[0].start)
                axes = (int(rng.uniform(0.01, 0.04) * w), int(rng.uniform(0.008, 0.025) * w))
                cv2.ellipse(stain, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
            tint = _rgb(90, 15, 15) if rng.random() < 0.5 else img[int(y), int(x)] * 0.6
            img[window] += (tint - img[window]) * (0.45 * cv2.GaussianBlur(stain, (0, 0), 2.0))[..., None]
        else:
            angle = rng.uniform(0, 2 * np.pi)
            end = (x + np.cos(angle) * 0.06 * w, y + np.sin(angle) * 0.06 * w)
            cv2.line(img, (int(x), int(y)), _ipt(end), (0.75, 0.75, 0.78), max(1, int(0.004 * w)), cv2.LINE_AA)
            cv2.circle(img, (int(x), int(y)), max(2, int(0.008 * w)), (0.12, 0.1, 0.1), -1, cv2.LINE_AA)


def _sensor_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise of spread `sigma`, float32, seeded from `rng`.

    OpenCV's generator (seeded here, so the frame stays a function of its own generator) draws a 640-pixel
    frame's noise about three times faster than numpy's, and noise is most of a frame's drawing time.
    """
    out = np.empty(shape, np.float32)
    cv2.setRNGSeed(int(rng.integers(2**31)))
    channels = shape[2] if len(shape) == 3 else 1
    cv2.randn(out, (0.0,) * channels, (sigma,) * channels)
    return out


def _night_vision(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """What the infrared camera records after dark: green, flat, grainy, brighter under its lamp."""
    h, w = img.shape[:2]
    lum = img @ np.array([0.3, 0.59, 0.11], np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    lamp = 1.15 - 0.6 * ((xs / w - rng.uniform(0.3, 0.7)) ** 2 + (ys / h - rng.uniform(0.3, 0.7)) ** 2)
    lum = (0.16 + 0.6 * np.power(lum, 0.7)) * lamp + _sensor_noise(rng, (h, w), 0.045)
    return lum[..., None] * np.array([0.55, 1.0, 0.5], np.float32) * rng.uniform(0.8, 1.2)


def _nudge(rng: np.random.Generator, centre: np.ndarray, length: float) -> np.ndarray:
    """A small move of a handled fish between frames: turned a few degrees about its middle, shifted a little."""
    M = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(rng.normal(0, 5)), 1.0)
    M[:, 2] += rng.normal(0, 0.05, 2) * length
    return M


def _lay_catch(scene: np.random.Generator, frame: np.random.Generator, img: np.ndarray, boat: Boat,
               label: str) -> list[Laid]:
    """The fish of one frame, main catch last (on top); extras are placed clear of each other's boxes.

    Every placement is drawn from `scene` before the frame's nudge moves the main fish, so the frames of a
    burst draw the same numbers in the same order and show the same haul.
    """
    h, w = img.shape[:2]
    n = _count_fish(scene, label)
    main = fish_sprite(scene, label, w, boat.fish_scale)
    centre, angle = _spot(scene, w, h, main.length, None)
    placed = [(main, centre, angle, footprint(main, centre, angle))]
    for _ in range(n - 1):
        sprite = fish_sprite(scene, label, w, boat.fish_scale * scene.uniform(0.85, 1.05))
        for _try in range(12):
            c, a = _spot(scene, w, h, sprite.length, (centre, angle, main.length))
            if not (0 <= c[0] < w and 0 <= c[1] < h):
                continue
            box = footprint(sprite, c, a)
            if all(_box_iou(box, other[3]) < 0.25 for other in placed):
                placed.append((sprite, c, a, box))
                break
    laid = [lay_fish(img, s, fish_matrix(s, c, a), boat.shadow) for s, c, a, _ in placed[1:]]
    nudge = _nudge(frame, centre, main.length)
    laid.append(lay_fish(img, main, fish_matrix(main, centre, angle, nudge), boat.shadow))
    return laid


def _cover(img: np.ndarray, main: Laid | None, draw) -> np.ndarray:
    """`draw` (crew or gear) applied to a copy of `img`, kept unless it leaves less than MIN_VISIBLE of the
    main fish in view: the frame's label must still be visible. `draw` consumes its generator either way, so
    every frame of a burst stays in step."""
    trial = img.copy()
    draw(trial)
    return trial if main is None or visible_share(trial, main) >= MIN_VISIBLE else img


def draw_scene(scene: np.random.Generator, frame: np.random.Generator, boat: Boat, label: str,
               night: bool) -> Frame:
    """One frame from `boat`'s camera with fish of class `label` (none for NoF), and their true boxes.

    `scene` draws what a burst of frames shares (the fish, the crew, the loose gear): give every frame of one
    catch a generator in the same state. `frame` draws what changes from frame to frame: the mast's sway,
    the fish moved by hand, the light, the sensor noise and the blur. A fish's box is its whole body, the
    parts that crew or gear hide included, as a person drawing boxes would draw it.
    """
    w, h = boat.width, boat.height
    sway = frame.uniform(-SWAY, SWAY, 2) * w
    shake = np.float32([[1, 0, sway[0]], [0, 1, sway[1]]])  # the mast sways
    img = cv2.warpAffine(boat.deck, shake, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    _clutter(scene, img, 3 if label == "NoF" else 1)
    hands = [scene.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h]) for _ in range(2)]
    fish: list[Laid] = []
    main = None
    glove_cap = 0.03 * min(w, h)
    if label != "NoF":
        fish = _lay_catch(scene, frame, img, boat, label)
        main = fish[-1]
        # The crew take a fish by the tail and by the head or gills, which leaves its middle in view.
        hands = [_on_fish(scene, main.M, 0.0, 0.15), _on_fish(scene, main.M, 0.75, 0.95)]
        glove_cap = GLOVE_CAP * main.length
        cover = scene.random()
        if cover < GLOVE_SHARE:  # a hand holding the fish, its arm out of the frame or out of the light
            hand, colour = hands[int(scene.integers(2))], _pick(scene, GEAR_COLOURS)
            img = _cover(img, main, lambda im: _glove(scene, im, hand, colour, min(0.03 * min(w, h), glove_cap)))
        elif cover < GLOVE_SHARE + NET_SHARE:
            img = _cover(img, main, lambda im: _net(scene, im, _on_fish(scene, main.M), main.length))
        elif cover < GLOVE_SHARE + NET_SHARE + GEAR_SHARE:
            under = fish[int(scene.integers(len(fish)))]
            img = _cover(img, main, lambda im: _gear_over(scene, im, under))
    # Crew show up in most empty frames (sorting, hosing down) and handle the catch in some of the others.
    if scene.random() < (0.4 if label == "NoF" else PERSON_SHARE):
        img = _cover(img, main, lambda im: _person(scene, im, hands, glove_cap))
    visible = np.array([visible_share(img, f) for f in fish])
    # In place and through OpenCV: at 640 pixels these full-frame passes, not the fish, are the demo's cost.
    img *= boat.light
    img *= (frame.uniform(0.9, 1.1) * frame.uniform(0.95, 1.05, 3)).astype(np.float32)
    if night:
        img = _night_vision(frame, img)
    else:
        img += _sensor_noise(frame, img.shape, float(frame.uniform(0.006, 0.018)))
    if frame.random() < 0.15:  # the lens fogs or the boat rolls during the exposure
        img = cv2.GaussianBlur(img, (0, 0), frame.uniform(0.6, 1.2))
    boxes = np.array([f.box for f in fish], np.float64).reshape(-1, 4)
    return Frame(cv2.convertScaleAbs(np.maximum(img, 0, out=img), alpha=255.0), boxes, visible)


# ----------------------------------------------------------------------------------------- the files


def boat_rng(seed: int, boat_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1, boat_id])


def image_rng(seed: int, key: int) -> np.random.Generator:
    return np.random.default_rng([seed, 2, key])


def event_rng(seed: int, event: int) -> np.random.Generator:
    return np.random.default_rng([seed, 3, event])


def label_rng(seed: int, key: int) -> np.random.Generator:
    """The person drawing one image's boxes: apart from the drawing's generators, so boxes never move pixels."""
    return np.random.default_rng([seed, 4, key])


def draw_row(seed: int, row, boats: dict[int, Boat]) -> Frame:
    """The frame of one `plan` row (a named tuple), from its event's scene and its own frame generator."""
    return draw_scene(event_rng(seed, row.event), image_rng(seed, row.key), boats[row.boat], row.label,
                      bool(row.night))


def encode_jpeg(rgb: np.ndarray) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes()


def sample_submission(images: list[str]) -> pd.DataFrame:
    """Kaggle's sample submission: every image at the uniform 1/8, sorted by name."""
    frame = pd.DataFrame({"image": sorted(images)})
    for cls in FISH_CLASSES:
        frame[cls] = 1.0 / len(FISH_CLASSES)
    return frame[list(SUBMISSION_HEADER)]


def _seen(frame: Frame) -> np.ndarray:
    """The boxes of the fish a person would box: those at least MIN_BOXED in view."""
    return frame.boxes[frame.visible >= MIN_BOXED]


def hand_drawn(rng: np.random.Generator, box: np.ndarray) -> dict:
    """A Sloth rectangle around `box` as a person drags it: each edge off by about LABEL_JITTER of the box's
    side, in floats of the original frame's pixels (so a box at the frame's edge may start at a negative x)."""
    x, y, w, h = box
    dx0, dx1, dy0, dy1 = rng.normal(0.0, LABEL_JITTER, 4) * [w, w, h, h]
    width, height = max(1.0, w + dx1 - dx0), max(1.0, h + dy1 - dy0)
    return {"class": "rect", "x": round(float(x + dx0), 1), "y": round(float(y + dy0), 1),
            "width": round(float(width), 1), "height": round(float(height), 1)}


def sloth_files(seed: int, rows: pd.DataFrame, frames: dict[int, Frame]) -> dict[str, list[dict]]:
    """The community's annotation files for the training frames: file name -> list of Sloth image entries.

    One file per class with fish (none for NoF), entries sorted by file name, one rectangle per fish that is
    in view. A few entries (EMPTY_ENTRY_SHARE) have an empty list, as in the real files: an image skipped by
    the person drawing. The true boxes of the test frames are kept apart, in solution_boxes.csv.
    """
    files: dict[str, list[dict]] = {name: [] for name in ANNOTATION_FILES.values()}
    train = rows[(rows.split == "train") & (rows.label != "NoF")].sort_values("image")
    for row in train.itertuples(index=False):
        rng = label_rng(seed, row.key)
        skipped = rng.random() < EMPTY_ENTRY_SHARE
        rects = [] if skipped else [hand_drawn(rng, box) for box in _seen(frames[row.key])]
        files[ANNOTATION_FILES[row.label]].append({"filename": row.image, "class": "image", "annotations": rects})
    return files


def solution_boxes(rows: pd.DataFrame, frames: dict[int, Frame]) -> pd.DataFrame:
    """True boxes of the test frames' fish in view: `image,stage,x,y,width,height`, one row per fish, in
    original-frame pixels and not clipped (ingest clips them to the frame), sorted by stage, image, x, y."""
    out = []
    for row in rows[rows.split != "train"].itertuples(index=False):
        stage = 1 if row.split == "test_stg1" else 2
        out += [(row.image, stage, *map(float, box)) for box in _seen(frames[row.key])]
    frame = pd.DataFrame(out, columns=["image", "stage", "x", "y", "width", "height"])
    return frame.sort_values(["stage", "image", "x", "y"], kind="stable").reset_index(drop=True)


def write_demo(cfg: Demo, out_dir: Path | str) -> pd.DataFrame:
    """Draw every planned image and write the whole folder; returns the plan.

    The folder is built beside `out_dir` and swapped in at the end, so no stale file from an earlier, larger
    run survives and an interrupted run never leaves a half-written download behind.
    """
    out_dir = Path(out_dir)
    rows = plan(cfg)
    n_boats = cfg.train_boats + cfg.new_boats
    boats = {b: draw_boat(boat_rng(cfg.seed, b), b, cfg.width) for b in range(n_boats)}
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    for folder in [*(f"train/{c}" for c in FISH_CLASSES), "test_stg1", "test_stg2", ANNOTATIONS]:
        (tmp / folder).mkdir(parents=True)
    frames: dict[int, Frame] = {}
    for row in rows.itertuples(index=False):
        frame = draw_row(cfg.seed, row, boats)
        (tmp / row.path).write_bytes(encode_jpeg(frame.image))
        frames[row.key] = Frame(np.empty(0, np.uint8), frame.boxes, frame.visible)  # the boxes, not the pixels

    stg1, stg2 = rows[rows.split == "test_stg1"], rows[rows.split == "test_stg2"]
    sample_submission(list(stg1.image)).to_csv(tmp / "sample_submission_stg1.csv", index=False)
    sample_submission([*stg1.image, *stg2.image]).to_csv(tmp / "sample_submission_stg2.csv", index=False)
    solution = rows[rows.split != "train"].assign(stage=lambda d: np.where(d.split == "test_stg1", 1, 2))
    solution = solution.sort_values(["stage", "image"])[["image", "label", "stage"]]
    solution.to_csv(tmp / "solution.csv", index=False)
    solution_boxes(rows, frames).to_csv(tmp / "solution_boxes.csv", index=False)
    rows.sort_values(["split", "image"])[["image", "split", "boat", "event"]].to_csv(tmp / "boats.csv",
                                                                                     index=False)
    for name, entries in sloth_files(cfg.seed, rows, frames).items():
        (tmp / ANNOTATIONS / name).write_text(json.dumps(entries, indent=1) + "\n")

    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return rows


@dataclass(frozen=True)
class Settings:
    demo: Demo
    data: Data  # data.demo_dir: where the download is written


def main(argv: list[str] | None = None) -> None:
    s = load(Settings, stage_parser(__doc__).parse_args(argv).params)
    demo, data = s.demo, s.data
    start = time.perf_counter()
    rows = write_demo(demo, data.demo_dir)
    n = rows.split.value_counts()
    print(f"demo: wrote {n.get('train', 0)} train, {n.get('test_stg1', 0)} test_stg1 and "
          f"{n.get('test_stg2', 0)} test_stg2 images from {demo.train_boats}+{demo.new_boats} boats "
          f"to {data.demo_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
