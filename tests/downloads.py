"""Generated inputs shaped like the real ones: boat frames, archives, and a Kaggle-style download.

Shared by the ingest, archive, grouping and end-to-end tests, so that every test of bad input plants it the
same way: real zip and 7z archives with Kaggle's names, hostile entries (`..`, absolute paths, links), and
bad files (empty, truncated, not an image, corrupt) beside valid frames of a few planted boats. Also the
community's box annotations in Sloth JSON (rectangles and head/tail points), with planted defects.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import uuid
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import py7zr

from pipeline.core.competition import FISH_CLASSES

#: The sample submissions' columns in a shuffled order: ingest normalises them on the way in.
SHUFFLED = ["image", "YFT", "ALB", "SHARK", "BET", "OTHER", "DOL", "NoF", "LAG"]


def boat_layout(boat: int, w: int, h: int) -> np.ndarray:
    """A boat's fixed camera view: a light deck with dark lines and hatches at seeded places."""
    rng = np.random.default_rng(1000 + boat)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rng.integers(140, 220, 3)
    for _ in range(4):
        p = rng.integers(0, [w, h, w, h])
        cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), rng.integers(0, 70, 3).tolist(), 3)
    for _ in range(2):
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        size = (x + int(rng.integers(10, 40)), y + int(rng.integers(10, 30)))
        cv2.rectangle(img, (x, y), size, rng.integers(0, 90, 3).tolist(), -1)
    return img


def boat_frame(layout: np.ndarray, seed: int, night: bool = False) -> np.ndarray:
    """One frame of that boat: camera jitter, a fish somewhere, sensor noise; night vision if asked."""
    rng = np.random.default_rng(seed)
    h, w = layout.shape[:2]
    img = np.roll(layout, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1)).copy()
    centre = (int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10)))
    cv2.ellipse(
        img,
        centre,
        (int(w * 0.12), int(h * 0.05)),
        float(rng.uniform(0, 180)),
        0,
        360,
        rng.integers(0, 255, 3).tolist(),
        -1,
    )
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255)
    if night:  # green, dim, flat: what the night-vision cameras record
        g = 0.55 * img.mean(axis=2) + 40
        img = np.stack([0.35 * g, g, 0.45 * g], axis=-1)
    return img.astype(np.uint8)


def jpeg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


@dataclasses.dataclass
class Download:
    """What the fixture planted, so tests can check the outcome against it."""

    kaggle_dir: Path
    train: dict[str, bytes]  # archive-relative name -> bytes, valid images
    bad: dict[str, str]  # manifest-like id -> expected reason fragment
    stg1: dict[str, bytes]
    stg2: dict[str, bytes]
    evil_names: list[str]


def sample_submission(ids: list[str]) -> pd.DataFrame:
    """A sample submission (uniform 1/8) for `ids`, its columns shuffled."""
    frame = pd.DataFrame({"image": ids})
    for c in SHUFFLED[1:]:
        frame[c] = 0.125
    return frame[SHUFFLED]


