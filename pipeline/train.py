"""Train stage: cross-validated transfer learning for one backbone (`python -m pipeline.train --backbone vgg16`).

Phase 1 (always): the frozen backbone runs once over every stored view of every image and its pooled
embeddings are cached; the dropout + batch-norm head is then trained for each fold on that cache. K-fold CV
so costs about one backbone pass instead of K × epochs passes (bench: `cv_cached_speedup`).
Phase 2 (`train.fine_tune.enabled`, for real data with ImageNet weights): the top blocks are unfrozen and
the whole model is fine-tuned on images with online augmentation, starting from the fold's phase-1 head.

Every fold is checkpointed; a killed run started again resumes at the first unfinished fold and produces the
same predictions as an uninterrupted run. Out-of-fold (OOF) predictions cover every training image; test
predictions average the test-time views and the folds.

The stage also measures how honest its validation is: it repeats phase 1 with the other fold scheme
(`boat` vs `none`) and, when the source has a solution file, records each scheme's CV-to-stage-2 gap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from pipeline import config, tracking
from pipeline.config import FISH_CLASSES
from pipeline.folds import assign_folds
from pipeline.io import atomic_path, save_figure, write_csv, write_json
from pipeline.metrics import accuracy, kaggle_log_loss, prior_log_loss
from pipeline.models import build_classifier, build_extractor, unfreeze_top, validate_model_settings
from pipeline.training import (
    ValidationLogLoss,
    balanced_class_weight,
    configure_devices,
    device_summary,
    extract_features,
    fit_head,
    replicas,
)

N_CLASSES = len(FISH_CLASSES)


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Everything this stage reads from params.yaml."""

    seed: int
    paths: config.Paths
    cv: config.Cv
    model: config.Model
    train: config.Train
    augment: config.Augment
    tracking: config.Tracking


def load_settings(path: str | Path = config.PARAMS_FILE) -> Settings:
    raw = config.read_params(path)
    return Settings(
        seed=raw["seed"],
        **{name: config.load_section(name, raw) for name in ("paths", "cv", "model", "train", "augment", "tracking")},
    )


# --------------------------------------------------------------------------------------------- embeddings


