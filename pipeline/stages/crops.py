"""Crops stage: the square around each frame's localised fish, cut from the original frame (`python -m pipeline crops`).

Every manifest row gets one crop (`pipeline.core.crops.cut`) at `crops.image_size`, cut from the frame at its
own resolution, not from the small cache, so a fish of 3% of a 1280 px frame still fills the crop. A training
image's crop comes from its out-of-fold box, so the crop classifiers train on crops like the test crops:
wherever the localiser went wrong, on a training frame as on a test frame. A NoF frame still gets the crop of
its most fish-like spot, which is exactly what the classifier must learn to call NoF; nothing falls back to
the whole frame. `crops.boxes: truth` cuts around the annotation boxes instead, where there are some (on the
demo the test frames' true boxes too): a what-if that says how much a perfect localiser would add, never what
a submission may use.

The crops then get their stored views like the frames (`paths.crop_views`: test-time flips for every row,
training draws for training rows), and the crop classifiers train on them through the train stage
(`train-crop@<backbone>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.core.augmentation import make_views
from pipeline.core.crops import cut
from pipeline.core.decode import decode_bytes
from pipeline.core.files import atomic_path, save_figure
from pipeline.core.manifest import read_manifest
from pipeline.core.params import Augment, Crops, Paths, load, stage_parser


@dataclass(frozen=True)
class Settings:
    seed: int
    paths: Paths
    crops: Crops
    augment: Augment


def crop_boxes(manifest: pd.DataFrame, localised: pd.DataFrame, cfg: Crops, paths: Paths) -> np.ndarray:
    """(N, 4) the box each manifest row is cut around: the localised one, or with `boxes: truth` the largest
    annotation box (training) or true box (test) where the frame has one."""
    if list(localised["id"]) != list(manifest["id"]) or list(localised["split"]) != list(manifest["split"]):
        raise ValueError(f"{paths.localised} is not row-aligned with {paths.manifest}: run the localise stage again")
    boxes = localised[["x", "y", "width", "height"]].to_numpy(np.float64)
    if cfg.boxes == "truth":
        truths = [(pd.read_csv(paths.boxes), "id", "train")]
        if Path(paths.solution_boxes).is_file():
            truths.append((pd.read_csv(paths.solution_boxes), "image", None))
        for table, key, split in truths:
            if table.empty:
                continue
            table = table.assign(area=table["width"] * table["height"]).sort_values("area").groupby(key).tail(1)
            largest = table.set_index(key)[["x", "y", "width", "height"]]
            for r, (name, row_split) in enumerate(zip(manifest["id"], manifest["split"], strict=True)):
                if (row_split == "train") == (split == "train") and name in largest.index:
                    boxes[r] = largest.loc[name].to_numpy(np.float64)
    return boxes


def cut_all(manifest: pd.DataFrame, boxes: np.ndarray, cfg: Crops, out: np.ndarray) -> None:
    for r, path in enumerate(tqdm(manifest["path"], desc="crops", unit="img", mininterval=2)):
        rgb = decode_bytes(Path(path).read_bytes())[0]
        if rgb is None:  # ingest decoded it before: the file changed since
            raise ValueError(f"{path} no longer decodes; run the ingest stage again")
        out[r] = cut(rgb, tuple(boxes[r]), cfg.margin, cfg.min_side, cfg.image_size)


def plot_crops(crops: np.ndarray, labels: list[str], per_class: int = 6):
    """A row of training crops per class: what the crop classifiers learn from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(set(labels))
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 1.3, len(classes) * 1.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, cls in enumerate(classes):
        picks = [i for i, lab in enumerate(labels) if lab == cls][:per_class]
        for col, i in enumerate(picks):
            axes[row, col].imshow(crops[i])
        axes[row, 0].set_title(cls, fontsize=7, loc="left")
    fig.suptitle("training crops around the out-of-fold boxes, by class", fontsize=9)
    fig.tight_layout()
    return fig


def run(s: Settings) -> int:
    """Write every crop and its views, and the preview; returns the number of crops."""
    paths, cfg = s.paths, s.crops
    manifest = read_manifest(paths.manifest)
    boxes = crop_boxes(manifest, pd.read_csv(paths.localised, keep_default_na=False), cfg, paths)
    shape = (len(manifest), cfg.image_size, cfg.image_size, 3)
    with atomic_path(paths.crop_images) as tmp:
        crops = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        cut_all(manifest, boxes, cfg, crops)
        crops.flush()
        del crops
    crops = np.load(paths.crop_images, mmap_mode="r")
    is_train = (manifest["split"] == "train").to_numpy()
    n_views = s.augment.tta_views + s.augment.train_views
    with atomic_path(paths.crop_views) as tmp:
        views = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n_views, *shape))
        make_views(crops, is_train, s.augment, s.seed, out=views, desc="crop views")
        views.flush()
        del views
    train = np.flatnonzero(is_train)
    save_figure(plot_crops(np.asarray(crops[train]), manifest["label"].iloc[train].tolist()),
                Path(paths.figures) / "crops.png")
    return len(manifest)


def main(argv: list[str] | None = None) -> None:
    settings = load(Settings, stage_parser(__doc__).parse_args(argv).params)
    n = run(settings)
    print(f"crops: {n} crops of {settings.crops.image_size} px around the {settings.crops.boxes} boxes → "
          f"{settings.paths.crop_images}, views → {settings.paths.crop_views}")


if __name__ == "__main__":
    main()