def write_zip(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A real zip; `ZipInfo` keeps names exactly as given ('..', '/', absolute), links stored as links."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def write_7z(path: Path, scratch: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A real 7z archive; py7zr stores names as given (including '..') and symlinks as links."""
    scratch.mkdir(parents=True, exist_ok=True)
    with py7zr.SevenZipFile(path, "w") as sz:
        for i, (name, data) in enumerate(files.items()):
            (scratch / f"f{i}").write_bytes(data)
            sz.write(scratch / f"f{i}", name)
        for i, (name, target) in enumerate((links or {}).items()):
            os.symlink(target, scratch / f"l{i}")
            sz.write(scratch / f"l{i}", name)
    return path


def write_folder(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def make_download(root: Path, form: str = "archives") -> Download:
    """A Kaggle-style download in root/data/raw/kaggle: `archives` (as Kaggle ships it) or `folders`."""
    kdir = root / "data/raw/kaggle"
    kdir.mkdir(parents=True)
    train: dict[str, bytes] = {}
    n = 0
    for k, cls in enumerate(FISH_CLASSES):
        for j in range(2):
            n += 1
            boat, (w, h) = (k + j) % 3, ((160, 96) if (k + j) % 3 < 2 else (160, 120))
            train[f"train/{cls}/img_{n:05d}.jpg"] = jpeg(boat_frame(boat_layout(boat, w, h), n, night=n % 5 == 0))
    grey = cv2.cvtColor(boat_frame(boat_layout(0, 160, 96), 99), cv2.COLOR_BGR2GRAY)
    train["train/DOL/img_00100.jpg"] = jpeg(grey)
    rgba = cv2.cvtColor(boat_frame(boat_layout(1, 160, 96), 98), cv2.COLOR_BGR2BGRA)
    rgba[..., 3] = 128
    train["train/LAG/img_00101.png"] = png(rgba)
    good = jpeg(boat_frame(boat_layout(2, 160, 120), 97))
    bad_files = {
        "train/ALB/img_00200.jpg": (b"", "empty file"),
        "train/BET/img_00201.jpg": (good[: len(good) // 2], "truncated JPEG"),
        "train/YFT/img_00202.jpg": (b"this is a text file, not a photo\n", "not an image"),
        "train/OTHER/img_00203.jpg": (b"\xff\xd8\xff\xe0" + os.urandom(3000) + b"\xff\xd9", "corrupt jpeg"),
    }
    stg1 = {
        f"test_stg1/img_{300 + i:05d}.jpg": jpeg(boat_frame(boat_layout(i % 3, 160, 96 if i % 3 < 2 else 120), 300 + i))
        for i in range(4)
    }
    stg1["test_stg1/img_00304.jpg"] = train["train/ALB/img_00001.jpg"]  # an exact duplicate of a train frame
    stg2 = {f"test_stg2/image_{i:05d}.jpg": jpeg(boat_frame(boat_layout(3, 200, 120), 400 + i)) for i in range(1, 5)}
    bad_stg2 = {"test_stg2/image_00005.jpg": (b"", "empty file")}
    absolute = str(root.parent / f"abs_evil_{uuid.uuid4().hex}.jpg")
    junk = {"__MACOSX/train/ALB/._img_00001.jpg": b"\x00\x05\x16\x07"}
    all_train = {**train, **{k: v for k, (v, _) in bad_files.items()}}
    all_stg2 = {**stg2, **{k: v for k, (v, _) in bad_stg2.items()}}
    if form == "archives":
        write_zip(
            kdir / "train.zip",
            {**all_train, **junk, "../evil.jpg": b"evil", absolute: b"evil"},
            links={"train/ALB/img_00900.jpg": "/etc/passwd"},
        )
        write_zip(kdir / "test_stg1.zip", stg1)
        write_7z(
            kdir / "test_stg2.7z",
            root / "scratch",
            {**all_stg2, "../evil7z.jpg": b"evil"},
            links={"test_stg2/image_00900.jpg": "/etc/passwd"},
        )
    else:
        write_folder(kdir, {**all_train, **stg1, **all_stg2})
    ids1 = [Path(k).name for k in stg1]
    ids2 = ids1 + list(all_stg2)
    s1, s2 = sample_submission(ids1), sample_submission(ids2)
    if form == "archives":
        with zipfile.ZipFile(kdir / "sample_submission_stg1.csv.zip", "w") as zf:
            zf.writestr("sample_submission_stg1.csv", s1.to_csv(index=False))
    else:
        s1.to_csv(kdir / "sample_submission_stg1.csv", index=False)
    s2.to_csv(kdir / "sample_submission_stg2.csv", index=False)
    bad = {Path(k).name: r for k, (_, r) in bad_files.items()} | {k: r for k, (_, r) in bad_stg2.items()}
    return Download(kdir, train, bad, stg1, stg2, ["evil.jpg", "evil7z.jpg", Path(absolute).name])


# ------------------------------------------------------------------------------------------ box annotations


def rect(x: float, y: float, width: float, height: float) -> dict:
    """A Sloth rectangle record: top-left corner and size in original-frame pixels."""
    return {"class": "rect", "x": x, "y": y, "width": width, "height": height}


def point(x: float, y: float) -> dict:
    """A Sloth point record (the circulating head/tail files: two per fish)."""
    return {"class": "point", "x": x, "y": y}


def sloth_entry(filename: str, *records: dict) -> dict:
    """One image entry of a Sloth file, in the community's key order."""
    return {"filename": filename, "class": "image", "annotations": list(records)}


def write_annotations(folder: Path, files: dict[str, list | str]) -> Path:
    """Write annotation files into `folder`: a list is dumped as JSON, a string written as it is (broken JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
    return folder


@dataclasses.dataclass
class PlantedAnnotations:
    """What `plant_annotations` put in the folder, and what ingest must make of it."""

    folder: Path
    boxes: pd.DataFrame  # the expected boxes table: id, x, y, width, height, kind, source
    unmatched: dict[str, str]  # filename as written -> reason fragment
    ignored: dict[str, str]  # file -> reason fragment


def plant_annotations(kaggle_dir: Path) -> PlantedAnnotations:
    """A Sloth folder for `make_download`'s training images, with every defect the real files have or users make.

    The download's frames are 160 x 96 (img_00001..3, 9, 15) and 160 x 120 (img_00016); img_00003 is a BET,
    img_00009 a NoF, img_00200 a quarantined (empty) file, img_00300 a stage-1 test image.
    """
    alb = [
        sloth_entry("img_00001.jpg", rect(10.5, 20.25, 30, 15), rect(-5.5, 40, 20, 10), rect(500, 10, 20, 20)),
        sloth_entry("../input/train/ALB/img_00002.jpg", rect(100, -8, 50, 30), rect(150, 80, 20, 30)),
        sloth_entry("img_99999.jpg", rect(1, 1, 5, 5)),
        sloth_entry("img_00200.jpg", rect(1, 1, 5, 5)),
        sloth_entry("img_00300.jpg", rect(1, 1, 5, 5)),
        sloth_entry("img_00003.jpg", rect(5, 5, 40, 20)),  # a BET frame in the ALB file: box kept
        sloth_entry("img_00009.jpg", rect(5, 5, 40, 20)),  # a NoF frame: box dropped
        sloth_entry("img_00001.jpg", rect(10.5, 20.25, 30, 15), {"class": "polygon", "points": []},
                    {"class": "rect", "x": "12", "y": 1, "width": 3, "height": 3}),
        "not an entry",
    ]
    bet = [sloth_entry("img_00004.jpg"), sloth_entry("img_00003.jpg", rect(60, 30, 40, 20))]
    yft_points = [
        sloth_entry("dummy.jpg", point(0, 0)),  # the point files' dummy first record
        sloth_entry("C:\\data\\train\\YFT\\img_00015.jpg", point(100, 50), point(60, 50)),
        sloth_entry("img_00016.jpg", point(1, 1), point(20, 100), point(20, 60)),  # a dummy first point
    ]
    folder = write_annotations(kaggle_dir / "annotations", {
        "alb_labels.json": alb, "bet_labels.json": bet, "yft_labels.json": yft_points,
        "nof_labels.json": [sloth_entry("img_00009.jpg", rect(1, 1, 5, 5))], "notes.txt": "boxes by me\n",
    })
    boxes = pd.DataFrame(
        [("img_00001.jpg", 0.0, 40.0, 14.5, 10.0, "rect", "alb_labels.json"),
         ("img_00001.jpg", 10.5, 20.25, 30.0, 15.0, "rect", "alb_labels.json"),
         ("img_00002.jpg", 100.0, 0.0, 50.0, 22.0, "rect", "alb_labels.json"),
         ("img_00002.jpg", 150.0, 80.0, 10.0, 16.0, "rect", "alb_labels.json"),
         ("img_00003.jpg", 5.0, 5.0, 40.0, 20.0, "rect", "alb_labels.json"),
         ("img_00003.jpg", 60.0, 30.0, 40.0, 20.0, "rect", "bet_labels.json"),
         ("img_00015.jpg", 58.0, 44.0, 44.0, 12.0, "point", "yft_labels.json"),
         ("img_00016.jpg", 14.0, 58.0, 12.0, 44.0, "point", "yft_labels.json")],
        columns=["id", "x", "y", "width", "height", "kind", "source"],
    )
    unmatched = {"img_99999.jpg": "no training image", "img_00200.jpg": "quarantined",
                 "img_00300.jpg": "a test image"}
    ignored = {"nof_labels.json": "NoF frames hold no fish", "notes.txt": "not a class file"}
    return PlantedAnnotations(folder, boxes, unmatched, ignored)
