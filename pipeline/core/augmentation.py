"""The augmentation policy itself: albumentations transforms, test-time views and batch draws.

No Keras or TensorFlow here: the worker processes that draw fine-tuning batches (`pipeline.core.batches`)
import only this, OpenCV and albumentations.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from tqdm import tqdm

from pipeline.core.params import Augment

TTA_MAX = 4


class NightVision(A.ImageOnlyTransform):
    """Turn a daylight frame into a night-vision one: grey luminance, low contrast, noise, green tint."""

    TINT = np.array([[0.35], [1.0], [0.45]], np.float32)  # grey -> (R, G, B)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
        noise = self.random_generator.standard_normal(grey.shape, dtype=np.float32)
        grey = cv2.scaleAdd(grey, 0.55, cv2.addWeighted(noise, 6.0, noise, 0.0, 40.0))  # 40 + 0.55 g + N(0, 6)
        # OpenCV does the per-pixel work (and lets other threads run meanwhile); it saturates to 0..255.
        return cv2.transform(grey[..., None], self.TINT).round().clip(0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


def train_policy(cfg: Augment) -> A.Compose:
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


def photometric_policy(cfg: Augment) -> A.Compose:
    """What varies between boats and cameras but does not move anything: light, colour, grey and night vision.
    The localiser's augmentation (its flips move the boxes and are done beside it)."""
    return A.Compose(
        [
            A.RandomBrightnessContrast(cfg.brightness_contrast, cfg.brightness_contrast, p=0.7),
            A.HueSaturationValue(cfg.hue_shift * 1.5, cfg.hue_shift * 2.5, cfg.hue_shift * 1.5, p=0.7),
            A.ToGray(p=0.1),
            NightVision(p=cfg.night_vision),
        ]
    )


def draw_rows(images: np.ndarray, rows: np.ndarray, policy: A.Compose, seed: int) -> np.ndarray:
    """One batch of policy draws: `images[rows]` augmented from a generator seeded by `seed`, uint8."""
    policy.set_random_seed(seed)
    batch = np.empty((len(rows), *images.shape[1:]), dtype=np.uint8)
    for out, row in zip(batch, rows, strict=True):
        out[...] = policy(image=np.asarray(images[row]))["image"]
    return batch


_WORKER: dict = {}  # what a worker process of AugmentedBatches holds: the cache, opened once, and its policy


def start_worker(path: str, policy: A.Compose) -> None:
    cv2.setNumThreads(1)  # one process per core already
    _WORKER.update(images=np.load(path, mmap_mode="r"), policy=policy)


def draw_in_worker(rows: np.ndarray, seed: int) -> np.ndarray:
    return draw_rows(_WORKER["images"], rows, _WORKER["policy"], seed)


def tta_view(image: np.ndarray, v: int) -> np.ndarray:
    """Deterministic test-time view v: 0 identity, 1 horizontal flip, 2 vertical flip, 3 both."""
    if v == 0:
        return image
    return cv2.flip(image, {1: 1, 2: 0, 3: -1}[v])


def make_views(
    images: np.ndarray, is_train: np.ndarray, cfg: Augment, seed: int, out: np.ndarray | None = None,
    desc: str = "augment",
) -> np.ndarray:
    """Fill (or return) the (tta_views + train_views, N, S, S, 3) uint8 array of views."""
    if not 1 <= cfg.tta_views <= TTA_MAX:
        raise ValueError(f"augment.tta_views must be between 1 and {TTA_MAX}, got {cfg.tta_views}")
    n_views = cfg.tta_views + cfg.train_views
    if out is None:
        out = np.zeros((n_views, *images.shape), dtype=np.uint8)
    policy = train_policy(cfg)
    policy.set_random_seed(seed)
    for i in tqdm(range(len(images)), desc=desc, unit="img", mininterval=2):
        image = np.asarray(images[i])
        for v in range(cfg.tta_views):
            out[v, i] = tta_view(image, v)
        if is_train[i]:
            for v in range(cfg.tta_views, n_views):
                out[v, i] = policy(image=image)["image"]
    return out
