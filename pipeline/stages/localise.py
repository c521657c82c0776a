"""Localise stage: where the fish is in every frame (`python -m pipeline localise`).

What won the competition was localising the fish and classifying the crop: on the real boats the deck, the
crew and the camera are far larger than the catch, and a whole-frame model learns the boat. This stage
trains the heat-map localiser of `pipeline.core.localiser` with the classifiers' own grouped folds, so every
training image gets an out-of-fold box (from the fold model that never saw its boat) and every test image
the box of the fold models' averaged maps. Each box carries a confidence, the heat map's peak: evidence for
or against NoF. The crop stage cuts the classifiers' crops around these boxes, so a training crop is as good
or as bad as a test crop will be.

Scores (`paths.localise_report`): out-of-fold mean IoU against the annotation boxes and the share of
fish-bearing images at IoU >= 0.5, the same on each test stage against the true boxes where the source has them
(the demo does), and how well the confidence tells fish from NoF. A figure draws predicted (red) against true
(green) boxes. The fold models go to `paths.localiser` for the served model.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.core import tracking
from pipeline.core.augmentation import photometric_policy
from pipeline.core.decode import decode_bytes
from pipeline.core.devices import configure_devices, device_summary
from pipeline.core.files import save_figure, save_keras, write_csv, write_json
from pipeline.core.folds import assign_folds
from pipeline.core.localiser import (
    STRIDE,
    Detection,
    Letterbox,
    build_localiser,
    decode,
    fit_localiser,
    iou,
    letterbox,
    predict_maps,
)
from pipeline.core.manifest import read_manifest, train_labels
from pipeline.core.params import (
    Augment,
    ConfigError,
    Cv,
    Localise,
    Paths,
    Tracking,
    Train,
    flatten,
    load,
    stage_parser,
)
from pipeline.core.pools import spawn_pool

#: One box per manifest row: where the crop stage cuts, in original-frame pixels.
COLUMNS = ("id", "split", "x", "y", "width", "height", "confidence", "fold")
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class Settings:
    seed: int
    paths: Paths
    cv: Cv  # the classifiers' folds, so out-of-fold boxes are out of fold for them too
    localise: Localise
    augment: Augment  # the photometric part of the policy: light, colour, night vision
    train: Train  # train.mixed_precision
    tracking: Tracking


# ----------------------------------------------------------------------------------------------- inputs


def letterboxed_frames(paths: list[str], cfg: Localise) -> np.ndarray:
    """Every frame decoded (a large JPEG at reduced scale) and letterboxed into the localiser's input."""
    out = np.zeros((len(paths), cfg.height, cfg.width, 3), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc="localise: decode", unit="img", mininterval=2)):
        rgb, _, reason, _ = decode_bytes(Path(path).read_bytes(), max(cfg.width, cfg.height), "pad")
        if rgb is None:  # ingest decoded it before, so this is a file changed since: say which
            raise ValueError(f"{path} no longer decodes ({reason}); run the ingest stage again")
        out[i] = letterbox(rgb, cfg.width, cfg.height)
    return out


def boxes_by_id(table: pd.DataFrame, key: str) -> dict[str, np.ndarray]:
    """`key` → (n, 4) boxes x, y, width, height."""
    return {name: g[["x", "y", "width", "height"]].to_numpy(np.float64) for name, g in table.groupby(key)}


# ---------------------------------------------------------------------------------------------- scoring


def box_scores(detections: list[Detection], truth: list[np.ndarray]) -> dict[str, float | int]:
    """Mean IoU of each frame's box with its best-matching true box, over the frames that hold a fish."""
    ious = np.array([iou([[d.x, d.y, d.width, d.height]], t).max() for d, t in zip(detections, truth, strict=True)
                     if len(t)])
    if not len(ious):
        return {"n_images": 0}
    return {"n_images": int(len(ious)), "mean_iou": float(ious.mean()), "share_iou_50": float(np.mean(ious >= 0.5)),
            "median_iou": float(np.median(ious))}


def nof_separation(confidence: np.ndarray, has_fish: np.ndarray) -> dict[str, float]:
    """How well the confidence alone tells frames with a fish from NoF frames (ROC AUC), and the means."""
    from sklearn.metrics import roc_auc_score

    out = {"confidence_fish": float(confidence[has_fish].mean()) if has_fish.any() else float("nan"),
           "confidence_no_fish": float(confidence[~has_fish].mean()) if (~has_fish).any() else float("nan")}
    if has_fish.any() and (~has_fish).any():
        out["auc_fish_vs_nof"] = float(roc_auc_score(has_fish, confidence))
    return out


