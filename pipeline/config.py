"""Typed, validated view of `params.yaml`: the single source of truth for every setting and path.

Each stage asks for the sections it needs (`load("data", "model")`) and gets frozen dataclasses back.
Validation happens once, at start-up, and loudly: an unknown key, a missing key, a wrong type or a value
outside its allowed choices raises `ConfigError` naming the offending key and the valid options, so a typo
in `params.yaml` (or in `dvc exp run -S ...`) never surfaces as a confusing failure deep inside training.

`dvc.yaml` reads the same file through `${...}` interpolation, so paths are written once, here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = Path("params.yaml")

#: Kaggle's column order for the fisheries submission; the order of every probability array in the project.
FISH_CLASSES: tuple[str, ...] = ("ALB", "BET", "DOL", "LAG", "NoF", "OTHER", "SHARK", "YFT")


class ConfigError(ValueError):
    """A setting in params.yaml is missing, unknown, of the wrong type or outside its allowed values."""


# --------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Paths:
    """Every file and folder a stage reads or writes; dvc.yaml interpolates the same keys."""

    raw: str
    interim: str
    processed: str
    reports: str
    figures: str
    manifest: str
    images: str
    views: str
    embeddings: str
    checkpoints: str
    predictions: str
    ensemble: str
    train_reports: str
    metrics: str
    leaderboard: str
    submission_stg1: str
    submission_stg2: str
    sample_stg1: str
    sample_stg2: str
    solution: str
    ensemble_report: str


@dataclass(frozen=True)
class Data:
    source: Literal["demo", "kaggle"]
    demo_dir: str
    kaggle_dir: str


@dataclass(frozen=True)
class Demo:
    """Size and difficulty of the embedded, generated stand-in for the Kaggle download."""

    n_train: int
    n_test_stg1: int
    n_test_stg2: int
    train_boats: int
    new_boats: int
    width: int
    night_share: float
    burst: float
    seed: int


@dataclass(frozen=True)
class Ingest:
    resize: Literal["pad", "crop", "stretch"]
    workers: int
    max_archive_bytes: int
    max_archive_entries: int
    group_hash_size: int
    group_threshold: float
    near_duplicate_bits: int


@dataclass(frozen=True)
class Augment:
    train_views: int
    tta_views: int
    hflip: float
    vflip: float
    rotate_limit: int
    scale_limit: float
    shift_limit: float
    brightness_contrast: float
    hue_shift: int
    night_vision: float
    blur: float
    preview_samples: int


@dataclass(frozen=True)
class Cv:
    n_folds: int
    group_by: Literal["boat", "none"]


@dataclass(frozen=True)
class Head:
    units: int
    dropout_in: float
    dropout_out: float


@dataclass(frozen=True)
class Model:
    backbones: tuple[str, ...]
    weights: str
    image_size: int
    pooling: Literal["avg", "max"]
    head: Head


@dataclass(frozen=True)
class FineTune:
    enabled: bool
    epochs: int
    learning_rate: float
    unfreeze_blocks: int
    batch_size: int
    input_processes: int  # processes drawing augmented batches; -1: one per CPU core, 0: threads in-process


@dataclass(frozen=True)
class Train:
    epochs: int
    batch_size: int
    learning_rate: float
    patience: int
    class_weight: Literal["balanced", "none"]
    label_smoothing: float
    mixed_precision: Literal["auto", "on", "off"]
    extract_batch_size: int
    fine_tune: FineTune


@dataclass(frozen=True)
class Ensemble:
    method: Literal["mean", "weighted", "geometric", "stacking", "best"]
    temperature: bool
    clip: bool
    prior: str
    stacking_c: tuple[float, ...]


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment: str
    registered_model: str


@dataclass(frozen=True)
class Config:
    """The whole file; stages usually load only the sections they need."""

    seed: int
    paths: Paths
    data: Data
    demo: Demo
    ingest: Ingest
    augment: Augment
    cv: Cv
    model: Model
    train: Train
    ensemble: Ensemble
    tracking: Tracking
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ validation


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check `value` against the annotation `typ`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value, where)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, _ellipsis) = typing.get_args(typ)
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(typ):
            return None
        inner = [t for t in typing.get_args(typ) if t is not type(None)]
        return _coerce(value, inner[0], where)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {typ!r}")  # a bug in this module, not in params


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build the frozen dataclass `cls` from a mapping, rejecting unknown and missing keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ConfigError(f"{where}: missing key '{name}'")
        kwargs[name] = _coerce(raw[name], hints[name], f"{where}.{name}")
    return cls(**kwargs)


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config) if f.name != "extra"
}


def read_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run stages from the repository root, where params.yaml lives")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_section(name: str, raw: dict[str, Any] | None = None, path: Path | str = PARAMS_FILE) -> Any:
    """Validate and return one section (`load_section("model")`); other sections are not touched."""
    raw = read_params(path) if raw is None else raw
    if name not in raw:
        raise ConfigError(f"{path}: missing section '{name}'")
    typ = SECTIONS.get(name)
    if typ is None:
        return raw[name]  # sections owned by the smaller pipelines validate themselves
    return _coerce(raw[name], typ, name)


def load(path: Path | str = PARAMS_FILE) -> Config:
    """Validate the whole file. Top-level sections unknown to `Config` (the course pipelines') go to `extra`."""
    raw = read_params(path)
    known = {name: load_section(name, raw, path) for name in SECTIONS}
    extra = {k: v for k, v in raw.items() if k not in SECTIONS}
    return Config(**known, extra=extra)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dataclasses/mappings into dotted keys, for MLflow params."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix.rstrip(".")] = list(obj) if isinstance(obj, tuple) else obj
    return out