def file_digest(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def extractor_settings(backbone: str, s: Settings) -> dict:
    return {
        "backbone": backbone,
        "image_size": s.model.image_size,
        "weights": s.model.weights,
        "pooling": s.model.pooling,
        "seed": s.seed,
    }


def view_rows(n_views: int, tta_views: int, is_train: np.ndarray) -> list[np.ndarray]:
    """Rows that exist in each view: test-time views cover every row, training draws only train rows."""
    every = np.arange(len(is_train))
    return [every if v < tta_views else np.flatnonzero(is_train) for v in range(n_views)]


def compute_embeddings(views: np.ndarray, rows: list[np.ndarray], ext: dict, batch_size: int) -> np.ndarray:
    """Pass every stored view once through the frozen extractor: (V, N, D) float32, zeros where no view."""
    keras.utils.set_random_seed(ext["seed"])  # random-init demo weights are a function of the seed
    extractor = build_extractor(ext["backbone"], ext["image_size"], ext["weights"], ext["pooling"])
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
    """Reuse the cached embeddings when the views and extractor settings are unchanged."""
    fingerprint = hashlib.sha1(
        json.dumps({"views": file_digest(views_path), **ext, "keras": keras.__version__}).encode()
    ).hexdigest()
    if cache.exists():
        with np.load(cache) as npz:
            if str(npz["fingerprint"]) == fingerprint:
                print(f"embeddings: reusing {cache}")
                return npz["features"], fingerprint
    views = np.load(views_path, mmap_mode="r")
    feats = compute_embeddings(views, rows, ext, batch_size)
    with atomic_path(cache, suffix=".npz") as tmp:
        np.savez(tmp, features=feats, fingerprint=np.array(fingerprint))
    return feats, fingerprint


# ------------------------------------------------------------------------------------------ cross-validation


@dataclass
class FoldResult:
    fold: int
    val_idx: np.ndarray  # positions among the training rows
    val_pred: np.ndarray
    test_pred: np.ndarray
    history: dict[str, list[float]]


def train_matrix(feats: np.ndarray, rows: np.ndarray, n_views: int) -> np.ndarray:
    """Stack every view of the given rows: the head learns from all augmented draws."""
    return feats[:n_views, rows].reshape(-1, feats.shape[-1])


def tta_predict(model: keras.Model, feats: np.ndarray, rows: np.ndarray, tta_views: int) -> np.ndarray:
    """Average the head's probabilities over the test-time views of `rows`."""
    # A direct call in inference mode: `predict` costs more in set-up than these small matrices take.
    preds = [np.asarray(model(feats[v, rows], training=False)) for v in range(tta_views)]
    return np.mean(preds, axis=0)


def run_fold(
    k: int,
    feats: np.ndarray,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    s: Settings,
    callbacks: tuple = (),
) -> tuple[FoldResult, keras.Model]:
    """Phase 1 for one fold on cached embeddings; positions in `folds`/`y` index `train_rows`."""
    n_views = feats.shape[0]
    fit_pos, val_pos = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
    x_fit = train_matrix(feats, train_rows[fit_pos], n_views)
    y_fit = np.tile(y[fit_pos], n_views)
    weights = balanced_class_weight(y[fit_pos], N_CLASSES) if s.train.class_weight == "balanced" else None
    head, history = fit_head(
        x_fit,
        y_fit,
        feats[0, train_rows[val_pos]],
        y[val_pos],
        N_CLASSES,
        s.model.head,
        s.train,
        seed=s.seed + k,
        class_weight=weights,
        callbacks=callbacks,
    )
    tta = s.augment.tta_views
    result = FoldResult(
        k,
        val_pos,
        tta_predict(head, feats, train_rows[val_pos], tta),
        tta_predict(head, feats, test_rows, tta),
        history,
    )
    return result, head


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
        weights = balanced_class_weight(y[fit_pos], N_CLASSES) if s.train.class_weight == "balanced" else None
        head, _ = fit_head(
            train_matrix(feats, train_rows[fit_pos], n_views),
            np.tile(y[fit_pos], n_views),
            None,
            None,
            N_CLASSES,
            s.model.head,
            s.train,
            seed=s.seed + k,
            class_weight=weights,
            fixed_epochs=max(1, int(np.median(others))),
        )
        oof[val_pos] = tta_predict(head, feats, train_rows[val_pos], s.augment.tta_views)
    return oof


def cross_validate_cached(
    feats: np.ndarray, train_rows: np.ndarray, test_rows: np.ndarray, y: np.ndarray, folds: np.ndarray, s: Settings
) -> tuple[np.ndarray, np.ndarray]:
    """Phase 1 over every fold with no checkpoints or logging: the leak check's cheap second opinion."""
    oof = np.zeros((len(y), N_CLASSES))
    test = np.zeros((len(test_rows), N_CLASSES))
    for k in range(folds.max() + 1):
        res, _ = run_fold(k, feats, train_rows, test_rows, y, folds, s)
        oof[res.val_idx] = res.val_pred
        test += res.test_pred / (folds.max() + 1)
    return oof, test


# -------------------------------------------------------------------------------------------- fine-tuning


def fine_tune_fold(
    head: keras.Model,
    ext: dict,
    images: np.ndarray,
    views: np.ndarray,
    fit_rows: np.ndarray,
    val_rows: np.ndarray,
    y_fit: np.ndarray,
    y_val: np.ndarray,
    test_rows: np.ndarray,
    s: Settings,
    seed: int,
) -> tuple[keras.Model, np.ndarray, np.ndarray, dict[str, list[float]]]:
    """Phase 2: unfreeze the top blocks and train end to end on augmented images at a low learning rate.

    Returns the fine-tuned classifier (raw images in, probabilities out), its validation and test
    predictions (averaged over the test-time views) and its history.
    """
    from pipeline.augment import AugmentedBatches, train_policy

    ft = s.train.fine_tune
    keras.utils.set_random_seed(seed)
    extractor = build_extractor(ext["backbone"], ext["image_size"], ext["weights"], ext["pooling"])
    model = build_classifier(extractor, head)
    unfreeze_top(extractor, ext["backbone"], ft.unfreeze_blocks)
    model.compile(
        optimizer=keras.optimizers.Adam(ft.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=s.train.label_smoothing),
        metrics=["accuracy"],
    )
    processes = ft.input_processes if ft.input_processes >= 0 else (os.cpu_count() or 1)
    batches = AugmentedBatches(images, fit_rows, y_fit, N_CLASSES, ft.batch_size, train_policy(s.augment), seed,
                               processes=processes, replicas=replicas())
    try:
        history = model.fit(
            batches,
            epochs=ft.epochs,
            callbacks=[
                ValidationLogLoss(np.asarray(images[val_rows]), y_val, ft.batch_size),
                keras.callbacks.EarlyStopping(patience=s.train.patience, restore_best_weights=True),
            ],
            verbose=2,
        )
    finally:
        batches.close()

    def tta(rows: np.ndarray) -> np.ndarray:
        return np.mean([model.predict(np.asarray(views[v][rows]), verbose=0) for v in range(s.augment.tta_views)], 0)

    return model, tta(val_rows), tta(test_rows), {k: [float(x) for x in v] for k, v in history.history.items()}


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
        y,
        pred,
        labels=range(N_CLASSES),
        display_labels=FISH_CLASSES,
        normalize="true",
        values_format=".2f",
        ax=ax,
        colorbar=False,
    )
    ax.set_title(title)
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------------------------------- stage