def plot_boxes(frames: list[tuple[str, np.ndarray, Detection, np.ndarray]], title: str):
    """A grid of frames with the true boxes (green) and the localised one (red, its confidence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, -(-len(frames) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.4, rows * 2.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, rgb, det, truth) in zip(axes.ravel(), frames, strict=False):
        ax.imshow(rgb)
        for x, y, w, h in truth:
            ax.add_patch(patches.Rectangle((x, y), w, h, fill=False, edgecolor="lime", linewidth=1.2))
        ax.add_patch(patches.Rectangle((det.x, det.y), det.width, det.height, fill=False, edgecolor="red",
                                       linewidth=1.2))
        best = iou([[det.x, det.y, det.width, det.height]], truth).max() if len(truth) else None
        label = f"{name}  conf {det.confidence:.2f}" + (f"  IoU {best:.2f}" if best is not None else "  no fish")
        ax.set_title(label, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ fold training


def fold_processes(setting: int | str, n_folds: int, cpus: int, devices: int = 0) -> int:
    """How many folds train at once (`localise.processes`), each in its own process.

    auto on a CPU of two cores or more: at least 2, and as many as it takes for the last folds to train two or
    more at a time too (5 folds: 3, as 3 + 2; not 2, as 2 + 2 + 1). One fold's training leaves much of two cores
    idle: a step of 32 crops is a few dozen small convolutions that two threads do not split well (29 ms a step
    on two threads, 37 ms on one), and between steps the process builds the next batch and waits on Python; a
    second fold fills those gaps (bench/localise.py), and a third adds nothing while it runs (29.8 against 29.7
    steps/s on two cores) but keeps the end busy: a fold left to train alone runs at ~27 steps/s where two give
    ~32. 1 where the strategy has GPUs or several replicas (`devices`): there one fold fills the devices, and a
    process of its own would take them over again."""
    if setting == "auto":
        if devices or cpus < 2 or n_folds < 2:
            return 1
        return next(p for p in range(2, n_folds + 1) if n_folds % p == 0 or n_folds % p >= 2)
    if setting < 1:
        raise ConfigError(f"localise.processes: expected auto or at least 1, got {setting}")
    return min(setting, n_folds)


@dataclass(frozen=True)
class FoldJob:
    """What a fold's training needs besides the frames and boxes every fold shares."""

    fold: int
    rows: np.ndarray  # positions in the training frames that this fold trains on
    seed: int
    line: int  # the progress bar's terminal line


_SHARED: dict = {}  # a fold process's frames, boxes and settings, sent once when it starts


def _start_fold_process(frames: np.ndarray, boxes: list[np.ndarray], s: Settings, precision: str) -> None:
    """A fold process sets TensorFlow up as `run` did in the stage's own process (deterministic ops, the same
    precision policy), so it trains the net that process would have. (`spawn_pool` ends it if the stage's
    process dies without shutting it down.)"""
    import keras
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(precision)
    _SHARED.update(frames=frames, boxes=boxes, settings=s)


def train_fold(job: FoldJob, frames: np.ndarray, boxes: list[np.ndarray], s: Settings) -> tuple[list, float]:
    """One fold's localiser, trained on the frames at `job.rows`: its weights, and how long it took (s)."""
    cfg = s.localise
    started = time.perf_counter()
    model = fit_localiser(frames, boxes, job.rows, channels=cfg.channels, steps=cfg.steps,
                          batch_size=cfg.batch_size, crop_width=cfg.crop_width, crop_height=cfg.crop_height,
                          scale_jitter=cfg.scale_jitter, positive_share=cfg.positive_share, views=cfg.views,
                          learning_rate=cfg.learning_rate, policy=photometric_policy(s.augment), seed=job.seed,
                          progress=f"localise fold {job.fold}", progress_line=job.line)
    return model.get_weights(), time.perf_counter() - started


def _train_fold_in_process(job: FoldJob) -> tuple[list, float]:
    return train_fold(job, _SHARED["frames"], _SHARED["boxes"], _SHARED["settings"])


