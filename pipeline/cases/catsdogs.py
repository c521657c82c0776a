"""Course study case 3: cats vs dogs by transfer learning, on the fisheries pipeline's backbone and head.

A frozen backbone from the shared registry turns each image into a pooled embedding (cached in
`catsdogs.embeddings`, reused while the images and extractor settings are unchanged) and the shared head is
trained on the embeddings with the shared loop (`pipeline.training.fit_head`), then scored once on a held-out
test split. Sources (`catsdogs.source`):

- `kaggle`: the dogs-vs-cats competition's `train.zip` (`train/cat.N.jpg`, `train/dog.N.jpg`), read in place;
- `petimages`: Microsoft's `PetImages/Cat/*.jpg`, `PetImages/Dog/*.jpg`, which ships with corrupt and empty
  files: they are listed with the reason in `reports/catsdogs/quarantine.json` and left out;
- `demo` (default): generated cartoon cats and dogs (pointed vs floppy or rounded ears, short nose and
  whiskers vs long snout, overlapping fur colours) on varied backgrounds, for an offline run in seconds.

With `weights: none` the backbone is randomly initialised (the offline demo), so the score measures how much
a random convolutional feature map separates the classes, not what ImageNet weights would give.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline import config, tracking
from pipeline.cases import common
from pipeline.models import validate_model_settings

CLASSES = ("cat", "dog")
KAGGLE_NAME = re.compile(r"(?:^|/)(cat|dog)\.\d+\.jpe?g$", re.IGNORECASE)
MAX_IMAGE_BYTES = 50_000_000  # a larger "photo" in either archive is a zip bomb or a mistake, not a pet


@dataclass(frozen=True)
class HeadTraining:
    """What `pipeline.training.fit_head` reads from its training settings."""

    epochs: int
    batch_size: int
    learning_rate: float
    patience: int
    label_smoothing: float


@dataclass(frozen=True)
class CatsDogsParams:
    source: Literal["demo", "kaggle", "petimages"]
    data_dir: str  # holds train.zip (kaggle) or PetImages/ (petimages)
    max_per_class: int  # real sources: images read per class, 0 = all (25,000 images are GPU work)
    demo_images: int
    resize: Literal["pad", "crop", "stretch"]
    backbone: str
    weights: str
    image_size: int
    pooling: Literal["avg", "max"]
    extract_batch_size: int
    test_fraction: float
    val_fraction: float  # of the non-test rows, for the head's early stopping
    head: config.Head
    train: HeadTraining
    embeddings: str
    reports: str


@dataclass
class Loaded:
    images: np.ndarray  # (N, S, S, 3) uint8 RGB
    labels: np.ndarray  # 0 cat, 1 dog
    names: list[str]
    quarantined: list[dict]  # {"file", "reason"} for every file that could not be used


# ------------------------------------------------------------------------------------------ demo images

CAT_FUR = ((230, 140, 60), (150, 150, 150), (40, 40, 40), (235, 230, 220), (120, 90, 60), (200, 170, 120))
DOG_FUR = ((140, 90, 50), (40, 40, 40), (215, 175, 100), (235, 230, 220), (150, 150, 150), (100, 60, 30))


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


def _jitter(rng: np.random.Generator, colour, amount: float = 35.0) -> tuple[float, ...]:
    return tuple(float(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain, gradient, striped or blotchy: the backbone must not separate the classes by their setting."""
    import cv2

    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.integers(0, 256, 3)
    kind, other = rng.integers(4), rng.integers(0, 256, 3)
    if kind == 1:
        t = np.linspace(0, 1, size)[:, None, None]
        img = img * (1 - t) + other * t
    elif kind == 2:
        img[:, np.arange(size) // int(rng.integers(3, 9)) % 2 == 1] = other
    elif kind == 3:
        for _ in range(int(rng.integers(3, 8))):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            cv2.circle(img, _pt(*rng.integers(0, size, 2)), int(rng.integers(2, size // 4)), colour, -1)
    return np.ascontiguousarray(img)


def draw_animal(rng: np.random.Generator, size: int, dog: bool) -> np.ndarray:
    """One cartoon cat or dog face; ears, eyes and snout carry the class, fur colours overlap."""
    import cv2

    img = _background(rng, size)
    s = size / 96
    cx, cy = size / 2 + rng.normal(0, 6 * s), size / 2 + rng.normal(4 * s, 5 * s)
    r = rng.uniform(20, 28) * s
    palette = DOG_FUR if dog else CAT_FUR
    fur = _jitter(rng, palette[rng.integers(len(palette))])
    dark = tuple(c * 0.5 for c in fur)
    if dog and rng.random() < 0.75:  # floppy ears hanging at the sides of the head
        for side in (-1, 1):
            cv2.ellipse(
                img,
                _pt(cx + side * r * 0.95, cy + r * 0.1),
                _pt(r * 0.35, r * 0.8),
                side * rng.uniform(5, 25),
                0,
                360,
                dark,
                -1,
            )
    elif dog:  # upright but rounded
        for side in (-1, 1):
            cv2.ellipse(
                img,
                _pt(cx + side * r * 0.6, cy - r * 0.8),
                _pt(r * 0.3, r * 0.45),
                side * 20,
                0,
                360,
                fur,
                -1,
            )
    else:  # pointed triangles with a pink inside
        for side in (-1, 1):
            b1, b2 = (cx + side * r * 0.2, cy - r * 0.7), (cx + side * r * 0.95, cy - r * 0.25)
            tip = (cx + side * r * 0.75, cy - r * 0.7 - r * rng.uniform(0.8, 1.1))
            cv2.fillPoly(img, [np.array([_pt(*b1), _pt(*tip), _pt(*b2)], np.int32)], fur)
            inner = [
                _pt(b1[0] * 0.8 + tip[0] * 0.2, b1[1] * 0.6 + tip[1] * 0.4),
                _pt(*tip),
                _pt(b2[0] * 0.8 + tip[0] * 0.2, b2[1] * 0.6 + tip[1] * 0.4),
            ]
            cv2.fillPoly(img, [np.array(inner, np.int32)], _jitter(rng, (220, 150, 160), 20))
    cv2.ellipse(img, _pt(cx, cy), _pt(r, r * rng.uniform(0.85, 1.0)), 0, 0, 360, fur, -1)
    if not dog and rng.random() < 0.5:  # tabby forehead stripes
        for k in (-1, 0, 1):
            cv2.line(
                img,
                _pt(cx + k * r * 0.3, cy - r * 0.95),
                _pt(cx + k * r * 0.25, cy - r * 0.55),
                dark,
                max(1, int(2 * s)),
            )
    for side in (-1, 1):  # eyes: round and dark for dogs, almond with a slit pupil for cats
        ex, ey = cx + side * r * 0.4, cy - r * 0.15
        if dog:
            cv2.circle(img, _pt(ex, ey), max(1, int(r * 0.12)), (30, 20, 10), -1)
        else:
            cv2.ellipse(
                img, _pt(ex, ey), _pt(r * 0.17, r * 0.11), 0, 0, 360, _jitter(rng, (160, 200, 60), 25), -1
            )
            cv2.ellipse(img, _pt(ex, ey), _pt(r * 0.03 + 1, r * 0.1), 0, 0, 360, (10, 10, 10), -1)
    if dog:  # a long, lighter snout with a big nose, sometimes a tongue
        length = r * rng.uniform(0.7, 1.0)
        snout = _jitter(rng, tuple(min(255.0, c * 1.15 + 20) for c in fur), 15)
        cv2.ellipse(img, _pt(cx, cy + r * 0.35), _pt(r * 0.45, length * 0.6), 0, 0, 360, snout, -1)
        cv2.ellipse(
            img, _pt(cx, cy + r * 0.35 + length * 0.35), _pt(r * 0.2, r * 0.13), 0, 0, 360, (15, 15, 15), -1
        )
        if rng.random() < 0.4:
            cv2.ellipse(
                img,
                _pt(cx, cy + r * 0.35 + length * 0.75),
                _pt(r * 0.15, r * 0.22),
                0,
                0,
                180,
                (230, 110, 130),
                -1,
            )
    else:  # a small pink nose and whiskers
        ny = cy + r * 0.25
        nose = np.array([_pt(cx - r * 0.1, ny), _pt(cx + r * 0.1, ny), _pt(cx, ny + r * 0.1)], np.int32)
        cv2.fillPoly(img, [nose], _jitter(rng, (230, 140, 150), 20))
        whisker = (235, 235, 235) if np.mean(fur) < 128 else (30, 30, 30)
        for side in (-1, 1):
            for k in (-1, 0, 1):
                cv2.line(
                    img,
                    _pt(cx + side * r * 0.2, ny + r * 0.15),
                    _pt(cx + side * r * 1.2, ny + r * 0.15 + k * r * 0.2),
                    whisker,
                    1,
                )
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.0))
    img += rng.normal(0, rng.uniform(3, 12), img.shape)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return np.clip(img, 0, 255).astype(np.uint8)


def demo_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` images, half cats (0) and half dogs (1) in a shuffled order."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    return np.stack([draw_animal(rng, size, bool(d)) for d in labels]), labels.astype(np.int64)


# ------------------------------------------------------------------------------------------ real sources


def _sample(items: list, per_class: int, rng: np.random.Generator) -> list:
    if not per_class or len(items) <= per_class:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), per_class, replace=False))]


def _decode_all(entries, read, size: int, resize: str) -> Loaded:
    """Decode (name, label) entries whose bytes `read(name)` returns; bad files go to the quarantine list."""
    from pipeline.decode import decode_bytes, fit_square

    images, labels, names, quarantined = [], [], [], []
    for name, label in entries:
        try:
            data = read(name)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            quarantined.append({"file": name, "reason": f"unreadable: {type(exc).__name__}: {exc}"})
            continue
        # Given the target size, large JPEGs are decoded at a reduced scale: much faster, same result.
        rgb, _note, reason, _original = decode_bytes(data, size, resize)
        if reason:
            quarantined.append({"file": name, "reason": reason})
            continue
        images.append(fit_square(rgb, size, resize))
        labels.append(label)
        names.append(name)
    if len(set(labels)) < 2:
        raise ValueError(f"after quarantining {len(quarantined)} file(s), fewer than two classes are left")
    return Loaded(np.stack(images), np.asarray(labels, np.int64), names, quarantined)


def load_kaggle_zip(zip_path: Path, size: int, resize: str, per_class: int, seed: int) -> Loaded:
    """Kaggle's dogs-vs-cats `train.zip`, read member by member without extracting it."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(zip_path) as archive:
        infos = {i.filename: i for i in archive.infolist() if KAGGLE_NAME.search(i.filename)}
        by_class = [sorted(n for n in infos if KAGGLE_NAME.search(n).group(1).lower() == c) for c in CLASSES]
        if not all(by_class):
            raise ValueError(
                f"{zip_path} holds no train/cat.N.jpg or no train/dog.N.jpg: is it Kaggle's train.zip?"
            )
        entries = [(n, label) for label, names in enumerate(by_class) for n in _sample(names, per_class, rng)]

        def read(name: str) -> bytes:
            if infos[name].file_size > MAX_IMAGE_BYTES:
                raise ValueError(f"{infos[name].file_size} bytes once unpacked, over {MAX_IMAGE_BYTES}")
            return archive.read(name)

        return _decode_all(entries, read, size, resize)


def load_petimages(root: Path, size: int, resize: str, per_class: int, seed: int) -> Loaded:
    """Microsoft's `PetImages/{Cat,Dog}/*.jpg` (other files there, such as Thumbs.db, are not images)."""
    rng = np.random.default_rng(seed)
    by_class = [
        sorted(p for p in (root / c.title()).glob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        for c in CLASSES
    ]
    if not all(by_class):
        raise ValueError(f"{root} needs non-empty Cat/ and Dog/ folders of .jpg files")
    entries = [
        (str(p), label) for label, paths in enumerate(by_class) for p in _sample(paths, per_class, rng)
    ]

    def read(name: str) -> bytes:
        if Path(name).stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"{Path(name).stat().st_size} bytes, over {MAX_IMAGE_BYTES}")
        return Path(name).read_bytes()

    return _decode_all(entries, read, size, resize)


def load_source(cfg: CatsDogsParams, seed: int) -> Loaded:
    if cfg.source == "demo":
        images, labels = demo_images(cfg.demo_images, cfg.image_size, seed)
        return Loaded(images, labels, [f"demo/{CLASSES[y]}.{i}" for i, y in enumerate(labels)], [])
    data_dir = Path(cfg.data_dir)
    if cfg.source == "kaggle":
        zip_path = data_dir / "train.zip"
        if not zip_path.exists():
            raise FileNotFoundError(
                f"{zip_path} not found. Download the dogs-vs-cats competition's train.zip (accept its rules"
                f" on kaggle.com, run `kaggle competitions download -c dogs-vs-cats`, unzip the outer zip)"
                f" into {data_dir}/, or set catsdogs.source: demo in params.yaml."
            )
        return load_kaggle_zip(zip_path, cfg.image_size, cfg.resize, cfg.max_per_class, seed)
    root = data_dir / "PetImages"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} not found. Unzip Microsoft's kagglecatsanddogs archive (Microsoft Download Center,"
            f" 'Kaggle Cats and Dogs Dataset') into {data_dir}/ so that {root}/Cat and {root}/Dog exist,"
            f" or set catsdogs.source: demo in params.yaml."
        )
    return load_petimages(root, cfg.image_size, cfg.resize, cfg.max_per_class, seed)


def write_quarantine(path: Path, source: str, data: Loaded) -> None:
    """Every file left out and why, written even when empty so a clean source is visibly clean."""
    from pipeline.io import write_json

    write_json(
        path,
        {
            "source": source,
            "n_used": len(data.labels),
            "n_quarantined": len(data.quarantined),
            "files": data.quarantined,
        },
    )


# ---------------------------------------------------------------------------------- embeddings and head


def extractor_settings(cfg: CatsDogsParams, seed: int) -> dict:
    return {
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "weights": cfg.weights,
        "pooling": cfg.pooling,
        "seed": seed,
    }


def embed(images: np.ndarray, ext: dict, batch_size: int, cache: Path | None = None) -> np.ndarray:
    """Frozen-backbone features of `images`, reused from `cache` when the images and settings match."""
    import keras

    from pipeline.io import atomic_path
    from pipeline.models import build_extractor
    from pipeline.training import extract_features

    fingerprint = hashlib.sha1(
        images.tobytes() + json.dumps({**ext, "keras": keras.__version__}).encode()
    ).hexdigest()
    if cache is not None and cache.exists():
        with np.load(cache) as npz:
            if str(npz["fingerprint"]) == fingerprint:
                return npz["features"]
    keras.utils.set_random_seed(ext["seed"])  # random-init weights are a function of the seed
    extractor = build_extractor(ext["backbone"], ext["image_size"], ext["weights"], ext["pooling"])
    features = extract_features(extractor, images, batch_size)
    if cache is not None:
        with atomic_path(cache, suffix=".npz") as tmp:
            np.savez(tmp, features=features, fingerprint=np.array(fingerprint))
    return features


def split(labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified, disjoint train / val / test row indices."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    rest, test = train_test_split(rows, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction, stratify=labels[rest], random_state=seed)
    return {"train": train, "val": val, "test": test}


def train_and_evaluate(
    features: np.ndarray, labels: np.ndarray, rows: dict, cfg: CatsDogsParams, seed: int, callbacks=()
) -> tuple[dict, np.ndarray]:
    """Fit the shared head on train rows (early stopping on val rows); score P(dog) on the test rows."""
    from pipeline.training import fit_head

    tr, va, te = rows["train"], rows["val"], rows["test"]
    head, history = fit_head(
        features[tr],
        labels[tr],
        features[va],
        labels[va],
        len(CLASSES),
        cfg.head,
        cfg.train,
        seed,
        callbacks=callbacks,
    )
    score = head.predict(features[te], verbose=0)[:, 1]
    chance = float(max(np.mean(labels[te]), 1 - np.mean(labels[te])))  # always answering the larger class
    results = {
        **common.binary_scores(labels[te], score),
        "chance_accuracy": chance,
        "epochs_run": len(history["loss"]),
        "best_val_loss": float(min(history["val_loss"])),
    }
    return results, score


def summarise(cfg: CatsDogsParams, data: Loaded, rows: dict, results: dict, score: np.ndarray) -> tuple:
    """The metrics JSON and the test ROC curve."""
    sizes = {f"n_{k}": len(v) for k, v in rows.items()}
    summary = {
        "source": cfg.source,
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        **sizes,
        "n_quarantined": len(data.quarantined),
        **results,
    }
    curve = {f"{cfg.backbone} + head": (data.labels[rows["test"]], score)}
    return summary, common.roc_figure(curve, f"Cats vs dogs ({cfg.source}), test set, P(dog)")


def main(params_file: str = "params.yaml") -> dict:
    cfg, seed, tracking_cfg = common.load_params("catsdogs", CatsDogsParams, params_file)
    validate_model_settings([cfg.backbone], cfg.image_size, cfg.weights)
    common.seed_everything(seed)
    data = load_source(cfg, seed)
    write_quarantine(Path(cfg.reports) / "quarantine.json", cfg.source, data)
    rows = split(data.labels, cfg.test_fraction, cfg.val_fraction, seed)
    params = {"seed": seed, **config.flatten(cfg)}
    with common.strategy(params_file).scope(), tracking.start_run(
        tracking_cfg, f"catsdogs-{cfg.source}", params, experiment="catsdogs"
    ):
        ext = extractor_settings(cfg, seed)
        features = embed(data.images, ext, cfg.extract_batch_size, Path(cfg.embeddings))
        logger = tracking.EpochLogger("head.")
        results, score = train_and_evaluate(features, data.labels, rows, cfg, seed, [logger])
        summary, figure = summarise(cfg, data, rows, results, score)
        common.report(summary, {"roc_curve.png": figure}, cfg.reports)
        tracking.log_artifact(Path(cfg.reports) / "quarantine.json")
    print(
        f"catsdogs ({cfg.source}, {cfg.backbone}, weights {cfg.weights}): test accuracy "
        f"{results['test_accuracy']:.4f} (chance {results['chance_accuracy']:.4f}), "
        f"AUC {results['test_roc_auc']:.4f}"
    )
    return summary


if __name__ == "__main__":
    main()