def run(backbone: str, s: Settings) -> dict:
    """The whole stage for one backbone; returns its report (also written to paths.train_reports)."""
    validate_model_settings([backbone], s.model.image_size, s.model.weights)
    tf.config.experimental.enable_op_determinism()  # a resumed run must reproduce an uninterrupted one
    strategy = configure_devices(s.train.mixed_precision)
    # Every model of the stage (extractor, fold heads, fine-tuned classifiers) is built inside the strategy's
    # scope, so several GPUs share each batch; on one device or a CPU this is the default strategy.
    with strategy.scope():
        return _run(backbone, s)


def _run(backbone: str, s: Settings) -> dict:
    p = s.paths
    manifest = pd.read_csv(p.manifest, keep_default_na=False)
    is_train = (manifest["split"] == "train").to_numpy()
    train_rows, test_rows = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    unknown = set(manifest.loc[is_train, "label"]) - set(FISH_CLASSES)
    if unknown:
        raise ValueError(f"{p.manifest}: unknown labels {sorted(unknown)}")
    y = np.array([FISH_CLASSES.index(label) for label in manifest.loc[is_train, "label"]])
    views_shape = np.load(p.views, mmap_mode="r").shape
    ext = extractor_settings(backbone, s)
    rows = view_rows(views_shape[0], s.augment.tta_views, is_train)
    feats, emb_fp = load_or_compute_embeddings(
        Path(p.embeddings) / f"{backbone}.npz", p.views, rows, ext, s.train.extract_batch_size
    )
    groups = manifest.loc[is_train, "group"].to_numpy()
    folds = assign_folds(y, groups, s.cv.n_folds, s.cv.group_by, s.seed)

    # What decides the predictions; input_processes only decides how fast they come (batches are seeded alone).
    what = asdict(s.train)
    what["fine_tune"].pop("input_processes")
    run_fp = hashlib.sha1(
        json.dumps([emb_fp, folds.tolist(), what, asdict(s.model.head), s.seed]).encode()
    ).hexdigest()[:16]
    ckpt_dir = Path(p.checkpoints) / backbone / run_fp
    oof = np.zeros((len(y), N_CLASSES))
    test = np.zeros((len(test_rows), N_CLASSES))
    histories: list[dict] = []
    images = views = None
    if s.train.fine_tune.enabled:
        images, views = np.load(p.images, mmap_mode="r"), np.load(p.views, mmap_mode="r")

    flat = {**config.flatten(asdict(s.model), "model."), **config.flatten(asdict(s.train), "train.")}
    flat.update(config.flatten(asdict(s.cv), "cv."), backbone=backbone, seed=s.seed)
    flat.update(config.flatten(asdict(s.augment), "augment."))
    with tracking.start_run(s.tracking, run_name=backbone, params=flat, tags={"stage": "train"}):
        for k in range(s.cv.n_folds):
            ckpt = ckpt_dir / f"fold_{k}.npz"
            head_file = ckpt_dir / f"head_fold{k}.keras"
            classifier_file = ckpt_dir / f"classifier_fold{k}.keras"
            if ckpt.exists():
                with np.load(ckpt) as npz:
                    res = FoldResult(
                        k, npz["val_idx"], npz["val_pred"], npz["test_pred"], json.loads(str(npz["history"]))
                    )
                print(f"fold {k}: resumed from {ckpt}")
            else:
                with tracking.start_run(s.tracking, run_name=f"{backbone}-fold{k}", nested=True, params={"fold": k}):
                    res, head = run_fold(k, feats, train_rows, test_rows, y, folds, s, (tracking.EpochLogger(),))
                    classifier = None
                    if s.train.fine_tune.enabled:
                        fit_pos = np.flatnonzero(folds != k)
                        classifier, res.val_pred, res.test_pred, ft_hist = fine_tune_fold(
                            head,
                            ext,
                            images,
                            views,
                            train_rows[fit_pos],
                            train_rows[res.val_idx],
                            y[fit_pos],
                            y[res.val_idx],
                            test_rows,
                            s,
                            s.seed + k,
                        )
                        res.history.update({f"ft_{key}": v for key, v in ft_hist.items()})
                    fold_ll = kaggle_log_loss(y[res.val_idx], res.val_pred)
                    tracking.log_metrics(
                        {"fold_logloss": fold_ll, "fold_accuracy": accuracy(y[res.val_idx], res.val_pred)}
                    )
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                head.save(head_file)
                if classifier is not None:  # phase 2 made the predictions: keep the model that made them
                    classifier.save(classifier_file)
                with atomic_path(ckpt, suffix=".npz") as tmp:
                    np.savez(
                        tmp,
                        val_idx=res.val_idx,
                        val_pred=res.val_pred,
                        test_pred=res.test_pred,
                        history=np.array(json.dumps(res.history)),
                    )
                print(
                    f"fold {k}: val log loss {fold_ll:.4f} ({len(res.val_idx)} images, "
                    f"{len(res.history['loss'])} epochs)"
                )
            oof[res.val_idx] = res.val_pred
            test += res.test_pred / s.cv.n_folds
            histories.append(res.history)

        report = summarise(backbone, s, manifest, y, folds, oof, test, train_rows, test_rows, histories)
        report["best_epochs"] = best_epochs(histories)
        if not s.train.fine_tune.enabled:  # the unpeeked figure is of phase 1; fine-tuned predictions are not
            report["cv_logloss_unpeeked"] = kaggle_log_loss(
                y, unpeeked_oof(feats, train_rows, y, folds, report["best_epochs"], s)
            )
        report["leak_check"] = leak_check(feats, train_rows, test_rows, y, groups, folds, oof, test, manifest, s)
        mine = report["leak_check"].get(s.cv.group_by, {})
        if "stg2_logloss" in mine and "cv_logloss_unpeeked" in report:
            mine["gap_stg2_minus_unpeeked_cv"] = mine["stg2_logloss"] - report["cv_logloss_unpeeked"]
        report["devices"] = device_summary()
        write_outputs(backbone, s, manifest, y, folds, oof, test, train_rows, test_rows, histories, report, ext)
        models_dir = Path(p.predictions) / backbone / "models"
        shutil.rmtree(models_dir, ignore_errors=True)  # no model of an earlier run stays beside these predictions
        models_dir.mkdir(parents=True)
        for k in range(s.cv.n_folds):  # the fold models, beside the predictions they made
            for name in (f"head_fold{k}.keras", f"classifier_fold{k}.keras"):
                if (ckpt_dir / name).exists():
                    shutil.copy2(ckpt_dir / name, models_dir / name)
        tracking.log_metrics({k: v for k, v in report.items() if isinstance(v, float)})
        tracking.log_artifact(Path(p.figures) / backbone, "figures")
        tracking.log_artifact(Path(p.train_reports) / f"{backbone}.json")
    return report


