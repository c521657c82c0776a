"""Ensemble stage: every model's out-of-fold predictions in, one calibrated set of test predictions out.

`python -m pipeline ensemble`. Reads `<paths.predictions>/<model>/` for every `model.backbones`, scores every
single model, and every candidate (combiner × temperature × burst smoothing × clip shape) that
`ensemble.method`, `temperature`, `smoothing` and `clip` allow, by nested cross-validation
(`pipeline.core.ensembling`); keeps the candidate with the lowest nested score and reports, as the headline
CV, the nested score of that whole procedure, the choice included. Writes the chosen candidate's test
predictions (smoothed within each test set's bursts when chosen) and the OOF predictions the headline
scores, `paths.metrics`, `paths.ensemble_report` and a reliability diagram, then logs the run and the
servable ensemble model to MLflow, where it competes for the `champion` alias only with runs on the same
images and folds (`tracking.comparison_pool`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import calibration as cal
from pipeline.core import serving, tracking
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.ensembling import HONESTY, Candidate, evaluate, fit_ensemble, fitted_to_json, format_table, predict
from pipeline.core.files import file_digest, save_figure, write_csv, write_json
from pipeline.core.manifest import bursts_of, read_manifest, train_labels
from pipeline.core.metrics import accuracy, kaggle_log_loss
from pipeline.core.params import Crops, Cv, Ensemble, Ingest, Model, Paths, Tracking, flatten, load, stage_parser
from pipeline.core.predictions import model_names, prediction_frame, read_predictions

#: Where the whole-frame-only ensemble's test predictions go, inside `paths.ensemble` (see `families`).
FRAMES_ONLY = "frames_only"
#: The MLflow tag holding the SHA-1 of the report file this run wrote.
REPORT_TAG = tracking.REPORT_TAG

#: The basis of every CV figure in `paths.metrics` and the README's tables.
CV_BASIS = ("out of fold, nothing fitted on the scored rows: single models raw, the class prior from the other "
            "folds' labels, the ensemble its nested CV with the choice of candidate included")


@dataclass(frozen=True)
class Settings:
    paths: Paths
    model: Model  # model.backbones: the whole-frame models
    crops: Crops  # crops.backbones: the crop models, <backbone>-crop
    ingest: Ingest  # resize, and how the served model finds bursts (group_hash_size, near_duplicate_bits)
    cv: Cv  # group_by: named in the comparison pool (the folds themselves come from the OOF files)
    ensemble: Ensemble
    tracking: Tracking


def prior_oof(y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """The class-prior baseline out of fold: each fold predicted by the other folds' class shares."""
    out = np.zeros((len(y), len(FISH_CLASSES)))
    for k in np.unique(folds):
        out[folds == k] = cal.class_shares(y[folds != k], len(FISH_CLASSES))
    return out


def burst_summary(bursts: np.ndarray) -> dict[str, int]:
    _, counts = np.unique(bursts, return_counts=True)
    return {"images": int(len(bursts)), "bursts": int(len(counts)), "images_in_bursts": int(counts[counts > 1].sum()),
            "largest": int(counts.max(initial=0))}


