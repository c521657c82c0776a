"""Tiny generated inputs for stage tests: a params.yaml rooted in a temp folder, and synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.config import FISH_CLASSES

ROOT = Path(__file__).resolve().parents[1]


def tiny_params(root: Path, relative: bool = False, **overrides) -> dict:
    """The repository's params.yaml written into `root`, sizes shrunk for tests.

    Paths are moved under `root` (absolute), or kept relative (`relative=True`, for running DVC in `root`).
    `overrides` are dotted keys: `tiny_params(tmp, **{"cv.n_folds": 3})`.
    """
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if not relative:
        raw["paths"] = {k: str(root / v) for k, v in raw["paths"].items()}
        raw["data"]["demo_dir"] = str(root / raw["data"]["demo_dir"])
        raw["data"]["kaggle_dir"] = str(root / raw["data"]["kaggle_dir"])
    small = {
        "model.backbones": ["vgg16"],
        "model.image_size": 32,
        "model.head.units": 16,
        "train.epochs": 4,
        "train.patience": 2,
        "train.batch_size": 32,
        "cv.n_folds": 3,
        "augment.train_views": 1,
        "augment.tta_views": 2,
    }
    for key, value in {**small, **overrides}.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def synthetic_images(root: Path, raw: dict, n_train: int = 64, n_test: int = 12, seed: int = 0) -> pd.DataFrame:
    """Write a manifest and an image cache: class-coloured blobs on grey, six boat groups, both test stages."""
    rng = np.random.default_rng(seed)
    size = raw["model"]["image_size"]
    labels = np.array(list(FISH_CLASSES) * (n_train // len(FISH_CLASSES) + 1))[:n_train]
    rows, images = [], []
    colours = rng.integers(0, 255, (len(FISH_CLASSES), 3))
    for i in range(n_train + 2 * n_test):
        split = "train" if i < n_train else ("test_stg1" if i < n_train + n_test else "test_stg2")
        label = labels[i] if split == "train" else str(rng.choice(FISH_CLASSES))
        img = np.full((size, size, 3), 90 + 10 * (i % 6), np.uint8)
        c = colours[FISH_CLASSES.index(label)]
        x, y = rng.integers(0, size // 2, 2)
        img[y : y + size // 2, x : x + size // 2] = c
        images.append(img)
        name = f"image_{i:05d}.jpg" if split == "test_stg2" else f"img_{i:05d}.jpg"
        rows.append(
            {
                "id": f"test_stg2/{name}" if split == "test_stg2" else name,
                "split": split,
                "path": f"{split}/{name}",
                "label": label if split == "train" else "",
                "width": size,
                "height": size,
                "group": i % 6,
                "sha1": f"{i:040x}",
                "true_boat": i % 6,
                "_truth": label,
            }
        )
    manifest = pd.DataFrame(rows)
    paths = raw["paths"]
    Path(paths["manifest"]).parent.mkdir(parents=True, exist_ok=True)
    manifest.drop(columns="_truth").to_csv(paths["manifest"], index=False)
    np.save(paths["images"], np.stack(images))
    test = manifest[manifest.split != "train"]
    solution = pd.DataFrame(
        {"image": test["id"], "label": test["_truth"], "stage": np.where(test.split == "test_stg1", 1, 2)}
    )
    Path(paths["solution"]).parent.mkdir(parents=True, exist_ok=True)
    solution.to_csv(paths["solution"], index=False)
    return manifest
