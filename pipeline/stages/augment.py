"""Augment stage: the albumentations policy, materialised views of every image, and a preview grid.

The frozen backbone only has to see each view once (the train stage caches its embeddings), so the views
are drawn here, once, and stored: `views[v, i]` is view v of image i (see docs/ARCHITECTURE.md).
Views `0 .. tta_views-1` are deterministic test-time views of every image (identity, horizontal flip,
vertical flip, both) so out-of-fold and test predictions average over the same views. The next
`train_views` are random draws of the training policy, for training images only.

The policy targets what the fisheries photos vary in: the fish's pose and place on the deck (flips, small
rotations, shifts and zooms), the lighting (brightness, contrast, hue) and night-vision frames (green,
low-contrast), which the strong solutions found needed augmentation of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.augmentation import make_views, train_policy
from pipeline.core.files import atomic_path, save_figure
from pipeline.core.manifest import read_manifest
from pipeline.core.params import Augment, Paths, load, stage_parser


@dataclass(frozen=True)
class Settings:
    seed: int
    paths: Paths
    augment: Augment


def preview(images: np.ndarray, labels: list[str], cfg: Augment, seed: int):
    """A grid: each row one training image, its original and augmented draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policy = train_policy(cfg)
    policy.set_random_seed(seed)
    rows, cols = len(images), 6
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.7), squeeze=False)
    for r, (image, label) in enumerate(zip(images, labels, strict=True)):
        for c in range(cols):
            shown = image if c == 0 else policy(image=image)["image"]
            axes[r, c].imshow(shown)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if c == 0:
                axes[r, c].set_ylabel(label, fontsize=8)
            if r == 0:
                axes[r, c].set_title("original" if c == 0 else f"draw {c}", fontsize=8)
    fig.suptitle("augmentation policy (params.yaml: augment)", fontsize=10)
    fig.tight_layout()
    return fig


def preview_rows(labels: np.ndarray, is_train: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Rows for the preview: one training image per class where possible, so every kind of frame shows."""
    train_idx = np.flatnonzero(is_train)
    first = {}
    for i in train_idx:
        first.setdefault(labels[i], i)
    picks = np.array(sorted(first.values()), dtype=np.int64)[:n]
    if len(picks) < min(n, 8):
        picks = np.random.default_rng(seed).choice(train_idx, size=min(len(train_idx), 8), replace=False)
    return picks


def run(s: Settings) -> int:
    """Write every view of every image and the preview grid; returns the number of views."""
    paths, cfg = s.paths, s.augment
    manifest = read_manifest(paths.manifest)
    images = np.load(paths.images, mmap_mode="r")
    is_train = (manifest["split"] == "train").to_numpy()
    n_views = cfg.tta_views + cfg.train_views
    with atomic_path(paths.views) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n_views, *images.shape))
        make_views(images, is_train, cfg, s.seed, out=out)
        out.flush()
        del out
    picks = preview_rows(manifest["label"].to_numpy(), is_train, cfg.preview_samples, s.seed)
    fig = preview([images[i] for i in picks], manifest.loc[picks, "label"].tolist(), cfg, s.seed)
    save_figure(fig, f"{paths.figures}/augment_preview.png")
    return n_views


def main(argv: list[str] | None = None) -> None:
    settings = load(Settings, stage_parser(__doc__).parse_args(argv).params)
    n_views = run(settings)
    print(f"augment: {n_views} views of every image → {settings.paths.views}")


if __name__ == "__main__":
    main()