def summarise(backbone, s, manifest, y, folds, oof, test, train_rows, test_rows, histories) -> dict:
    ids = manifest["id"].iloc[test_rows].reset_index(drop=True)
    return {
        "backbone": backbone,
        "cv_logloss": kaggle_log_loss(y, oof),
        "cv_accuracy": accuracy(y, oof),
        "prior_logloss": prior_log_loss(y, y, N_CLASSES),
        "group_by": s.cv.group_by,
        "n_folds": s.cv.n_folds,
        "folds": fold_metrics(y, oof, folds),
        "epochs_trained": [len(h["loss"]) for h in histories],
        "fine_tuned": s.train.fine_tune.enabled,
        **({"fine_tune_epochs": [len(h["ft_loss"]) for h in histories]} if s.train.fine_tune.enabled else {}),
        **solution_scores(s.paths.solution, ids, test),
    }


def leak_check(feats, train_rows, test_rows, y, groups, folds, oof, test, manifest, s) -> dict:
    """CV and stage-2 score of both fold schemes: grouped folds should predict the new boats better."""
    other = "none" if s.cv.group_by == "boat" else "boat"
    try:
        other_folds = assign_folds(y, groups, s.cv.n_folds, other, s.seed)
    except ValueError as exc:
        return {"skipped": str(exc)}
    other_oof, other_test = cross_validate_cached(feats, train_rows, test_rows, y, other_folds, s)
    ids = manifest["id"].iloc[test_rows].reset_index(drop=True)
    out = {}
    for scheme, o, t in ((s.cv.group_by, oof, test), (other, other_oof, other_test)):
        entry = {"cv_logloss": kaggle_log_loss(y, o), **solution_scores(s.paths.solution, ids, t)}
        if "stg2_logloss" in entry:
            entry["gap_stg2_minus_cv"] = entry["stg2_logloss"] - entry["cv_logloss"]
        out[scheme] = entry
    return out


