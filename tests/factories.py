"""Tiny generated inputs for stage tests: a params.yaml rooted in a temp folder, and synthetic images."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.core.calibration import softmax
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.params import Paths, from_dict

ROOT = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    """The repository's params.yaml, as a plain mapping."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def set_dotted(raw: dict, key: str, value) -> None:
    """`raw["a"]["b"] = value` for the dotted key `a.b`."""
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def write_params(root: Path, overrides: dict | None = None, raw: dict | None = None) -> Path:
    """A params.yaml in `root`: `raw` (default the repository's) with dotted-key `overrides` applied."""
    raw = repo_params() if raw is None else raw
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root / "params.yaml"


def section(cls: type, name: str, **overrides):
    """One validated section of the repository's params.yaml, with top-level keys of it overridden."""
    return from_dict(cls, {**repo_params()[name], **overrides}, name)


def tiny_params(root: Path, relative: bool = False, **overrides) -> dict:
    """The repository's params.yaml written into `root`, sizes shrunk for tests.

    Paths are moved under `root` (absolute), or kept relative (`relative=True`, for running DVC in `root`).
    `overrides` are dotted keys: `tiny_params(tmp, **{"cv.n_folds": 3})`.
    """
    raw = repo_params()
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
        "localise.width": 64,
        "localise.height": 48,
        "localise.channels": 8,
        "localise.crop_width": 32,
        "localise.crop_height": 32,
        "localise.steps": 6,
        "localise.batch_size": 8,
        "localise.views": 2,
        # 6 steps a fold take less than starting a fold process (~10 s); conftest's demo_project, the graph as
        # `make repro` runs it, keeps the default (two fold processes on a CPU)
        "localise.processes": 1,
        "crops.backbones": [],  # no crop models unless a test asks (tests.projects' tiny demo does)
        "crops.image_size": 32,
    }
    write_params(root, {**small, **overrides}, raw)
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
                "burst": i,  # every frame its own burst: no near duplicates to smooth over
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


# ------------------------------------------------------------------------------------ model predictions

K = len(FISH_CLASSES)
TRAIN_SHARES = np.array([1719, 200, 117, 67, 465, 299, 176, 734]) / 3777
STAGE2_SHARES = np.array([0.40, 0.108, 0.05, 0.03, 0.12, 0.10, 0.012, 0.18])
#: (signal, noise, sharpness) per synthetic model: decent, overconfident, underconfident and weak.
MODELS = {"vgg16": (2.2, 1.0, 1.0), "resnet50": (1.8, 1.2, 3.0), "xception": (1.2, 1.0, 0.5)}


def noisy_softmax(
    y: np.ndarray, rng: np.random.Generator, signal: float, noise: float, sharp: float
) -> np.ndarray:
    logits = rng.normal(0.0, noise, (len(y), K))
    logits[np.arange(len(y)), y] += signal
    return softmax(sharp * logits)


