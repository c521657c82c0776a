"""The manifest: one row per usable image, written by ingest and read by every later stage.

Columns (docs/ARCHITECTURE.md): `id` (unique within its split: train and stage-1 bare `img_XXXXX.jpg`,
stage-2 `test_stg2/image_XXXXX.jpg`, i.e. the submission's names; a training image may share a stage-1
image's file name, as in many competitions' downloads), `split`, `path`, `label` (train only),
`width`, `height`, `group` (estimated boat), `burst` (near-duplicate cluster within the split: the frames
of one catch), `sha1`, `true_boat` (demo only). Row i is image i of every array
cache (`paths.images`, `paths.views`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.competition import FISH_CLASSES, class_index

COLUMNS: tuple[str, ...] = ("id", "split", "path", "label", "width", "height", "group", "burst", "sha1", "true_boat")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest with every text column as text (an empty label stays "", never NaN)."""
    return pd.read_csv(path, keep_default_na=False, dtype={"id": str, "split": str, "label": str, "path": str})


def labels_of(labels: pd.Series | np.ndarray | list[str], where: str | Path = "the manifest") -> np.ndarray:
    """Class names → integer labels in FISH_CLASSES order; an unknown name is an error naming `where`."""
    names = list(labels)
    unknown = sorted(set(names) - set(FISH_CLASSES))
    if unknown:
        raise ValueError(f"{where}: unknown labels {unknown}; expected {list(FISH_CLASSES)}")
    return np.array([class_index(n) for n in names], dtype=np.int64)


def train_labels(manifest: pd.DataFrame, ids: np.ndarray | None = None, where: str | Path = "the manifest"
                 ) -> np.ndarray:
    """Integer labels of the training rows (in manifest order, or of the training images `ids`)."""
    train = manifest[manifest["split"] == "train"].set_index("id")["label"]
    if ids is not None:
        missing = [i for i in ids if i not in train.index]
        if missing:
            raise ValueError(f"{len(missing)} ids are not training images of {where}, e.g. {missing[0]!r}")
        train = train.loc[ids]
    return labels_of(train, where)


def bursts_of(manifest: pd.DataFrame, split: str, ids: np.ndarray, where: str | Path = "the manifest") -> np.ndarray:
    """The `burst` of the images `ids` of `split`, in that order (the ensemble's smoothing groups)."""
    if "burst" not in manifest.columns:
        raise ValueError(f"{where} has no burst column (written by ingest since smoothing over bursts): "
                         "run the ingest stage again")
    bursts = manifest[manifest["split"] == split].set_index("id")["burst"]
    missing = [i for i in ids if i not in bursts.index]
    if missing:
        raise ValueError(f"{len(missing)} ids are not {split} images of {where}, e.g. {missing[0]!r}")
    return bursts.loc[ids].to_numpy(dtype=np.int64)
