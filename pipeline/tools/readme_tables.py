"""The README's result tables, generated from `reports/`, so that the README cannot drift from the reports.

    python -m pipeline readme_tables           # rewrite the tables in README.md (make tables)
    python -m pipeline readme_tables --check   # exit 1, with a diff, if README.md is not what reports/ give

Each table lives between `<!-- table:<name> -->` and `<!-- /table:<name> -->` in README.md; everything between
the two markers is replaced, everything else is left alone. Every table states its basis, and every row of a
table is on it:
- `results`: the demo's headline table. Out-of-fold CV with nothing fitted on the scored rows (single models
  raw, the class prior from the other folds' labels, the ensemble its nested CV with the choice of candidate
  included) and the local leaderboard of the same predictions (`reports/ensemble.json`, `metrics.json`,
  `leaderboard.json`, `train/<model>.json`).
- `smoothing`: the chosen candidate beside its burst-smoothing twin, nested CV and both stages
  (`reports/candidate_leaderboard.json`, written by `python -m pipeline candidate_leaderboard`).
- `localisation`: the localiser's boxes (IoU out of fold and on both test stages) and the ensemble of whole
  frames alone beside the one of frames and crops (`reports/localise.json`, `leaderboard.json`'s `families`).
- `honest_folds`: the train stage's raw grouped and random-split figures (`reports/train/<model>.json`).
- `benchmarks`: `reports/bench.json`.
The models are the ensemble report's `models`, in its order: whatever the ensemble combined.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

README = Path("README.md")
REPORTS = Path("reports")
#: Display names of known models; any other model is shown by its own name.
NAMES = {"vgg16": "VGG16", "resnet50": "ResNet50", "xception": "Xception", "mobilenetv2": "MobileNetV2",
         "efficientnetb0": "EfficientNetB0"}
#: The benchmark rows shown, in order, and what each compares (the measured figures come from bench.json).
BENCH = {
    "cv_cached_speedup": "5-fold CV of the head on cached embeddings (extraction included) vs the same folds "
                         "trained end to end through the frozen backbone",
    "input_over_backbone": "the input path alone (read the cache, augment, batch; one thread) vs the fastest "
                           "configured backbone's forward pass",
    "extract_overhead": "embedding extraction through the pipeline vs a bare `model.predict` on an in-memory "
                        "array (worst of the configured backbones)",
    "idg_epoch_over_pipeline": "one training epoch fed by Keras' legacy `ImageDataGenerator` from JPEGs (the "
                               "seed-kernel style) vs the pipeline's input path; both arms warmed up by an "
                               "untimed epoch, uint8 into the same model, the same worker threads",
    "ingest_speedup_1280x720": "ingest (2 processes, reduced-scale JPEG decode, hashing and checks included) vs "
                               "a plain `cv2.imread` + `cv2.resize` loop, on frames of the real cameras' "
                               "commonest size",
    "ingest_speedup": "the same race on small 320×240 frames, where the per-file checks and hashes cost about "
                      "what the decode saves",
    "crops_speedup": "the crop stage's cut (checked decode of the full 1280×720 frame, a padded square with a "
                     "margin, resize) vs a plain `cv2.imread` + slice + `cv2.resize` loop",
    "head_epoch_speedup": "an epoch of the head as `fit_head` trains it (one compiled call an epoch, validation "
                          "by a compiled call of the model) vs Keras' plain loop (a call a batch, `predict` for "
                          "validation; a new model, so a new trace, each fit); the same numbers",
    "localise_two_folds_speedup": "two localiser folds trained side by side, each in its own process "
                                  "(`localise.processes: auto` on CPUs) vs one after the other in one process; "
                                  "the same weights",
    **{f"bf16_extract_speedup_{name}": f"{NAMES[name]} embeddings in bfloat16 vs float32 through the train "
                                       "stage's path, on a CPU with native bfloat16 (`train.extract_precision: "
                                       "auto`); the same weights" for name in ("vgg16", "resnet50", "xception")},
}
_BLOCK = re.compile(r"(<!-- table:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _f(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "–"
    return format(value, f"+.{digits}f" if sign else f".{digits}f").replace("-", "−")


def _para(text: str) -> str:
    """Prose wrapped as the README's own paragraphs are, never inside a code span."""
    glued = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), text)
    return textwrap.fill(glued, width=110, break_long_words=False, break_on_hyphens=False).replace("\0", " ")


def _name(model: str) -> str:
    """`vgg16` → VGG16, `vgg16-crop` → VGG16 crop (the crop classifier); unknown names as they are."""
    base, crop = (model[:-5], True) if model.endswith("-crop") else (model, False)
    return NAMES.get(base, base) + (" crop" if crop else "")