def write_outputs(backbone, s, manifest, y, folds, oof, test, train_rows, test_rows, histories, report, ext) -> None:
    p = s.paths
    out_dir = Path(p.predictions) / backbone
    oof_df = pd.DataFrame(oof, columns=FISH_CLASSES)
    oof_df.insert(0, "fold", folds)
    oof_df.insert(0, "id", manifest["id"].iloc[train_rows].to_numpy())
    write_csv(out_dir / "oof.csv", oof_df)
    test_ids = manifest["id"].iloc[test_rows].to_numpy()
    splits = manifest["split"].iloc[test_rows].to_numpy()
    for split in ("test_stg1", "test_stg2"):
        frame = pd.DataFrame(test[splits == split], columns=FISH_CLASSES)
        frame.insert(0, "id", test_ids[splits == split])
        write_csv(out_dir / f"{split}.csv", frame)
    # Serving rebuilds the frozen extractor from these settings; a fine-tuned one cannot be rebuilt so.
    write_json(out_dir / "extractor.json", {**ext, "fine_tuned": s.train.fine_tune.enabled})

    rep_dir = Path(p.train_reports)
    hist = pd.concat(
        [
            pd.DataFrame({"fold": k, "epoch": range(len(h["loss"])), **{m: h[m] for m in h if not m.startswith("ft_")}})
            for k, h in enumerate(histories)
        ]
    )
    write_csv(rep_dir / "curves" / f"{backbone}.csv", hist)
    pred = oof.argmax(1)
    write_csv(
        rep_dir / "confusion" / f"{backbone}.csv",
        pd.DataFrame({"actual": np.array(FISH_CLASSES)[y], "predicted": np.array(FISH_CLASSES)[pred]}),
    )
    write_json(Path(p.train_reports) / f"{backbone}.json", report)
    fig_dir = Path(p.figures) / backbone
    save_figure(plot_curves(histories, f"{backbone}: CV log loss {report['cv_logloss']:.3f}"), fig_dir / "curves.png")
    save_figure(plot_confusion(y, pred, f"{backbone}: out-of-fold confusion"), fig_dir / "confusion.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True)
    args = parser.parse_args()
    settings = load_settings()
    if args.backbone not in settings.model.backbones:
        raise SystemExit(f"--backbone {args.backbone} is not in model.backbones {list(settings.model.backbones)}")
    report = run(args.backbone, settings)
    print(json.dumps({k: v for k, v in report.items() if k not in ("folds",)}, indent=2, default=float))


if __name__ == "__main__":
    main()
