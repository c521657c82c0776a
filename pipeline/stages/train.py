"""Train stage: cross-validated transfer learning for one backbone on one input (`python -m pipeline train
--backbone vgg16`; `--input crops` for the crop classifier `vgg16-crop`).

The input is whole frames (`paths.images`, `paths.views`, at `model.image_size`: dvc.yaml's `train@<backbone>`)
or the crops around the localised fish (`paths.crop_images`, `paths.crop_views`, at `crops.image_size`:
`train-crop@<backbone>`); everything else is the same code, so the two families are scored the same way.

Phase 1 (always): the frozen backbone runs once over every stored view of every image and its pooled
embeddings are cached; the dropout + batch-norm head is then trained for each fold on that cache. K-fold CV
so costs about one backbone pass instead of K × epochs passes (bench: `cv_cached_speedup`).
Phase 2 (`train.fine_tune.enabled`, for real data with ImageNet weights): the top blocks are unfrozen and
the whole model is fine-tuned on images with online augmentation, starting from the fold's phase-1 head.

Every fold is checkpointed under `paths.checkpoints/<backbone>/<fingerprint>/`; a killed run started again
resumes at the first unfinished fold and produces the same predictions as an uninterrupted run. Out-of-fold
(OOF) predictions cover every training image; test predictions average the test-time views and the folds.

Under `TF_CONFIG` several machines train each model together (`MultiWorkerMirroredStrategy`): every worker
runs the whole stage, only the chief writes into `paths` and to MLflow, the others write the same files into
a throw-away folder (`pipeline.core.devices.write_path`), and a cache or a fold is reused only when every
worker has it: a worker that skipped a step would leave the others waiting in its collective ops.

The stage also measures how honest its validation is: it repeats phase 1 with the other fold scheme
(`boat` vs `none`) and, when the source has a solution file, records each scheme's CV-to-stage-2 gap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.core import tracking
from pipeline.core.augmentation import train_policy
from pipeline.core.backbones import (
    build_classifier,
    build_extractor,
    extract_features,
    extraction_precision,
    unfreeze_top,
    validate_model_settings,
)
from pipeline.core.batches import AugmentedBatches
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.devices import (
    configure_devices,
    device_summary,
    discard_scratch,
    everyone,
    native_bfloat16,
    replicas,
    scratch_dir,
    task,
    write_path,
)
from pipeline.core.files import file_digest, save_figure, save_keras, save_npz, write_csv, write_json
from pipeline.core.folds import assign_folds
from pipeline.core.heads import ValidationLogLoss, balanced_class_weight, fit_head
from pipeline.core.manifest import read_manifest, train_labels
from pipeline.core.metrics import accuracy, kaggle_log_loss, prior_log_loss
from pipeline.core.params import Augment, Crops, Cv, Model, Paths, Tracking, Train, flatten, load, stage_parser
from pipeline.core.predictions import TEST_SETS, prediction_frame

N_CLASSES = len(FISH_CLASSES)
#: The `paths` this stage writes; a worker other than the chief writes them into its throw-away folder.
WRITES = ("embeddings", "checkpoints", "predictions", "train_reports", "figures")


@dataclass(frozen=True)
class Settings:
    """Everything this stage reads from params.yaml."""

    seed: int
    paths: Paths
    cv: Cv
    model: Model
    train: Train
    augment: Augment
    tracking: Tracking


@dataclass(frozen=True)
class CropSettings(Settings):
    """What a crop classifier reads besides: where and how big its crops are."""

    crops: Crops


#: The settings each input reads, and (for tests/test_dvc_graph.py) the paths only that input touches.
SETTINGS = {"frames": Settings, "crops": CropSettings}
PATHS_BY_INPUT = {"frames": ("images", "views"), "crops": ("crop_images", "crop_views")}


@dataclass(frozen=True)
class Classifier:
    """One model of the ensemble: a backbone on an input, whole frames or the crops around the fish."""

    backbone: str
    input: str  # frames | crops
    image_size: int
    images: str  # the cache the input's views were drawn from (fine-tuning augments it online)
    views: str

    @property
    def name(self) -> str:
        """How its outputs, reports and MLflow runs are named: `vgg16`, or `vgg16-crop`."""
        return self.backbone if self.input == "frames" else f"{self.backbone}-crop"


def classifier(backbone: str, s: Settings) -> Classifier:
    if isinstance(s, CropSettings):
        return Classifier(backbone, "crops", s.crops.image_size, s.paths.crop_images, s.paths.crop_views)
    return Classifier(backbone, "frames", s.model.image_size, s.paths.images, s.paths.views)


@dataclass(frozen=True)
class Split:
    """The images the stage trains and predicts on, and the folds: positions index the manifest's rows."""

    manifest: pd.DataFrame
    train_rows: np.ndarray  # manifest rows of the training images
    test_rows: np.ndarray  # manifest rows of both test stages
    y: np.ndarray  # labels of train_rows
    groups: np.ndarray  # boat groups of train_rows
    folds: np.ndarray  # validation fold of each of train_rows

    def fold(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions (into train_rows) that fit fold k's model, and those it is validated on."""
        return np.flatnonzero(self.folds != k), np.flatnonzero(self.folds == k)

    @property
    def test_ids(self) -> pd.Series:
        return self.manifest["id"].iloc[self.test_rows].reset_index(drop=True)


@dataclass
class FoldResult:
    fold: int
    val_idx: np.ndarray  # positions among the training rows
    val_pred: np.ndarray
    test_pred: np.ndarray
    history: dict[str, list[float]]


@dataclass
class CrossValidation:
    """Every fold's predictions put together."""

    oof: np.ndarray
    test: np.ndarray
    histories: list[dict[str, list[float]]] = field(default_factory=list)

    def add(self, res: FoldResult, n_folds: int) -> None:
        self.oof[res.val_idx] = res.val_pred
        self.test += res.test_pred / n_folds
        self.histories.append(res.history)


def split_data(s: Settings, manifest: pd.DataFrame) -> Split:
    is_train = (manifest["split"] == "train").to_numpy()
    y = train_labels(manifest, where=s.paths.manifest)
    groups = manifest.loc[is_train, "group"].to_numpy()
    folds = assign_folds(y, groups, s.cv.n_folds, s.cv.group_by, s.seed)
    return Split(manifest, np.flatnonzero(is_train), np.flatnonzero(~is_train), y, groups, folds)


# --------------------------------------------------------------------------------------------- embeddings


def extractor_settings(clf: Classifier, s: Settings, precision: str) -> dict:
    """How to rebuild the frozen extractor, and what it looks at (serving reads both from extractor.json).
    `precision`: the dtype policy it computes the embeddings in (`backbones.extraction_precision`)."""
    ext = {"backbone": clf.backbone, "image_size": clf.image_size, "weights": s.model.weights,
           "pooling": s.model.pooling, "precision": precision, "seed": s.seed, "input": clf.input}
    if isinstance(s, CropSettings):
        ext["crop"] = {"margin": s.crops.margin, "min_side": s.crops.min_side, "boxes": s.crops.boxes}
    return ext


def view_rows(n_views: int, tta_views: int, is_train: np.ndarray) -> list[np.ndarray]:
    """Rows that exist in each view: test-time views cover every row, training draws only train rows."""
    every = np.arange(len(is_train))
    return [every if v < tta_views else np.flatnonzero(is_train) for v in range(n_views)]


def compute_embeddings(views: np.ndarray, rows: list[np.ndarray], ext: dict, batch_size: int) -> np.ndarray:
    """Pass every stored view once through the frozen extractor: (V, N, D) float32, zeros where no view."""
    keras.utils.set_random_seed(ext["seed"])  # random-init demo weights are a function of the seed
    extractor = build_extractor(ext["backbone"], ext["image_size"], ext["weights"], ext["pooling"], ext["precision"])
    feats = np.zeros((views.shape[0], views.shape[1], extractor.output_shape[-1]), dtype=np.float32)
    with tqdm(total=sum(len(r) for r in rows), desc=f"embed {ext['backbone']}", unit="img", mininterval=2) as bar:
        for v, idx in enumerate(rows):
            if len(idx) == len(views[v]):
                feats[v] = extract_features(extractor, views[v], batch_size, progress=bar)
            else:
                feats[v, idx] = extract_features(extractor, views[v][idx], batch_size, progress=bar)
    return feats


def load_or_compute_embeddings(
    cache: Path, views_path: str, rows: list[np.ndarray], ext: dict, batch_size: int
) -> tuple[np.ndarray, str]:
    """Reuse the cached embeddings when the views and extractor settings are unchanged (on every worker)."""
    fingerprint = hashlib.sha1(
        json.dumps({"views": file_digest(views_path), **ext, "keras": keras.__version__}).encode()
    ).hexdigest()
    cached = None
    if cache.exists():
        with np.load(cache) as npz:
            if str(npz["fingerprint"]) == fingerprint:
                cached = npz["features"]
    if everyone(cached is not None):
        print(f"embeddings: reusing {cache}")
        return cached, fingerprint
    views = np.load(views_path, mmap_mode="r")
    feats = compute_embeddings(views, rows, ext, batch_size)
    save_npz(cache, features=feats, fingerprint=np.array(fingerprint))
    return feats, fingerprint


# ------------------------------------------------------------------------------------------ cross-validation


def train_matrix(feats: np.ndarray, rows: np.ndarray, n_views: int) -> np.ndarray:
    """Stack every view of the given rows: the head learns from all augmented draws."""
    return feats[:n_views, rows].reshape(-1, feats.shape[-1])


def tta_predict(model: keras.Model, feats: np.ndarray, rows: np.ndarray, tta_views: int) -> np.ndarray:
    """Average the head's probabilities over the test-time views of `rows`."""
    # A direct call in inference mode: `predict` costs more in set-up than these small matrices take.
    preds = [np.asarray(model(feats[v, rows], training=False)) for v in range(tta_views)]
    return np.mean(preds, axis=0)


def _class_weight(y: np.ndarray, s: Settings) -> dict[int, float] | None:
    return balanced_class_weight(y, N_CLASSES) if s.train.class_weight == "balanced" else None


def run_fold(k: int, feats: np.ndarray, data: Split, s: Settings, callbacks: tuple = ()
             ) -> tuple[FoldResult, keras.Model]:
    """Phase 1 for one fold on cached embeddings."""
    n_views = feats.shape[0]
    fit_pos, val_pos = data.fold(k)
    head, history = fit_head(
        train_matrix(feats, data.train_rows[fit_pos], n_views),
        np.tile(data.y[fit_pos], n_views),
        feats[0, data.train_rows[val_pos]],
        data.y[val_pos],
        N_CLASSES,
        s.model.head,
        s.train,
        seed=s.seed + k,
        class_weight=_class_weight(data.y[fit_pos], s),
        callbacks=callbacks,
    )
    tta = s.augment.tta_views
    val_pred = tta_predict(head, feats, data.train_rows[val_pos], tta)
    return FoldResult(k, val_pos, val_pred, tta_predict(head, feats, data.test_rows, tta), history), head


def best_epochs(histories: list[dict[str, list[float]]]) -> list[int]:
    """The epoch (1-based) whose validation log loss each fold's early stopping kept."""
    return [int(np.argmin(h["val_loss"])) + 1 for h in histories]


def unpeeked_oof(
    feats: np.ndarray, train_rows: np.ndarray, y: np.ndarray, folds: np.ndarray, epochs: list[int], s: Settings
) -> np.ndarray:
    """Out-of-fold predictions that never saw their own fold's labels, not even to pick an epoch.

    Early stopping keeps the epoch that scores best on the fold it is then scored on, which flatters the CV.
    Here each fold's head trains for the median of the *other* folds' best epochs, with no validation at all.
    """
    n_views = feats.shape[0]
    oof = np.zeros((len(y), N_CLASSES))
    for k in range(folds.max() + 1):
        fit_pos, val_pos = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        others = [e for j, e in enumerate(epochs) if j != k] or epochs
        head, _ = fit_head(
            train_matrix(feats, train_rows[fit_pos], n_views),
            np.tile(y[fit_pos], n_views),
            None,
            None,
            N_CLASSES,
            s.model.head,
            s.train,
            seed=s.seed + k,
            class_weight=_class_weight(y[fit_pos], s),
            fixed_epochs=max(1, int(np.median(others))),
        )
        oof[val_pos] = tta_predict(head, feats, train_rows[val_pos], s.augment.tta_views)
    return oof


def cross_validate_cached(feats: np.ndarray, data: Split, s: Settings) -> CrossValidation:
    """Phase 1 over every fold with no checkpoints or logging: the leak check's cheap second opinion."""
    cv = CrossValidation(np.zeros((len(data.y), N_CLASSES)), np.zeros((len(data.test_rows), N_CLASSES)))
    n_folds = int(data.folds.max()) + 1
    for k in range(n_folds):
        cv.add(run_fold(k, feats, data, s)[0], n_folds)
    return cv


# -------------------------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class FineTuneInputs:
    """What phase 2 reads: the image cache (augmented online) and the stored test-time views."""

    images: np.ndarray
    views: np.ndarray


def fine_tune_fold(head: keras.Model, ext: dict, inputs: FineTuneInputs, data: Split, k: int, s: Settings
                   ) -> tuple[keras.Model, np.ndarray, np.ndarray, dict[str, list[float]]]:
    """Phase 2: unfreeze the top blocks and train end to end on augmented images at a low learning rate.

    Returns the fine-tuned classifier (raw images in, probabilities out), its validation and test
    predictions (averaged over the test-time views) and its history.
    """
    ft = s.train.fine_tune
    fit_pos, val_pos = data.fold(k)
    fit_rows, val_rows = data.train_rows[fit_pos], data.train_rows[val_pos]
    keras.utils.set_random_seed(s.seed + k)
    # Under the global policy (train.mixed_precision), not the embeddings' extract_precision: this one trains.
    extractor = build_extractor(ext["backbone"], ext["image_size"], ext["weights"], ext["pooling"])
    model = build_classifier(extractor, head)
    unfreeze_top(extractor, ext["backbone"], ft.unfreeze_blocks)
    model.compile(
        optimizer=keras.optimizers.Adam(ft.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=s.train.label_smoothing),
        metrics=["accuracy"],
    )
    processes = ft.input_processes if ft.input_processes >= 0 else (os.cpu_count() or 1)
    batches = AugmentedBatches(inputs.images, fit_rows, data.y[fit_pos], N_CLASSES, ft.batch_size,
                               train_policy(s.augment), s.seed + k, processes=processes, replicas=replicas())
    try:
        history = model.fit(
            batches,
            epochs=ft.epochs,
            callbacks=[
                ValidationLogLoss(np.asarray(inputs.images[val_rows]), data.y[val_pos], ft.batch_size),
                keras.callbacks.EarlyStopping(patience=s.train.patience, restore_best_weights=True),
            ],
            verbose=2,
        )
    finally:
        batches.close()

    def tta(rows: np.ndarray) -> np.ndarray:
        views = inputs.views
        return np.mean([model.predict(np.asarray(views[v][rows]), verbose=0) for v in range(s.augment.tta_views)], 0)

    history = {key: [float(x) for x in v] for key, v in history.history.items()}
    return model, tta(val_rows), tta(data.test_rows), history


# ------------------------------------------------------------------------------------------- checkpoints


def run_fingerprint(embeddings: str, data: Split, s: Settings) -> str:
    """What decides the fold models; input_processes only decides how fast they come (batches are seeded)."""
    what = asdict(s.train)
    what["fine_tune"].pop("input_processes")
    key = [embeddings, data.folds.tolist(), what, asdict(s.model.head), s.seed]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]


