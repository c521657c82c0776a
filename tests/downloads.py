"""Generated inputs shaped like the real ones: boat frames, archives, and a Kaggle-style download.

Shared by the ingest, archive, grouping and end-to-end tests, so that every test of bad input plants it the
same way: real zip and 7z archives with Kaggle's names, hostile entries (`..`, absolute paths, links), and
bad files (empty, truncated, not an image, corrupt) beside valid frames of a few planted boats.
"""

from __future__ import annotations

import dataclasses
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
