"""Prediction tables: the files the train stage writes and the ensemble and submit stages read.

`oof.csv` holds `id, fold, ALB..YFT` for every training image (out-of-fold), `test_stg1.csv` and
`test_stg2.csv` hold `id, ALB..YFT`; ids are manifest ids, which are the submission's names. One writer and
one reader, with the checks, so that every stage agrees on the format (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.competition import FISH_CLASSES
from pipeline.core.metrics import normalise_rows
from pipeline.core.params import Crops, Model

TEST_SETS: tuple[str, ...] = ("test_stg1", "test_stg2")


def model_names(model: Model, crops: Crops) -> tuple[str, ...]:
    """Every classifier the ensemble combines, as its prediction folder is named: the whole-frame models
    (`model.backbones`), then the crop models (`crops.backbones`, each `<backbone>-crop`)."""
    return (*model.backbones, *(f"{b}-crop" for b in crops.backbones))


@dataclass(frozen=True)
class Predictions:
    """Every model's predictions, row-aligned: `oof` is (m, n, k), `tests` maps to (ids, (m, t, k))."""

    models: tuple[str, ...]
    ids: np.ndarray
    folds: np.ndarray
    oof: np.ndarray
    tests: dict[str, tuple[np.ndarray, np.ndarray]]




def prediction_frame(ids: np.ndarray, proba: np.ndarray, folds: np.ndarray | None = None) -> pd.DataFrame:
    """`id, [fold,] ALB..YFT`: the layout of every prediction file."""
    frame = pd.DataFrame(proba, columns=list(FISH_CLASSES))
    if folds is not None:
        frame.insert(0, "fold", folds)
    frame.insert(0, "id", ids)
    return frame


def read_table(path: Path, leading: list[str]) -> pd.DataFrame:
    """One prediction table, checked (columns, unique ids, probabilities), indexed by id."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the train stage for this backbone first")
    table = pd.read_csv(path)
    expected = leading + list(FISH_CLASSES)
    if list(table.columns) != expected:
        raise ValueError(f"{path}: columns {list(table.columns)}, expected {expected}")
    if table["id"].duplicated().any():
        raise ValueError(f"{path}: duplicated id {table.loc[table['id'].duplicated(), 'id'].iloc[0]!r}")
    values = table[list(FISH_CLASSES)].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values.sum(axis=1) <= 0):
        raise ValueError(f"{path}: probabilities must be finite, non-negative and not all zero in a row")
    return table.set_index("id")


def read_predictions(pred_dir: str | Path, backbones: tuple[str, ...]) -> Predictions:
    """Load `<pred_dir>/<bb>/{oof,test_stg1,test_stg2}.csv` for every backbone, aligned on the first's ids."""
    if not backbones:
        raise ValueError("model.backbones is empty: there is nothing to ensemble")
    pred_dir = Path(pred_dir)
    oofs = [read_table(pred_dir / bb / "oof.csv", ["id", "fold"]) for bb in backbones]
    ids = oofs[0].index.to_numpy()
    folds = oofs[0]["fold"].to_numpy(dtype=np.int64)
    for bb, table in zip(backbones[1:], oofs[1:], strict=True):
        if set(table.index) != set(ids):
            raise ValueError(f"{bb}/oof.csv covers different training images than {backbones[0]}/oof.csv")
        # One fold partition for all models: the stacker is cross-fitted over it, so it must be well defined.
        if not np.array_equal(table.loc[ids, "fold"].to_numpy(dtype=np.int64), folds):
            raise ValueError(f"{bb}/oof.csv assigns different folds than {backbones[0]}/oof.csv")
    oof = np.stack([normalise_rows(t.loc[ids, list(FISH_CLASSES)].to_numpy(np.float64)) for t in oofs])
    tests = {}
    for name in TEST_SETS:
        tables = [read_table(pred_dir / bb / f"{name}.csv", ["id"]) for bb in backbones]
        test_ids = tables[0].index.to_numpy()
        for bb, table in zip(backbones[1:], tables[1:], strict=True):
            if set(table.index) != set(test_ids):
                raise ValueError(f"{bb}/{name}.csv covers different images than {backbones[0]}/{name}.csv")
        stack = np.stack(
            [normalise_rows(t.loc[test_ids, list(FISH_CLASSES)].to_numpy(np.float64)) for t in tables]
        )
        tests[name] = (test_ids, stack)
    return Predictions(tuple(backbones), ids, folds, oof, tests)