def synthetic_stack(n=300, models=None, n_folds=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.choice(K, n, p=TRAIN_SHARES)
    folds = rng.permutation(np.arange(n) % n_folds)
    stack = np.stack([noisy_softmax(y, rng, *m) for m in (models or MODELS.values())])
    return stack, y, folds


def write_inputs(root: Path, backbones=tuple(MODELS), n_train=240, n_test=40, n_folds=4, seed=0, burst=1,
                 **overrides):
    """A params.yaml under `root` plus everything the ensemble, submit and score stages read.

    `burst` > 1: consecutive runs of that many training (and test) images share a label, a fold and a burst,
    as the frames of one catch do. Returns the validated `paths` section and the true test labels by name.
    """
    raw = tiny_params(root, **{"model.backbones": list(backbones), **overrides})
    paths = from_dict(Paths, raw["paths"], "paths")
    rng = np.random.default_rng(seed)
    y = np.repeat(rng.choice(K, -(-n_train // burst), p=TRAIN_SHARES), burst)[:n_train]
    folds = np.repeat(rng.permutation(np.arange(-(-n_train // burst)) % n_folds), burst)[:n_train]
    y1 = np.repeat(rng.choice(K, -(-n_test // burst), p=TRAIN_SHARES), burst)[:n_test]
    y2 = np.repeat(rng.choice(K, -(-n_test // burst), p=STAGE2_SHARES), burst)[:n_test]
    runs = np.arange(max(n_train, n_test)) // burst  # ids unique per split, and apart across splits below
    ids = [f"img_{i:05d}.jpg" for i in range(n_train)]
    ids1 = [f"img_{i:05d}.jpg" for i in range(n_train, n_train + n_test)]
    ids2 = [f"test_stg2/image_{i:05d}.jpg" for i in range(n_test)]
    manifest = pd.DataFrame(
        {
            "id": ids + ids1 + ids2,
            "split": ["train"] * n_train + ["test_stg1"] * n_test + ["test_stg2"] * n_test,
            "path": "x.jpg",
            "label": [FISH_CLASSES[c] for c in y] + [""] * (2 * n_test),
            "width": 320,
            "height": 180,
            "group": 0,
            "burst": np.r_[runs[:n_train], runs[:n_test] + n_train, runs[:n_test] + n_train + n_test],
            "sha1": "0",
            "true_boat": "",
        }
    )
    Path(paths.manifest).parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(paths.manifest, index=False)
    for bb in backbones:
        folder = Path(paths.predictions) / bb
        folder.mkdir(parents=True, exist_ok=True)
        params = MODELS.get(bb, (1.5, 1.0, 1.0))
        oof = pd.DataFrame(noisy_softmax(y, rng, *params), columns=list(FISH_CLASSES))
        oof.insert(0, "fold", folds)
        oof.insert(0, "id", ids)
        # Shuffled: the stage must align rows by id, not by position.
        oof.sample(frac=1.0, random_state=1).to_csv(folder / "oof.csv", index=False)
        for name, labels, names in (("test_stg1", y1, ids1), ("test_stg2", y2, ids2)):
            test = pd.DataFrame(noisy_softmax(labels, rng, *params), columns=list(FISH_CLASSES))
            test.insert(0, "id", names)
            test.to_csv(folder / f"{name}.csv", index=False)
    order1 = list(rng.permutation(ids1))
    order2 = order1 + list(rng.permutation(ids2))
    Path(paths.sample_stg1).parent.mkdir(parents=True, exist_ok=True)
    for sample_path, order in ((paths.sample_stg1, order1), (paths.sample_stg2, order2)):
        sample = pd.DataFrame(np.full((len(order), K), 0.125), columns=list(FISH_CLASSES))
        sample.insert(0, "image", order)
        sample.to_csv(sample_path, index=False)
    solution = pd.DataFrame(
        {
            "image": ids1 + ids2,
            "label": [FISH_CLASSES[c] for c in np.r_[y1, y2]],
            "stage": [1] * n_test + [2] * n_test,
        }
    )
    solution.to_csv(paths.solution, index=False)
    return paths, dict(zip(solution["image"], solution["label"], strict=True))


def train_inputs(root: Path, **overrides):
    """What the train stage reads, generated in `root`: tiny params, synthetic images, their augmented views.

    Returns the stage's settings and the manifest. The same call in two folders gives the same inputs.
    """
    from pipeline.core.augmentation import make_views
    from pipeline.core.params import load
    from pipeline.stages import train

    raw = tiny_params(root, **overrides)
    manifest = synthetic_images(root, raw)
    s = load(train.Settings, root / "params.yaml")
    views = make_views(np.load(s.paths.images), (manifest.split == "train").to_numpy(), s.augment, seed=s.seed)
    np.save(s.paths.views, views)
    return s, manifest


def free_ports(n: int) -> list[int]:
    """`n` TCP ports on 127.0.0.1 that nothing listens on now (for a local multi-worker cluster)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
