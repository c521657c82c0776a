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

import albumentations as A
import cv2
import keras
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import config
from pipeline.io import atomic_path, save_figure

TTA_MAX = 4


class NightVision(A.ImageOnlyTransform):
    """Turn a daylight frame into a night-vision one: grey luminance, low contrast, noise, green tint."""

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
        grey = 40 + 0.55 * grey + self.random_generator.normal(0, 6, grey.shape)
        out = np.stack([0.35 * grey, grey, 0.45 * grey], axis=-1)
        return np.clip(out, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


def train_policy(cfg: config.Augment) -> A.Compose:
    """The random augmentation applied to training images (and online during fine-tuning)."""
    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.hflip),
            A.VerticalFlip(p=cfg.vflip),
            A.Affine(
                scale=(1 - cfg.scale_limit, 1 + cfg.scale_limit),
                translate_percent=(-cfg.shift_limit, cfg.shift_limit),
                rotate=(-cfg.rotate_limit, cfg.rotate_limit),
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.8,
            ),
            A.RandomBrightnessContrast(cfg.brightness_contrast, cfg.brightness_contrast, p=0.7),
            A.HueSaturationValue(cfg.hue_shift, cfg.hue_shift * 1.5, cfg.hue_shift, p=0.5),
            NightVision(p=cfg.night_vision),
            A.GaussianBlur(blur_limit=(3, 5), p=cfg.blur),
        ]
    )


class AugmentedBatches(keras.utils.PyDataset):
    """Online augmentation for fine-tuning: shuffled batches of policy draws read from the image cache.

    Reads the memory-mapped working-resolution cache, so no JPEG is decoded during training; worker threads
    overlap augmentation with the model's step. With `replicas` > 1 (a `tf.distribute` strategy's
    `num_replicas_in_sync`) the last batch of an epoch is cut to a multiple of it, since Keras fails on a
    batch that does not split evenly over the replicas; the few rows left out change every epoch.
    """

    def __init__(self, images, rows, labels, n_classes, batch_size, policy, seed, workers=2, replicas=1, **kwargs):
        super().__init__(workers=workers, **kwargs)
        self.images, self.rows, self.batch_size, self.policy = images, np.asarray(rows), batch_size, policy
        if batch_size % replicas:
            raise ValueError(f"batch size {batch_size} does not split evenly over {replicas} replicas: "
                             "make train.fine_tune.batch_size a multiple of the number of GPUs")
        usable = len(self.rows) - (len(self.rows) % batch_size) % replicas
        if usable < replicas:
            raise ValueError(f"{len(self.rows)} rows cannot fill a batch for {replicas} replicas")
        self.usable = usable
        self.targets = keras.utils.to_categorical(np.asarray(labels), n_classes)
        self.rng = np.random.default_rng(seed)
        self.policy.set_random_seed(seed)
        self.order = self.rng.permutation(len(self.rows))

    def __len__(self) -> int:
        return -(-self.usable // self.batch_size)

    def __getitem__(self, i: int):
        pos = self.order[i * self.batch_size : min((i + 1) * self.batch_size, self.usable)]
        batch = np.stack([self.policy(image=np.asarray(self.images[self.rows[j]]))["image"] for j in pos])
        return batch.astype(np.float32), self.targets[pos]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.rows))


def tta_view(image: np.ndarray, v: int) -> np.ndarray:
    """Deterministic test-time view v: 0 identity, 1 horizontal flip, 2 vertical flip, 3 both."""
    if v == 0:
        return image
    return cv2.flip(image, {1: 1, 2: 0, 3: -1}[v])


def make_views(
    images: np.ndarray, is_train: np.ndarray, cfg: config.Augment, seed: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Fill (or return) the (tta_views + train_views, N, S, S, 3) uint8 array of views."""
    if not 1 <= cfg.tta_views <= TTA_MAX:
        raise ValueError(f"augment.tta_views must be between 1 and {TTA_MAX}, got {cfg.tta_views}")
    n_views = cfg.tta_views + cfg.train_views
    if out is None:
        out = np.zeros((n_views, *images.shape), dtype=np.uint8)
    policy = train_policy(cfg)
    policy.set_random_seed(seed)
    for i in tqdm(range(len(images)), desc="augment", unit="img", mininterval=2):
        image = np.asarray(images[i])
        for v in range(cfg.tta_views):
            out[v, i] = tta_view(image, v)
        if is_train[i]:
            for v in range(cfg.tta_views, n_views):
                out[v, i] = policy(image=image)["image"]
    return out


def preview(images: np.ndarray, labels: list[str], cfg: config.Augment, seed: int):
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


def main() -> None:
    raw = config.read_params()
    seed = raw["seed"]
    paths: config.Paths = config.load_section("paths", raw)
    cfg: config.Augment = config.load_section("augment", raw)

    manifest = pd.read_csv(paths.manifest, keep_default_na=False)
    images = np.load(paths.images, mmap_mode="r")
    is_train = (manifest["split"] == "train").to_numpy()
    n_views = cfg.tta_views + cfg.train_views
    with atomic_path(paths.views) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n_views, *images.shape))
        make_views(images, is_train, cfg, seed, out=out)
        out.flush()
        del out

    rng = np.random.default_rng(seed)
    train_idx = np.flatnonzero(is_train)
    # One sample per class where possible, so the preview shows the policy on every kind of frame.
    picks = manifest.iloc[train_idx].groupby("label").head(1).index.to_numpy()[: cfg.preview_samples]
    if len(picks) < min(cfg.preview_samples, 8):
        picks = rng.choice(train_idx, size=min(len(train_idx), 8), replace=False)
    fig = preview([images[i] for i in picks], manifest.loc[picks, "label"].tolist(), cfg, seed)
    save_figure(fig, f"{paths.figures}/augment_preview.png")
    print(f"augment: {n_views} views × {len(images)} images → {paths.views}")


if __name__ == "__main__":
    main()