def run(s: Settings) -> dict[str, object]:
    """The whole stage without MLflow: read, evaluate, write predictions, metrics, report and figure."""
    paths, models, cfg = s.paths, model_names(s.model, s.crops), s.ensemble
    preds = read_predictions(paths.predictions, models)
    manifest = read_manifest(paths.manifest)
    y = train_labels(manifest, preds.ids, paths.manifest)
    train_bursts = bursts_of(manifest, "train", preds.ids, paths.manifest)
    train_shares = cal.class_shares(y, len(FISH_CLASSES))
    target = cal.target_prior(cfg.prior, FISH_CLASSES)
    started = time.perf_counter()
    ev = evaluate(preds, y, cfg, bursts=train_bursts)
    seconds = time.perf_counter() - started  # to the log only: a DVC output must be the same bytes every run
    chosen: Candidate = ev.chosen

    out_dir = Path(paths.ensemble)
    write_csv(out_dir / "oof.csv", prediction_frame(preds.ids, ev.honest, preds.folds))
    test_bursts = {}
    for name, (ids, stack) in preds.tests.items():
        test_bursts[name] = bursts_of(manifest, name, ids, paths.manifest)
        proba = predict(ev.fitted, stack, None if target is None else (train_shares, target), test_bursts[name])
        write_csv(out_dir / f"{name}.csv", prediction_frame(ids, proba))

    uncalibrated = fit_ensemble(chosen.method, preds.oof, y, preds.folds, temperature=False, clip=False,
                                stacking_c=cfg.stacking_c)[1]
    best_single = min((n for n in ev.rows if n.startswith("model:")), key=lambda n: ev.rows[n]["oof_logloss_raw"])
    figure = cal.plot_reliability(
        {
            f"{best_single[6:]} (best single, raw)": (preds.oof[preds.models.index(best_single[6:])], y),
            f"{chosen.method}, uncalibrated (in-sample)": (uncalibrated, y),
            f"{chosen.name} (nested, as scored)": (ev.honest, y),
        }
    )
    save_figure(figure, Path(paths.figures) / "ensemble" / "reliability.png")

    prior = prior_oof(y, preds.folds)
    metrics = {
        "cv_basis": CV_BASIS,
        "cv_logloss": {**{m: ev.rows[f"model:{m}"]["oof_logloss_raw"] for m in models}, "ensemble": ev.headline},
        "cv_logloss_nested": {"ensemble": ev.nested},
        "cv_logloss_in_sample": {"ensemble": kaggle_log_loss(y, ev.in_sample)},
        "method": chosen.method,
        "candidate": chosen.name,
        "methods_nested": {m: row["oof_logloss_nested_cv"] for m, row in ev.rows.items() if ":" not in m},
        "cv_accuracy": {**{m: accuracy(y, preds.oof[j]) for j, m in enumerate(models)},
                        "ensemble": accuracy(y, ev.honest)},
        "class_prior_oof": kaggle_log_loss(y, prior),
    }
    write_json(paths.metrics, metrics)
    pool = tracking.comparison_pool(preds.ids, manifest.set_index("id").loc[preds.ids, "sha1"],
                                    [FISH_CLASSES[c] for c in y], preds.folds, s.cv.group_by)
    twin = dataclasses.replace(chosen, smoothing=not chosen.smoothing).name
    report = {
        "method": chosen.method,
        "models": list(models),
        "n_oof": len(y),
        "folds": sorted(int(k) for k in np.unique(preds.folds)),
        "settings": dataclasses.asdict(cfg),
        "chosen": {
            "candidate": chosen.name,
            **chosen.to_json(),
            "cv_logloss": ev.headline,
            "cv_basis": ev.headline_basis,
            "oof_logloss_nested_cv": ev.nested,
            "oof_logloss_in_sample": kaggle_log_loss(y, ev.in_sample),
            "accuracy": accuracy(y, ev.honest),
            "choice_without_each_fold": {str(k): v for k, v in ev.choices.items()},
            "smoothing_twin": {"candidate": twin, **({k: ev.candidates[twin][k] for k in
                                                      ("oof_logloss", "oof_logloss_nested_cv")}
                                                     if twin in ev.candidates else {"note": "not a candidate"})},
        },
        "candidates": ev.candidates,
        "results": ev.rows,
        "bursts": {"train": burst_summary(train_bursts), **{n: burst_summary(b) for n, b in test_bursts.items()},
                   "oof_smoothing": "within one fold only"},
        "baselines": {
            "uniform": float(np.log(len(FISH_CLASSES))),
            "class_prior": kaggle_log_loss(y, np.tile(train_shares, (len(y), 1))),
            "class_prior_oof": kaggle_log_loss(y, prior),
        },
        "prior": {
            "setting": cfg.prior,
            "train_shares": dict(zip(FISH_CLASSES, train_shares, strict=True)),
            "target_shares": None if target is None else dict(zip(FISH_CLASSES, target, strict=True)),
            "applied_to": "test predictions only (OOF rows keep the training mix they were drawn from)",
        },
        "pool": pool,
        "honesty": HONESTY,
        "fitted": fitted_to_json(ev.fitted),
        "table": format_table(ev),
    }
    report["families"] = families(s, y, train_bursts, test_bursts, target, train_shares, ev)
    write_json(paths.ensemble_report, report)
    print(f"ensemble: {len(ev.candidates)} candidates scored in {seconds:.1f} s")
    return report