def results(reports: Path) -> str:
    ens, metrics, board = (_read(reports / f) for f in ("ensemble.json", "metrics.json", "leaderboard.json"))
    if ens is None or metrics is None:
        return "*No ensemble report yet: run `make repro`.*\n"
    stage = {s: (board or {}).get(f"stage{s}", {}) for s in (1, 2)}
    rows = [("class prior (baseline)", ens["baselines"]["class_prior_oof"],
             stage[1].get("baseline_class_prior"), stage[2].get("baseline_class_prior"))]
    for model in ens["models"]:
        train = _read(reports / "train" / f"{model}.json") or {}
        rows.append((_name(model), metrics["cv_logloss"].get(model), train.get("stg1_logloss"),
                     train.get("stg2_logloss")))
    chosen = ens["chosen"]
    folds = {"boat": "grouped by boat", "none": "split at random (leaky)"}.get(ens.get("pool", {}).get("group_by"),
                                                                           "as the train stage made them")
    rows.append((f"**ensemble** (`{chosen['candidate']}`, chosen by nested CV)", chosen["cv_logloss"],
                 stage[1].get("logloss"), stage[2].get("logloss")))
    lines = ["| | out-of-fold CV | stage-1 leaderboard | stage-2 leaderboard (unseen boats) |", "|---|---|---|---|"]
    lines += [f"| {label} | {_f(cv)} | {_f(s1)} | {_f(s2)} |" for label, cv, s1, s2 in rows]
    n_candidates = len(ens.get("candidates", {}))
    lines += [
        "",
        _para("One basis for every row: nothing was fitted on the rows it scores. The CV column is out of fold, with "
        f"folds {folds}: the single models' raw predictions; the class prior predicted from the other "
        "folds' labels; for the ensemble the nested CV of the whole procedure, each fold predicted by the "
        f"candidate ranked best without it (of {n_candidates}: combiner × temperature × burst smoothing × clip), "
        "refit without it (the chosen candidate's own nested CV is "
        f"{_f(chosen['oof_logloss_nested_cv'])}, its in-sample score {_f(chosen['oof_logloss_in_sample'])}). "
        "The leaderboard columns score the same predictions on the demo's test sets: each model's raw "
        "fold-averaged test predictions, the training class shares, the ensemble's submissions. Multi-class "
        "log loss, lower is better, scored as Kaggle does. Generated from `reports/` by `make tables`."),
    ]
    return "\n".join(lines) + "\n"


def smoothing(reports: Path) -> str:
    board = _read(reports / "candidate_leaderboard.json")
    if board is None:
        return ("*Not measured: `python -m pipeline candidate_leaderboard` needs a source with a solution "
                "file (the demo has one).*\n")
    rows = [(board["chosen"], "chosen"), (board["smoothing_twin"], "its smoothing twin"),
            (board["best_on_stage2"], "best on stage 2, in hindsight")]
    seen, lines = set(), ["| candidate | | nested CV | stage 1 | stage 2 |", "|---|---|---|---|---|"]
    for name, role in rows:
        if name and name not in seen:
            seen.add(name)
            r = board["candidates"][name]
            lines.append(f"| `{name}` | {role} | {_f(r['oof_logloss_nested_cv'])} | {_f(r['stage1_logloss'])} "
                         f"| {_f(r['stage2_logloss'])} |")
    chosen, twin = board["candidates"][board["chosen"]], board["candidates"].get(board["smoothing_twin"] or "")
    text = ""
    if twin:
        on, off = (twin, chosen) if "smoothing" in board["smoothing_twin"].split("+") else (chosen, twin)
        text = (
            f"Smoothing over bursts moves stage 2 by {_f(on['stage2_logloss'] - off['stage2_logloss'], sign=True)}"
            f" and stage 1 by {_f(on['stage1_logloss'] - off['stage1_logloss'], sign=True)}, where nested CV "
            f"said {_f(on['oof_logloss_nested_cv'] - off['oof_logloss_nested_cv'], sign=True)}. "
        )
    text += (
        "Basis: each candidate fit on every OOF row as the ensemble stage fits it; nested CV its own; stage 1 "
        "and 2 its test predictions scored against the demo's solution, after the fact (the stage never sees "
        f"them). Across all {len(board['candidates'])} candidates, nested CV and stage 2 rank with Spearman "
        f"{_f(board['spearman_nested_vs_stage2'], 2)}."
    )
    return "\n".join([*lines, "", _para(text)]) + "\n"


def honest_folds(reports: Path) -> str:
    ens = _read(reports / "ensemble.json")
    models = ens["models"] if ens else sorted(p.stem for p in (reports / "train").glob("*.json"))
    lines = ["| model | CV, grouped | CV, grouped, unpeeked | CV, random | stage 2 (grouped / random) "
             "| gap, grouped (unpeeked) | gap, random |", "|---|---|---|---|---|---|---|"]
    for model in models:
        r = _read(reports / "train" / f"{model}.json")
        if not r or "leak_check" not in r:
            continue
        boat, none = r["leak_check"].get("boat", {}), r["leak_check"].get("none", {})
        lines.append(
            f"| {_name(model)} | {_f(boat.get('cv_logloss'))} | {_f(r.get('cv_logloss_unpeeked'))} "
            f"| {_f(none.get('cv_logloss'))} | {_f(boat.get('stg2_logloss'))} / {_f(none.get('stg2_logloss'))} "
            f"| {_f(boat.get('gap_stg2_minus_cv'), 2, True)} ({_f(boat.get('gap_stg2_minus_unpeeked_cv'), 2, True)})"
            f" | {_f(none.get('gap_stg2_minus_cv'), 2, True)} |"
        )
    lines += ["", _para("Basis: the train stage's raw out-of-fold and test figures (`leak_check` in "
                        "`reports/train/<model>.json`), before any ensemble calibration; a gap is stage 2 minus CV.")]
    return "\n".join(lines) + "\n"


