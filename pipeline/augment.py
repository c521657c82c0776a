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

import copy
import multiprocessing as mp
import threading
from concurrent.futures import ProcessPoolExecutor

import keras
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import config
from pipeline.io import atomic_path, save_figure
from pipeline.policy import TTA_MAX, NightVision, draw_in_worker, draw_rows, start_worker, train_policy, tta_view
from pipeline.training import rows_for_replicas

__all__ = ["TTA_MAX", "AugmentedBatches", "NightVision", "make_views", "preview", "train_policy", "tta_view"]

class AugmentedBatches(keras.utils.PyDataset):
    """Online augmentation for fine-tuning: shuffled batches of policy draws read from the image cache.

    Reads the memory-mapped working-resolution cache, so no JPEG is decoded during training. Batches stay
    uint8: the model casts them on its device, a quarter of the bytes a float batch would move. Each batch
    draws from a generator seeded by (seed, epoch, batch), so a batch is the same whoever draws it.

    Who draws: `processes=0`, `workers` threads of this process. Augmentation holds Python's lock for much
    of its time, so threads stop helping at two or three (bench.gpu). `processes=N` (N > 0, needs a
    memory-mapped `images`): N worker processes, started with `spawn` (forking a process that runs
    TensorFlow can deadlock) on the first batch and stopped by `close()`; each opens the cache itself, and
    `workers` threads keep them all busy.

    With `replicas` > 1 (a `tf.distribute` strategy's `num_replicas_in_sync`) the last batch of an epoch is
    cut to a multiple of it, since Keras fails on a batch that does not split evenly over the replicas; the
    few rows left out change every epoch.
    """

    def __init__(self, images, rows, labels, n_classes, batch_size, policy, seed, workers=2, replicas=1,
                 processes=0, **kwargs):
        super().__init__(workers=max(workers, processes), **kwargs)
        if processes and not getattr(images, "filename", None):
            raise ValueError("worker processes read the image cache from disk: pass a memory-mapped array")
        self.images, self.rows, self.batch_size, self.policy = images, np.asarray(rows), batch_size, policy
        # As many rows as the shared rule keeps (it also refuses a batch size the replicas cannot share); which
        # rows are left out changes with every epoch's order.
        self.usable = len(rows_for_replicas(len(self.rows), batch_size, replicas, seed))
        if self.usable < replicas:
            raise ValueError(f"{len(self.rows)} rows cannot fill a batch for {replicas} replicas")
        self.targets = keras.utils.to_categorical(np.asarray(labels), n_classes)
        self.seed, self.epoch, self.processes = seed, 0, processes
        self.order = np.random.default_rng([seed, 0]).permutation(len(self.rows))
        self._local = threading.local()  # one copy of the policy per thread: its random state is not shared
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __len__(self) -> int:
        return -(-self.usable // self.batch_size)

    def __getitem__(self, i: int):
        pos = self.order[i * self.batch_size : min((i + 1) * self.batch_size, self.usable)]
        rows = self.rows[pos]
        seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
        if self.processes:
            return self._process_pool().submit(draw_in_worker, rows, seed).result(), self.targets[pos]
        policy = getattr(self._local, "policy", None)
        if policy is None:
            policy = self._local.policy = copy.deepcopy(self.policy)
        return draw_rows(self.images, rows, policy, seed), self.targets[pos]

    def _process_pool(self) -> ProcessPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.processes, mp_context=mp.get_context("spawn"),
                                                 initializer=start_worker,
                                                 initargs=(str(self.images.filename), self.policy))
            return self._pool

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None


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