def families(s: Settings, y: np.ndarray, train_bursts: np.ndarray, test_bursts: dict, target, train_shares,
             ev) -> dict[str, dict]:
    """What the crop models add: the same choice (every candidate, nested CV) made on the whole-frame models
    alone, its headline CV beside the full ensemble's, and its test predictions in `<ensemble>/frames_only/`
    for the score stage to put on the leaderboard beside the submission's. Empty without crop models."""
    if not s.crops.backbones or not s.model.backbones:
        return {}
    preds = read_predictions(s.paths.predictions, s.model.backbones)
    frames = evaluate(preds, y, s.ensemble, bursts=train_bursts)
    out_dir = Path(s.paths.ensemble) / FRAMES_ONLY
    for name, (ids, stack) in preds.tests.items():
        proba = predict(frames.fitted, stack, None if target is None else (train_shares, target), test_bursts[name])
        write_csv(out_dir / f"{name}.csv", prediction_frame(ids, proba))
    return {
        "frames": {"models": list(s.model.backbones), "candidate": frames.chosen.name, "cv_logloss": frames.headline,
                   "predictions": str(out_dir)},
        "frames+crops": {"models": list(model_names(s.model, s.crops)), "candidate": ev.chosen.name,
                         "cv_logloss": ev.headline, "predictions": s.paths.ensemble},
    }


def log_to_mlflow(s: Settings, report: dict[str, object]) -> str | None:
    """Record the finished stage in its own MLflow run; return the run id (None when tracking is off).

    The run is tagged with the digest of the report file, which is how the submit stage finds it again
    (`tracking.find_run`): the report itself stays a function of the stage's inputs, with no run id in it.
    It is tagged with its comparison pool too, the only runs its model competes with for `champion`.
    """
    params = {**flatten(s.ensemble, "ensemble."), "model.backbones": list(s.model.backbones),
              "crops.backbones": list(s.crops.backbones)}
    pool = report["pool"]
    tags = {REPORT_TAG: file_digest(s.paths.ensemble_report), tracking.POOL_TAG: pool["key"],
            "pool.images": f"{pool['n_train']} training images, digest {pool['data']}",
            "pool.folds": f"{pool['n_folds']} folds ({pool.get('group_by', '?')}), digest {pool['folds']}",
            "candidate": report["chosen"]["candidate"]}
    with tracking.start_run(s.tracking, "ensemble", params, tags=tags) as run:
        if run is None:
            return None
        scores = {"cv_logloss": report["chosen"]["cv_logloss"]}
        for name, row in report["results"].items():
            key = name.replace(":", ".")
            scores[f"oof_logloss.{key}"] = row.get("oof_logloss", row.get("oof_logloss_temperature_clip"))
            if row["oof_logloss_nested_cv"] is not None:
                scores[f"oof_logloss_nested.{key}"] = row["oof_logloss_nested_cv"]
        scores["oof_logloss.chosen"] = report["chosen"]["oof_logloss_in_sample"]
        if report["chosen"]["oof_logloss_nested_cv"] is not None:
            scores["oof_logloss_nested.chosen"] = report["chosen"]["oof_logloss_nested_cv"]
        tracking.log_metrics(scores)
        tracking.log_artifact(Path(s.paths.figures) / "ensemble", "figures")
        tracking.log_artifact(s.paths.metrics)
        tracking.log_dict(report, "ensemble_report.json")
        # The whole ensemble as one model that predicts from raw images, registered; `champion` points at the
        # version of this pool with the lowest headline CV (unless another fold scheme on these images holds it).
        serving.log_ensemble_model(
            s.paths.predictions, report, model_names(s.model, s.crops), resize=s.ingest.resize,
            localiser=s.paths.localiser,
            registered_model=s.tracking.registered_model, metric_key="cv_logloss", pool=pool["key"],
            bursts={"hash_size": s.ingest.group_hash_size, "max_bits": s.ingest.near_duplicate_bits},
        )
        return run.info.run_id


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    settings = load(Settings, args.params)
    report = run(settings)
    print(report["table"])
    log_to_mlflow(settings, report)


if __name__ == "__main__":
    main()
