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

import numpy as np

from pipeline.core import tracking
from pipeline.core.backbones import build_extractor, extract_features, validate_model_settings
from pipeline.core.cases import binary_scores, case_run, report, roc_figure
from pipeline.core.decode import decode_bytes, fit_square
from pipeline.core.devices import everyone, write_path
from pipeline.core.files import save_npz, write_json
from pipeline.core.heads import fit_head
from pipeline.core.params import CatsDogs, Tracking, Train, load, stage_parser
from pipeline.generators.cartoons import demo_images

CLASSES = ("cat", "dog")
KAGGLE_NAME = re.compile(r"(?:^|/)(cat|dog)\.\d+\.jpe?g$", re.IGNORECASE)
MAX_IMAGE_BYTES = 50_000_000  # a larger "photo" in either archive is a zip bomb or a mistake, not a pet


@dataclass(frozen=True)
class Settings:
    seed: int
    catsdogs: CatsDogs
    train: Train  # train.mixed_precision: one precision setting for every pipeline
    tracking: Tracking


@dataclass
class Loaded:
    images: np.ndarray  # (N, S, S, 3) uint8 RGB
    labels: np.ndarray  # 0 cat, 1 dog
    names: list[str]
    quarantined: list[dict]  # {"file", "reason"} for every file that could not be used


# ------------------------------------------------------------------------------------------ real sources


def _sample(items: list, per_class: int, rng: np.random.Generator) -> list:
    if not per_class or len(items) <= per_class:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), per_class, replace=False))]


def _decode_all(entries, read, size: int, resize: str) -> Loaded:
    """Decode (name, label) entries whose bytes `read(name)` returns; bad files go to the quarantine list."""

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


def load_source(cfg: CatsDogs, seed: int) -> Loaded:
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


def extractor_settings(cfg: CatsDogs, seed: int) -> dict:
    return {
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "weights": cfg.weights,
        "pooling": cfg.pooling,
        "seed": seed,
    }


def embed(images: np.ndarray, ext: dict, batch_size: int, cache: Path | None = None) -> np.ndarray:
    """Frozen-backbone features of `images`, reused from `cache` when the images and settings match (on every
    worker of a multi-worker run: building the extractor is a collective step there)."""
    import keras

    fingerprint = hashlib.sha1(
        images.tobytes() + json.dumps({**ext, "keras": keras.__version__}).encode()
    ).hexdigest()
    cached = None
    if cache is not None and cache.exists():
        with np.load(cache) as npz:
            if str(npz["fingerprint"]) == fingerprint:
                cached = npz["features"]
    if everyone(cached is not None):
        return cached
    keras.utils.set_random_seed(ext["seed"])  # random-init weights are a function of the seed
    extractor = build_extractor(ext["backbone"], ext["image_size"], ext["weights"], ext["pooling"])
    features = extract_features(extractor, images, batch_size)
    if cache is not None:
        save_npz(cache, features=features, fingerprint=np.array(fingerprint))
    return features


def split(labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified, disjoint train / val / test row indices."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    rest, test = train_test_split(rows, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction, stratify=labels[rest], random_state=seed)
    return {"train": train, "val": val, "test": test}


def train_and_evaluate(
    features: np.ndarray, labels: np.ndarray, rows: dict, cfg: CatsDogs, seed: int, callbacks=()
) -> tuple[dict, np.ndarray]:
    """Fit the shared head on train rows (early stopping on val rows); score P(dog) on the test rows."""
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
        **binary_scores(labels[te], score),
        "chance_accuracy": chance,
        "epochs_run": len(history["loss"]),
        "best_val_loss": float(min(history["val_loss"])),
    }
    return results, score


def summarise(cfg: CatsDogs, data: Loaded, rows: dict, results: dict, score: np.ndarray) -> tuple:
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
    return summary, roc_figure(curve, f"Cats vs dogs ({cfg.source}), test set, P(dog)")


def run(s: Settings) -> dict:
    """Load the source, embed it with the frozen backbone, train the head, report and log one run."""
    cfg = s.catsdogs
    validate_model_settings([cfg.backbone], cfg.image_size, cfg.weights)
    with case_run(s.seed, s.train.mixed_precision, s.tracking, f"catsdogs-{cfg.source}", cfg, "catsdogs"):
        data = load_source(cfg, s.seed)
        quarantine = write_path(cfg.reports) / "quarantine.json"  # a throw-away copy on a non-chief worker
        write_quarantine(quarantine, cfg.source, data)
        rows = split(data.labels, cfg.test_fraction, cfg.val_fraction, s.seed)
        features = embed(data.images, extractor_settings(cfg, s.seed), cfg.extract_batch_size,
                         write_path(cfg.embeddings))
        results, score = train_and_evaluate(features, data.labels, rows, cfg, s.seed, [tracking.EpochLogger("head.")])
        summary, figure = summarise(cfg, data, rows, results, score)
        report(summary, {"roc_curve.png": figure}, cfg.reports)
        tracking.log_artifact(quarantine)
    return summary


def main(argv: list[str] | None = None) -> None:
    summary = run(load(Settings, stage_parser(__doc__).parse_args(argv).params))
    print(
        f"catsdogs ({summary['source']}, {summary['backbone']}, weights {summary['weights']}): test accuracy "
        f"{summary['test_accuracy']:.4f} (chance {summary['chance_accuracy']:.4f}), AUC {summary['test_roc_auc']:.4f}"
    )


if __name__ == "__main__":
    main()
