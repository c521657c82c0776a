"""Ensemble stage: every backbone's out-of-fold predictions in, one calibrated set of test predictions out.

`python -m pipeline ensemble`. Reads `<paths.predictions>/<backbone>/` for every `model.backbones`, scores
every single model and every combiner of `pipeline.core.ensembling` side by side (raw, tempered, clipped,
nested), writes the chosen method's OOF and test predictions, `paths.metrics`, `paths.ensemble_report`
and a reliability diagram, then logs the run and the servable ensemble model to MLflow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import calibration as cal
from pipeline.core import serving, tracking
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.ensembling import HONESTY, METHODS, evaluate, fit_ensemble, fitted_to_json, format_table, predict
from pipeline.core.files import file_digest, save_figure, write_csv, write_json
from pipeline.core.manifest import read_manifest, train_labels
from pipeline.core.metrics import accuracy, kaggle_log_loss
from pipeline.core.params import Ensemble, Ingest, Model, Paths, Tracking, flatten, load, stage_parser
from pipeline.core.predictions import prediction_frame, read_predictions

#: The MLflow tag holding the SHA-1 of the report file this run wrote.
REPORT_TAG = tracking.REPORT_TAG


@dataclass(frozen=True)
class Settings:
    paths: Paths
    model: Model
    ingest: Ingest
    ensemble: Ensemble
    tracking: Tracking


def run(s: Settings) -> dict[str, object]:
    """The whole stage without MLflow: read, evaluate, write predictions, metrics, report and figure."""
    paths, backbones, cfg = s.paths, s.model.backbones, s.ensemble
    preds = read_predictions(paths.predictions, backbones)
    y = train_labels(read_manifest(paths.manifest), preds.ids, paths.manifest)
    train_shares = cal.class_shares(y, len(FISH_CLASSES))
    target = cal.target_prior(cfg.prior, FISH_CLASSES)
    rows, fits = evaluate(preds, y, cfg)
    fitted, oof = fits[cfg.method]

    out_dir = Path(paths.ensemble)
    write_csv(out_dir / "oof.csv", prediction_frame(preds.ids, oof, preds.folds))
    for name, (ids, stack) in preds.tests.items():
        proba = predict(fitted, stack, None if target is None else (train_shares, target))
        write_csv(out_dir / f"{name}.csv", prediction_frame(ids, proba))

    uncalibrated = fit_ensemble(
        cfg.method, preds.oof, y, preds.folds, temperature=False, clip=False, stacking_c=cfg.stacking_c
    )[1]
    best_single = min((n for n in rows if n.startswith("model:")), key=lambda n: rows[n]["oof_logloss_raw"])
    figure = cal.plot_reliability(
        {
            f"{best_single[6:]} (best single, raw)": (preds.oof[preds.models.index(best_single[6:])], y),
            f"{cfg.method}, uncalibrated": (uncalibrated, y),
            f"{cfg.method}, as written": (oof, y),
        }
    )
    save_figure(figure, Path(paths.figures) / "ensemble" / "reliability.png")

    metrics = {
        "cv_logloss": {
            **{bb: rows[f"model:{bb}"]["oof_logloss_raw"] for bb in backbones},
            "ensemble": rows[cfg.method]["oof_logloss"],
        },
        "cv_logloss_nested": {"ensemble": rows[cfg.method]["oof_logloss_nested_cv"]},
        "method": cfg.method,
        "methods": {m: rows[m]["oof_logloss"] for m in METHODS},
        "methods_nested": {m: rows[m]["oof_logloss_nested_cv"] for m in METHODS},
        "cv_accuracy": {
            **{bb: accuracy(y, preds.oof[j]) for j, bb in enumerate(backbones)},
            "ensemble": rows[cfg.method]["accuracy"],
        },
    }
    write_json(paths.metrics, metrics)
    report = {
        "method": cfg.method,
        "models": list(backbones),
        "n_oof": len(y),
        "folds": sorted(int(k) for k in np.unique(preds.folds)),
        "settings": dataclasses.asdict(cfg),
        "chosen": {
            "method": cfg.method,
            **{k: rows[cfg.method][k] for k in ("oof_logloss", "oof_logloss_nested_cv", "accuracy")},
        },
        "results": rows,
        "baselines": {
            "uniform": float(np.log(len(FISH_CLASSES))),
            "class_prior": kaggle_log_loss(y, np.tile(train_shares, (len(y), 1))),
        },
        "prior": {
            "setting": cfg.prior,
            "train_shares": dict(zip(FISH_CLASSES, train_shares, strict=True)),
            "target_shares": None if target is None else dict(zip(FISH_CLASSES, target, strict=True)),
            "applied_to": "test predictions only (OOF rows keep the training mix they were drawn from)",
        },
        "honesty": HONESTY,
        "fitted": fitted_to_json(fitted),
        "table": format_table(rows, cfg.method),
    }
    write_json(paths.ensemble_report, report)
    return report


def log_to_mlflow(s: Settings, report: dict[str, object]) -> str | None:
    """Record the finished stage in its own MLflow run; return the run id (None when tracking is off).

    The run is tagged with the digest of the report file, which is how the submit stage finds it again
    (`tracking.find_run`): the report itself stays a function of the stage's inputs, with no run id in it.
    """
    params = {**flatten(s.ensemble, "ensemble."), "model.backbones": list(s.model.backbones)}
    tags = {REPORT_TAG: file_digest(s.paths.ensemble_report)}
    with tracking.start_run(s.tracking, "ensemble", params, tags=tags) as run:
        if run is None:
            return None
        scores = {}
        for name, row in report["results"].items():
            scores[f"oof_logloss.{name.replace(':', '.')}"] = row["oof_logloss"]
            if row["oof_logloss_nested_cv"] is not None:
                scores[f"oof_logloss_nested.{name.replace(':', '.')}"] = row["oof_logloss_nested_cv"]
        scores["oof_logloss.chosen"] = report["chosen"]["oof_logloss"]
        tracking.log_metrics(scores)
        tracking.log_artifact(Path(s.paths.figures) / "ensemble", "figures")
        tracking.log_artifact(s.paths.metrics)
        tracking.log_dict(report, "ensemble_report.json")
        # The whole ensemble as one model that predicts from raw images, registered with an alias on the
        # version whose run has the lowest OOF log loss.
        serving.log_ensemble_model(
            s.paths.predictions, report, s.model.backbones, resize=s.ingest.resize,
            registered_model=s.tracking.registered_model,
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