def localisation(reports: Path) -> str:
    loc, board = _read(reports / "localise.json"), _read(reports / "leaderboard.json")
    if loc is None:
        return "*No localiser report yet: run `make repro`.*\n"
    names = {"out_of_fold": "training images, out of fold", "stage1": "stage 1 (boats seen)",
             "stage2": "stage 2 (new boats)"}
    lines = ["| localiser boxes | images with a fish | mean IoU | share at IoU ≥ 0.5 | fish vs NoF (AUC) |",
             "|---|---|---|---|---|"]
    for part, label in names.items():
        r = loc.get(part)
        if r:
            lines.append(f"| {label} | {r['n_images']} | {_f(r.get('mean_iou'))} | {_f(r.get('share_iou_50'))} "
                         f"| {_f(r.get('auc_fish_vs_nof'))} |")
    families = (board or {}).get("families") or {}
    if families.get("frames"):
        lines += ["", "| ensemble of | models | out-of-fold CV | stage 1 | stage 2 | stage 2 − CV |",
                  "|---|---|---|---|---|---|"]
        for family in ("frames", "frames+crops"):
            r = families[family]
            models = ", ".join(_name(m) for m in r["models"])
            lines.append(f"| {'whole frames' if family == 'frames' else 'frames + crops'} | {models} "
                         f"| {_f(r['cv_logloss'])} | {_f(r.get('stage1_logloss'))} | {_f(r.get('stage2_logloss'))} "
                         f"| {_f(r.get('gap_stage2_vs_cv'), 2, True)} |")
        cut = families.get("stage2_reduction_by_crops")
        lines += ["", _para(
            "Basis: the localise stage's boxes against the annotation boxes (training images, each boxed by the "
            "fold model that never saw its boat) and the demo's true test boxes (`reports/localise.json`); the "
            "same ensemble choice (every candidate, nested CV) made on the whole-frame models alone and on all "
            "models, its headline CV and its test predictions scored as Kaggle does (`reports/leaderboard.json`, "
            f"`families`). The crop models take {_f(None if cut is None else 100 * cut, 1)}% off stage 2's log "
            "loss. Generated from `reports/` by `make tables`.")]
    return "\n".join(lines) + "\n"


def _target(target: Any) -> str:
    if target in ("", None):
        return "–"
    op, bound = str(target).split() if isinstance(target, str) else (">=", target)
    return f"{'≥' if op == '>=' else '≤'} {bound}"


def benchmarks(reports: Path) -> str:
    bench = _read(reports / "bench.json")
    if bench is None:
        return "*No benchmarks yet: run `make bench`.*\n"
    lines = ["| key | value | target | what it compares | measured |", "|---|---|---|---|---|"]
    for key, what in BENCH.items():
        if key in bench:
            row = bench[key]
            when = f" ({row['date']})" if row.get("date") else ""
            lines.append(f"| `{key}` | {row['value']:.3g} | {_target(row.get('target'))} | {what} "
                         f"| {row['note']}{when} |")
    machine = bench.get("_machine", {})
    lines += ["", _para(f"From `reports/bench.json`, {machine.get('cpus', '?')} CPU cores. Each row keeps the "
                        "figures of the run that last measured it: its own date where it records one, else "
                        f"{machine.get('date', '?')}{' (quick)' if machine.get('quick') else ''}.")]
    return "\n".join(lines) + "\n"


TABLES = {"results": results, "localisation": localisation, "smoothing": smoothing, "honest_folds": honest_folds,
          "benchmarks": benchmarks}


def render(reports: Path = REPORTS) -> dict[str, str]:
    return {name: make(Path(reports)) for name, make in TABLES.items()}


def fill(readme: str, tables: dict[str, str]) -> str:
    """`readme` with the body of every marked table replaced; a table whose markers are missing is an error."""
    found = {m.group("name") for m in _BLOCK.finditer(readme)}
    missing = sorted(set(tables) - found)
    if missing:
        raise ValueError(f"README has no markers for table(s) {missing}: add <!-- table:NAME --> and "
                         "<!-- /table:NAME --> around where each goes")
    return _BLOCK.sub(lambda m: m.group(1) + tables.get(m.group("name"), m.group("body")) + m.group(4), readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the reports")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--reports", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    before = args.readme.read_text()
    after = fill(before, render(args.reports))
    if args.check:
        if before != after:
            sys.stdout.writelines(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                                       str(args.readme), "generated"))
            return 1
        print(f"{args.readme}: tables match {args.reports}/")
        return 0
    if before != after:
        args.readme.write_text(after)
    print(f"{args.readme}: {len(TABLES)} tables {'rewritten' if before != after else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
