"""Every ensemble candidate on the local leaderboard: does nested CV rank them as the test sets do?

    python -m pipeline candidate_leaderboard        # after `dvc repro score`, on a source with a solution file

The ensemble stage chooses among its candidates by nested CV and never sees a test label. This tool, run by
hand and never by DVC, refits every candidate of `paths.ensemble_report` on all OOF rows exactly as the stage
does, predicts both test sets (smoothing within their bursts, the stage's prior correction) and scores them
against the solution file, as the score stage scores the submissions. It writes
`reports/candidate_leaderboard.json`: per candidate its nested CV and its stage-1 and stage-2 log loss, the
chosen one and its smoothing twin (the same candidate with smoothing toggled, which is how the smoothing's
effect on stage 2 is measured), and how well the nested ranking predicts the stage-2 one. It is a check of
the choice, made after the fact: choosing by these figures would be fitting the test set.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from pipeline.core import ensembling as E
from pipeline.core.competition import FISH_CLASSES, STAGE2_PREFIX
from pipeline.core.files import read_json, write_json
from pipeline.core.manifest import bursts_of, labels_of, read_manifest, train_labels
from pipeline.core.metrics import kaggle_log_loss
from pipeline.core.params import Ensemble, Model, Paths, from_dict, load
from pipeline.core.predictions import read_predictions
from pipeline.core.sources import read_solution

OUT = "candidate_leaderboard.json"


@dataclasses.dataclass(frozen=True)
class Settings:
    paths: Paths
    model: Model


def leaderboard(s: Settings) -> dict[str, object]:
    paths = s.paths
    report = read_json(paths.ensemble_report)
    cfg = from_dict(Ensemble, report["settings"], "ensemble report settings")
    preds = read_predictions(paths.predictions, tuple(report["models"]))
    manifest = read_manifest(paths.manifest)
    y = train_labels(manifest, preds.ids, paths.manifest)
    keys = E.smoothing_keys(preds.folds, bursts_of(manifest, "train", preds.ids, paths.manifest))
    solution = read_solution(Path(paths.solution)) if Path(paths.solution).is_file() else None
    if solution is None or solution.empty:
        raise SystemExit(f"{paths.solution} holds no labels: nothing to score the candidates against")
    truth = dict(zip(solution["image"], solution["label"], strict=True))
    prior = report["prior"]
    ratio = None
    if prior["target_shares"] is not None:
        ratio = tuple(np.array([shares[c] for c in FISH_CLASSES]) for shares in
                      (prior["train_shares"], prior["target_shares"]))

    # The stage's own fits on every OOF row (the first exclusion of its nested scheme), nothing else.
    cands = E.candidates(cfg)
    scores = E.score_candidates(preds.oof, y, preds.folds, cands, tuple(cfg.stacking_c), keys, nested=False)
    chosen = report["chosen"]["candidate"]
    refit = next(c for c in cands if c.name == chosen)
    if not np.allclose(E.predict(scores.fitted[refit], preds.oof, keys=keys),
                       E.predict(E.fitted_from_json(report["fitted"]), preds.oof, keys=keys), atol=1e-9):
        raise SystemExit(f"refitting {chosen} does not give the report's fit: run the ensemble stage again")

    rows: dict[str, dict[str, object]] = {}
    for c in cands:
        row = {"oof_logloss_nested_cv": report["candidates"][c.name]["oof_logloss_nested_cv"]}
        for stage, split in ((1, "test_stg1"), (2, "test_stg2")):
            ids, stack = preds.tests[split]
            mask = np.array([i in truth and (stage == 1 or i.startswith(STAGE2_PREFIX)) for i in ids])
            proba = E.predict(scores.fitted[c], stack, ratio, bursts_of(manifest, split, ids, paths.manifest))
            row[f"stage{stage}_logloss"] = kaggle_log_loss(labels_of([truth[i] for i in ids[mask]]), proba[mask])
        rows[c.name] = row
    twin = dataclasses.replace(refit, smoothing=not refit.smoothing).name
    nested = [r["oof_logloss_nested_cv"] for r in rows.values()]
    stage2 = [r["stage2_logloss"] for r in rows.values()]
    ranked = [(n, s) for n, s in zip(nested, stage2, strict=True) if n is not None]
    by_nested, by_stage2 = ([r[i] for r in ranked] for i in (0, 1))
    return {
        "note": "a check of the choice after the fact; the ensemble stage never sees these labels",
        "chosen": chosen,
        "smoothing_twin": twin if twin in rows else None,
        "best_on_stage2": min(rows, key=lambda n: rows[n]["stage2_logloss"]),
        "spearman_nested_vs_stage2": float(spearmanr(by_nested, by_stage2).statistic) if len(ranked) > 2 else None,
        "candidates": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    s = load(Settings, args.params)
    board = leaderboard(s)
    out = Path(s.paths.reports) / OUT
    write_json(out, board)
    for name in (board["chosen"], board["smoothing_twin"], board["best_on_stage2"]):
        if name:
            r = board["candidates"][name]
            nested = r["oof_logloss_nested_cv"]
            print(f"{name:<44} nested {'-' if nested is None else format(nested, '.4f')}  "
                  f"stage 1 {r['stage1_logloss']:.4f}  stage 2 {r['stage2_logloss']:.4f}")
    print(f"Spearman (nested CV vs stage 2, every candidate): {board['spearman_nested_vs_stage2']}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