class Checkpoints:
    """One folder of fold results per run fingerprint; only the current one survives a finished run."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root, self.dir = root, root / fingerprint

    def load(self, k: int) -> FoldResult | None:
        path = self.dir / f"fold_{k}.npz"
        if not path.exists():
            return None
        with np.load(path) as npz:
            history = json.loads(str(npz["history"]))
            return FoldResult(k, npz["val_idx"], npz["val_pred"], npz["test_pred"], history)

    def save(self, res: FoldResult, head: keras.Model, classifier: keras.Model | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        save_keras(head, self.dir / f"head_fold{res.fold}.keras")
        if classifier is not None:  # phase 2 made the predictions: keep the model that made them
            save_keras(classifier, self.dir / f"classifier_fold{res.fold}.keras")
        save_npz(self.dir / f"fold_{res.fold}.npz", val_idx=res.val_idx, val_pred=res.val_pred,
                 test_pred=res.test_pred, history=np.array(json.dumps(res.history)))

    def models(self) -> list[Path]:
        return sorted(self.dir.glob("*_fold*.keras"))

    def prune(self) -> None:
        """Drop other runs' folders: the declared output is then a function of this run's inputs alone."""
        for other in self.root.iterdir() if self.root.is_dir() else ():
            if other != self.dir:
                shutil.rmtree(other) if other.is_dir() else other.unlink()


def cross_validate(clf: Classifier, feats: np.ndarray, data: Split, ext: dict, ckpt: Checkpoints, s: Settings
                   ) -> CrossValidation:
    """Every fold, resumed from its checkpoint when there is one, with a nested MLflow run per fold."""
    cv = CrossValidation(np.zeros((len(data.y), N_CLASSES)), np.zeros((len(data.test_rows), N_CLASSES)))
    inputs = None
    if s.train.fine_tune.enabled:
        inputs = FineTuneInputs(np.load(clf.images, mmap_mode="r"), np.load(clf.views, mmap_mode="r"))
    for k in range(s.cv.n_folds):
        res = ckpt.load(k)
        if everyone(res is not None):
            print(f"fold {k}: resumed from {ckpt.dir}")
            cv.add(res, s.cv.n_folds)
            continue
        with tracking.start_run(s.tracking, run_name=f"{clf.name}-fold{k}", nested=True, params={"fold": k}):
            res, head = run_fold(k, feats, data, s, (tracking.EpochLogger(),))
            classifier = None
            if inputs is not None:
                classifier, res.val_pred, res.test_pred, ft_hist = fine_tune_fold(head, ext, inputs, data, k, s)
                res.history.update({f"ft_{key}": v for key, v in ft_hist.items()})
            y_val = data.y[res.val_idx]
            fold_ll = kaggle_log_loss(y_val, res.val_pred)
            tracking.log_metrics({"fold_logloss": fold_ll, "fold_accuracy": accuracy(y_val, res.val_pred)})
        ckpt.save(res, head, classifier)
        print(f"fold {k}: val log loss {fold_ll:.4f} ({len(res.val_idx)} images, {len(res.history['loss'])} epochs)")
        cv.add(res, s.cv.n_folds)
    return cv


# ---------------------------------------------------------------------------------------------- reporting


def fold_metrics(y: np.ndarray, oof: np.ndarray, folds: np.ndarray) -> list[dict]:
    return [
        {
            "fold": int(k),
            "n": int((folds == k).sum()),
            "logloss": kaggle_log_loss(y[folds == k], oof[folds == k]),
            "accuracy": accuracy(y[folds == k], oof[folds == k]),
        }
        for k in range(folds.max() + 1)
    ]


def solution_scores(solution_path: str, ids: pd.Series, test_pred: np.ndarray) -> dict[str, float]:
    """Stage-1 and stage-2 log loss of test predictions, when the source has labels."""
    if not Path(solution_path).exists():
        return {}
    sol = pd.read_csv(solution_path, keep_default_na=False)
    if sol.empty:
        return {}
    pos = {name: i for i, name in enumerate(ids)}
    out = {}
    for stage, rows in sol.groupby("stage"):
        idx = np.array([pos[name] for name in rows["image"]])
        y = np.array([FISH_CLASSES.index(label) for label in rows["label"]])
        out[f"stg{stage}_logloss"] = kaggle_log_loss(y, test_pred[idx])
    return out


def summarise(clf: Classifier, s: Settings, data: Split, cv: CrossValidation) -> dict:
    return {
        "model": clf.name,
        "backbone": clf.backbone,
        "input": clf.input,
        "cv_logloss": kaggle_log_loss(data.y, cv.oof),
        "cv_accuracy": accuracy(data.y, cv.oof),
        "prior_logloss": prior_log_loss(data.y, data.y, N_CLASSES),
        "group_by": s.cv.group_by,
        "n_folds": s.cv.n_folds,
        "folds": fold_metrics(data.y, cv.oof, data.folds),
        "epochs_trained": [len(h["loss"]) for h in cv.histories],
        "fine_tuned": s.train.fine_tune.enabled,
        **({"fine_tune_epochs": [len(h["ft_loss"]) for h in cv.histories]} if s.train.fine_tune.enabled else {}),
        **solution_scores(s.paths.solution, data.test_ids, cv.test),
    }


def leak_check(feats: np.ndarray, data: Split, cv: CrossValidation, s: Settings) -> dict:
    """CV and stage-2 score of both fold schemes: grouped folds should predict the new boats better."""
    other = "none" if s.cv.group_by == "boat" else "boat"
    try:
        other_folds = assign_folds(data.y, data.groups, s.cv.n_folds, other, s.seed)
    except ValueError as exc:
        return {"skipped": str(exc)}
    other_cv = cross_validate_cached(feats, replace(data, folds=other_folds), s)
    out = {}
    for scheme, result in ((s.cv.group_by, cv), (other, other_cv)):
        entry = {"cv_logloss": kaggle_log_loss(data.y, result.oof),
                 **solution_scores(s.paths.solution, data.test_ids, result.test)}
        if "stg2_logloss" in entry:
            entry["gap_stg2_minus_cv"] = entry["stg2_logloss"] - entry["cv_logloss"]
        out[scheme] = entry
    return out


def plot_curves(histories: list[dict[str, list[float]]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, h in enumerate(histories):
        axes[0].plot(h["loss"], color=f"C{k}", alpha=0.5, label=f"fold {k} train")
        axes[0].plot(h["val_loss"], color=f"C{k}", label=f"fold {k} val")
        axes[1].plot(h["val_accuracy"], color=f"C{k}", label=f"fold {k}")
    axes[0].set(title="loss (val = log loss on the held-out boats)", xlabel="epoch")
    axes[1].set(title="validation accuracy", xlabel="epoch")
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion(y: np.ndarray, pred: np.ndarray, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(6, 5.4))
    ConfusionMatrixDisplay.from_predictions(
        y, pred, labels=range(N_CLASSES), display_labels=FISH_CLASSES, normalize="true", values_format=".2f",
        ax=ax, colorbar=False,
    )
    ax.set_title(title)
    fig.tight_layout()
    return fig


def write_outputs(name: str, s: Settings, data: Split, cv: CrossValidation, report: dict, ext: dict,
                  ckpt: Checkpoints) -> None:
    paths = s.paths
    out_dir = Path(paths.predictions) / name
    write_csv(out_dir / "oof.csv", prediction_frame(data.manifest["id"].iloc[data.train_rows].to_numpy(), cv.oof,
                                                    data.folds))
    test_ids = data.test_ids.to_numpy()
    splits = data.manifest["split"].iloc[data.test_rows].to_numpy()
    for split in TEST_SETS:
        write_csv(out_dir / f"{split}.csv", prediction_frame(test_ids[splits == split], cv.test[splits == split]))
    # Serving rebuilds the frozen extractor from these settings; a fine-tuned one cannot be rebuilt so.
    write_json(out_dir / "extractor.json", {**ext, "fine_tuned": s.train.fine_tune.enabled})
    models_dir = out_dir / "models"
    shutil.rmtree(models_dir, ignore_errors=True)  # no model of an earlier run stays beside these predictions
    models_dir.mkdir(parents=True)
    for model in ckpt.models():  # the fold models, beside the predictions they made
        shutil.copy2(model, models_dir / model.name)

    rep_dir = Path(paths.train_reports)
    hist = pd.concat([
        pd.DataFrame({"fold": k, "epoch": range(len(h["loss"])), **{m: h[m] for m in h if not m.startswith("ft_")}})
        for k, h in enumerate(cv.histories)
    ])
    write_csv(rep_dir / "curves" / f"{name}.csv", hist)
    pred = cv.oof.argmax(1)
    names = np.array(FISH_CLASSES)
    confusion = pd.DataFrame({"actual": names[data.y], "predicted": names[pred]})
    write_csv(rep_dir / "confusion" / f"{name}.csv", confusion)
    write_json(rep_dir / f"{name}.json", report)
    fig_dir = Path(paths.figures) / name
    title = f"{name}: CV log loss {report['cv_logloss']:.3f}"
    save_figure(plot_curves(cv.histories, title), fig_dir / "curves.png")
    save_figure(plot_confusion(data.y, pred, f"{name}: out-of-fold confusion"), fig_dir / "confusion.png")


# -------------------------------------------------------------------------------------------------- stage


def run(backbone: str, s: Settings) -> dict:
    """The whole stage for one backbone on the input `s` implies (crops for CropSettings); returns its report
    (also written to paths.train_reports/<name>.json)."""
    import tensorflow as tf

    clf = classifier(backbone, s)
    validate_model_settings([backbone], clf.image_size, s.model.weights)
    tf.config.experimental.enable_op_determinism()  # a resumed run must reproduce an uninterrupted one
    strategy = configure_devices(s.train.mixed_precision)
    me = task()
    if not me.chief:
        s = replace(s, paths=replace(s.paths, **{key: str(write_path(getattr(s.paths, key), me)) for key in WRITES}))
        print(f"{me.name} of {me.workers}: the chief writes the outputs; this worker writes under {scratch_dir(me)}")
    # Every model of the stage (extractor, fold heads, fine-tuned classifiers) is built inside the strategy's
    # scope, so several GPUs share each batch; on one device or a CPU this is the default strategy.
    with strategy.scope():
        report = _run_in_scope(clf, s)
    discard_scratch(me)
    return report


def _run_in_scope(clf: Classifier, s: Settings) -> dict:
    import tensorflow as tf

    data = split_data(s, read_manifest(s.paths.manifest))
    policy = keras.mixed_precision.global_policy().name
    precision = extraction_precision(s.train.extract_precision, clf.backbone,
                                     len(tf.config.list_physical_devices("GPU")), native_bfloat16(), policy)
    ext = extractor_settings(clf, s, precision or policy)
    n_views = np.load(clf.views, mmap_mode="r").shape[0]
    is_train = (data.manifest["split"] == "train").to_numpy()
    feats, embeddings = load_or_compute_embeddings(Path(s.paths.embeddings) / f"{clf.name}.npz", clf.views,
                                                   view_rows(n_views, s.augment.tta_views, is_train), ext,
                                                   s.train.extract_batch_size)
    ckpt = Checkpoints(Path(s.paths.checkpoints) / clf.name, run_fingerprint(embeddings, data, s))
    params = {**flatten(s.model, "model."), **flatten(s.train, "train."), **flatten(s.cv, "cv."),
              **flatten(s.augment, "augment."), "backbone": clf.backbone, "input": clf.input, "seed": s.seed}
    if isinstance(s, CropSettings):
        params.update(flatten(s.crops, "crops."))
    with tracking.start_run(s.tracking, run_name=clf.name, params=params, tags={"stage": "train"}):
        cv = cross_validate(clf, feats, data, ext, ckpt, s)
        report = summarise(clf, s, data, cv)
        report["best_epochs"] = best_epochs(cv.histories)
        if not s.train.fine_tune.enabled:  # the unpeeked figure is of phase 1; fine-tuned predictions are not
            unpeeked = unpeeked_oof(feats, data.train_rows, data.y, data.folds, report["best_epochs"], s)
            report["cv_logloss_unpeeked"] = kaggle_log_loss(data.y, unpeeked)
        report["leak_check"] = leak_check(feats, data, cv, s)
        mine = report["leak_check"].get(s.cv.group_by, {})
        if "stg2_logloss" in mine and "cv_logloss_unpeeked" in report:
            mine["gap_stg2_minus_unpeeked_cv"] = mine["stg2_logloss"] - report["cv_logloss_unpeeked"]
        report["devices"] = device_summary()
        report["extract_precision"] = ext["precision"]  # the embeddings' (train.extract_precision)
        write_outputs(clf.name, s, data, cv, report, ext, ckpt)
        ckpt.prune()
        tracking.log_metrics({k: v for k, v in report.items() if isinstance(v, float)})
        tracking.log_artifact(Path(s.paths.figures) / clf.name, "figures")
        tracking.log_artifact(Path(s.paths.train_reports) / f"{clf.name}.json")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--input", choices=sorted(SETTINGS), default="frames",
                        help="whole frames (default) or the crops around the localised fish")
    args = parser.parse_args(argv)
    settings = load(SETTINGS[args.input], args.params)
    listed = settings.crops.backbones if args.input == "crops" else settings.model.backbones
    if args.backbone not in listed:
        key = "crops.backbones" if args.input == "crops" else "model.backbones"
        raise SystemExit(f"--backbone {args.backbone} is not in {key} {list(listed)}")
    print(summary_line(run(args.backbone, settings)))


def summary_line(report: dict) -> str:
    """What a user reads at the end of the stage; the whole report is in paths.train_reports/<backbone>.json."""
    parts = [f"train {report['model']}: CV {report['cv_logloss']:.4f}"]
    if "cv_logloss_unpeeked" in report:
        parts.append(f"(unpeeked {report['cv_logloss_unpeeked']:.4f})")
    parts.append(f"accuracy {report['cv_accuracy']:.3f}, prior {report['prior_logloss']:.4f}")
    for stage in (1, 2):
        if f"stg{stage}_logloss" in report:
            parts.append(f"| stage {stage} {report[f'stg{stage}_logloss']:.4f}")
    gaps = {k: v["gap_stg2_minus_cv"] for k, v in report.get("leak_check", {}).items() if "gap_stg2_minus_cv" in v}
    if gaps:
        parts.append("| stage-2 gap " + ", ".join(f"{k} folds {v:+.3f}" for k, v in gaps.items()))
    d = report["devices"]
    parts.append(f"| {d['strategy']} x{d['replicas']}, {d['precision_policy']}")
    if report.get("extract_precision", d["precision_policy"]) != d["precision_policy"]:
        parts.append(f"(embeddings {report['extract_precision']})")
    return " ".join(parts)


if __name__ == "__main__":
    main()