def trained_folds(jobs: list[FoldJob], frames: np.ndarray, boxes: list[np.ndarray], s: Settings, processes: int):
    """Each job's (weights, seconds), in the jobs' order, as each is ready: `processes` at once, each in a
    process of its own (spawned: TensorFlow does not survive a fork), or one after another here when 1."""
    if processes <= 1:
        for job in jobs:
            yield train_fold(job, frames, boxes, s)
        return
    import keras

    with spawn_pool(processes, _start_fold_process,
                    (frames, boxes, s, keras.mixed_precision.global_policy().name)) as pool:
        futures = [pool.submit(_train_fold_in_process, job) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        except BrokenProcessPool as exc:
            raise RuntimeError(f"a localiser fold's process died ({exc}); killed from outside, or out of memory? "
                               f"Each of the {processes} holds the training frames and their views: set "
                               "localise.processes: 1 in params.yaml to train the folds one after another "
                               "in the stage's own process") from exc
        finally:
            for future in futures:  # an error or Ctrl-C here: folds not started yet never start
                future.cancel()


# -------------------------------------------------------------------------------------------------- stage


def run(s: Settings) -> dict:
    """Train the fold localisers, box every frame, score the boxes, write the table, models and report."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # two runs of the same inputs give the same boxes
    with configure_devices(s.train.mixed_precision).scope():
        return _run_in_scope(s)


def _run_in_scope(s: Settings) -> dict:
    import tensorflow as tf

    cfg, paths = s.localise, s.paths
    manifest = read_manifest(paths.manifest)
    is_train = (manifest["split"] == "train").to_numpy()
    train_rows, test_rows = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    folds = assign_folds(train_labels(manifest, where=paths.manifest), manifest.loc[is_train, "group"].to_numpy(),
                         s.cv.n_folds, s.cv.group_by, s.seed)
    frames = letterboxed_frames(manifest["path"].tolist(), cfg)
    boxes = boxes_by_id(pd.read_csv(paths.boxes), "id")
    truth_train = [boxes.get(name, np.zeros((0, 4))) for name in manifest["id"].iloc[train_rows]]
    placements = [Letterbox.fit(w, h, cfg.width, cfg.height) for w, h in zip(manifest.width, manifest.height,
                                                                               strict=True)]
    boxes_in = [placements[r].to_input(t) for r, t in zip(train_rows, truth_train, strict=True)]  # input pixels
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    processes = fold_processes(cfg.processes, s.cv.n_folds, os.cpu_count() or 1,
                               devices=len(tf.config.list_physical_devices("GPU")) + (replicas > 1))

    grid = (cfg.height // STRIDE, cfg.width // STRIDE, 5)
    oof_maps = np.zeros((len(train_rows), *grid), dtype=np.float32)
    test_maps = np.zeros((len(test_rows), *grid), dtype=np.float32)
    models_dir = Path(paths.localiser)
    models_dir.mkdir(parents=True, exist_ok=True)
    for old in models_dir.glob("fold*.keras"):  # no model of an earlier run stays beside this run's
        old.unlink()
    params = {"seed": s.seed, **flatten(cfg, "localise."), **flatten(s.cv, "cv.")}
    # Positions into train_rows index both the training frames and their boxes.
    jobs = [FoldJob(k, np.flatnonzero(folds != k), s.seed + k, k % processes) for k in range(s.cv.n_folds)]
    with tracking.start_run(s.tracking, "localise", params, tags={"stage": "localise"}):
        for job, (weights, seconds) in zip(jobs, trained_folds(jobs, frames[train_rows], boxes_in, s, processes),
                                           strict=True):
            k, val_pos = job.fold, np.flatnonzero(folds == job.fold)
            model = build_localiser(cfg.width, cfg.height, cfg.channels)  # the whole frame, the fold's weights
            model.set_weights(weights)
            oof_maps[val_pos] = predict_maps(model, frames[train_rows[val_pos]], flip=cfg.flip_tta)
            test_maps += predict_maps(model, frames[test_rows], flip=cfg.flip_tta) / s.cv.n_folds
            save_keras(model, models_dir / f"fold{k}.keras")
            fold = [decode(oof_maps[p], placements[train_rows[p]], cfg.width, cfg.height) for p in val_pos]
            scores = box_scores(fold, [truth_train[p] for p in val_pos])
            tracking.log_metrics({f"fold{k}_{m}": v for m, v in scores.items() if m != "n_images"})
            print(f"localise fold {k}: {len(job.rows)} frames trained, {len(val_pos)} boxed, mean IoU "
                  f"{scores.get('mean_iou', float('nan')):.3f}, trained in {seconds:.0f} s", flush=True)
        write_json(models_dir / SETTINGS_FILE, {**asdict(cfg), "folds": s.cv.n_folds})

        detections: list[Detection | None] = [None] * len(manifest)
        for p, r in enumerate(train_rows):
            detections[r] = decode(oof_maps[p], placements[r], cfg.width, cfg.height)
        for p, r in enumerate(test_rows):
            detections[r] = decode(test_maps[p], placements[r], cfg.width, cfg.height)
        table = localised_table(manifest, detections, folds, train_rows)
        write_csv(paths.localised, table)
        test_truth = true_test_boxes(paths)
        report = score(manifest, detections, truth_train, train_rows, test_truth, paths)
        report["devices"] = device_summary()
        write_json(paths.localise_report, report)
        truth = {**dict(zip(manifest["id"].iloc[train_rows], truth_train, strict=True)), **(test_truth or {})}
        figures = sample_frames(manifest, detections, truth, train_rows)
        save_figure(plot_boxes(figures, "localised (red) against true (green) boxes: out of fold, then stage 2"),
                    Path(paths.figures) / "localise" / "boxes.png")
        tracking.log_metrics({k: v for k, v in flatten(report).items() if isinstance(v, float)})
        tracking.log_artifact(Path(paths.figures) / "localise", "figures")
        tracking.log_artifact(paths.localise_report)
    return report


def localised_table(manifest: pd.DataFrame, detections: list[Detection], folds: np.ndarray, train_rows: np.ndarray
                    ) -> pd.DataFrame:
    fold_of = np.full(len(manifest), -1)
    fold_of[train_rows] = folds
    return pd.DataFrame({
        "id": manifest["id"], "split": manifest["split"],
        "x": [round(d.x, 2) for d in detections], "y": [round(d.y, 2) for d in detections],
        "width": [round(d.width, 2) for d in detections], "height": [round(d.height, 2) for d in detections],
        "confidence": [round(d.confidence, 5) for d in detections], "fold": fold_of,
    }, columns=list(COLUMNS))


def true_test_boxes(paths: Paths) -> dict[str, np.ndarray] | None:
    """The test images' true boxes by image name, where the source has them (the demo does); else None."""
    solution = pd.read_csv(paths.solution_boxes) if Path(paths.solution_boxes).is_file() else pd.DataFrame()
    return boxes_by_id(solution, "image") if not solution.empty else None


def score(manifest: pd.DataFrame, detections: list[Detection], truth_train: list[np.ndarray],
          train_rows: np.ndarray, test_truth: dict[str, np.ndarray] | None, paths: Paths) -> dict:
    """Out-of-fold scores against the annotations, test scores against the true boxes, NoF separation."""
    train_dets = [detections[r] for r in train_rows]
    has_fish = np.array([len(t) > 0 for t in truth_train])
    conf = np.array([d.confidence for d in train_dets])
    report = {"out_of_fold": {**box_scores(train_dets, truth_train), **nof_separation(conf, has_fish),
                              "truth": "the annotation boxes (paths.boxes)"}}
    if test_truth is not None:
        labels = pd.read_csv(paths.solution, keep_default_na=False) if Path(paths.solution).is_file() else None
        for stage, split in ((1, "test_stg1"), (2, "test_stg2")):
            rows = np.flatnonzero((manifest["split"] == split).to_numpy())
            dets = [detections[r] for r in rows]
            true = [test_truth.get(name, np.zeros((0, 4))) for name in manifest["id"].iloc[rows]]
            entry = box_scores(dets, true)
            if labels is not None and not labels.empty:
                nof = set(labels.loc[labels["label"] == "NoF", "image"])
                fish = np.array([name not in nof for name in manifest["id"].iloc[rows]])
                entry.update(nof_separation(np.array([d.confidence for d in dets]), fish))
            report[f"stage{stage}"] = {**entry, "truth": "the true test boxes (paths.solution_boxes)"}
    return report


def sample_frames(manifest, detections, truth: dict[str, np.ndarray], train_rows, n: int = 8) -> list:
    """A few out-of-fold training frames and stage-2 frames, at full resolution, with their true boxes."""
    picks = list(train_rows[:: max(1, len(train_rows) // n)][:n])
    stage2 = np.flatnonzero((manifest["split"] == "test_stg2").to_numpy())
    picks += list(stage2[:: max(1, len(stage2) // n)][:n])
    out = []
    for r in picks:
        rgb = decode_bytes(Path(manifest["path"].iloc[r]).read_bytes())[0]
        name = manifest["id"].iloc[r]
        out.append((name, rgb, detections[r], truth.get(name, np.zeros((0, 4)))))
    return out


def main(argv: list[str] | None = None) -> None:
    report = run(load(Settings, stage_parser(__doc__).parse_args(argv).params))
    print("localise:", json.dumps({k: v for k, v in report.items() if k != "devices"}, default=float))


if __name__ == "__main__":
    main()
