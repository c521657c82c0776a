"""Typed, validated view of `params.yaml`: the single source of truth for every setting and path.

Every section of the file has a frozen dataclass here, the course cases' too, so this module is the schema of
params.yaml. A stage declares what it reads as a `Settings` dataclass whose fields are section names
(`seed: int`, `paths: Paths`, ...) and calls `load(Settings)`: the file is read once, its top-level keys
are checked against the known sections, and every section the stage reads is validated loudly. An unknown
key, a missing key, a wrong type or a value outside its choices raises `ConfigError` naming the key and the
valid options, so a typo in params.yaml (or in `dvc exp run -S ...`) never surfaces deep inside training.

`dvc.yaml` reads the same file through `${...}` interpolation, so paths are written once, there.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import yaml

PARAMS_FILE = Path("params.yaml")

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
    solution_boxes: str
    boxes: str
    ensemble_report: str
    localiser: str
    localised: str
    localise_report: str
    crop_images: str
    crop_views: str


@dataclass(frozen=True)
class Data:
    source: Literal["demo", "kaggle"]
    demo_dir: str
    kaggle_dir: str
    annotations_dir: str  # the community's box files: a folder inside the source's folder (or an absolute path)


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
class Localise:
    """The fish localiser (`pipeline.core.localiser`): its input, its size and how long it trains per fold."""

    width: int  # the letterboxed input, multiples of 16
    height: int
    channels: int  # at stride 4; the net has about 420 x channels^2 weights
    crop_width: int  # training crops of the letterboxed frames, multiples of 16
    crop_height: int
    scale_jitter: float  # crops rescaled by exp(U(-s, s))
    positive_share: float  # crops centred near a fish
    views: int  # photometric draws per training frame and fold, the frame itself included
    steps: int  # training batches per fold
    batch_size: int
    learning_rate: float
    flip_tta: bool  # average the maps of each frame and its mirror image
    processes: int | Literal["auto"]  # folds trained at once, each in its own process; 1: in the stage's own


@dataclass(frozen=True)
class Crops:
    """What the crop classifiers see: a square around the localised fish, cut from the original frame."""

    backbones: tuple[str, ...]  # one crop classifier per backbone: train-crop@<backbone>, named <backbone>-crop
    image_size: int
    margin: float  # added on every side, as a share of the box's longer side
    min_side: int  # the smallest square cut, in original-frame pixels (a tiny or empty box still shows the deck)
    boxes: Literal["localised", "truth"]  # truth: the annotation boxes where there are some (what-if only)


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
    extract_precision: Literal["auto", "float32", "bfloat16"]  # the frozen extractor's compute (embeddings)
    fine_tune: FineTune


@dataclass(frozen=True)
class Ensemble:
    """Each of method, temperature, smoothing and clip names one value or `auto` (every value); the ensemble
    stage scores every combination allowed by nested CV and keeps the best (`pipeline.core.ensembling`)."""

    method: Literal["auto", "mean", "weighted", "geometric", "stacking", "best"]
    temperature: Literal["auto", True, False]
    smoothing: Literal["auto", True, False]
    clip: Literal["auto", "none", "global", "per_class"]
    prior: str
    stacking_c: tuple[float, ...]


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment: str
    registered_model: str


# ------------------------------------------------------------------------- the course's study cases


@dataclass(frozen=True)
class Mlp:
    units: tuple[int, ...]
    dropout: tuple[float, ...]  # one rate per dense layer


@dataclass(frozen=True)
class Cnn:
    filters: tuple[int, ...]  # one kernel_size² convolution + max pooling per entry
    kernel_size: int
    dense_units: tuple[int, ...]
    dropout: float


@dataclass(frozen=True)
class Mnist:
    source: Literal["demo", "keras"]
    image_size: int
    test_fraction: float  # demo only: the real MNIST comes with its own 10,000-image test set
    max_train: int  # keras only: cap on training images (0 = all 60,000) to fit a CPU budget
    epochs: int
    batch_size: int
    learning_rate: float
    mlp: Mlp
    cnn: Cnn
    reports: str


@dataclass(frozen=True)
class HeadTraining:
    """What `pipeline.core.heads.fit_head` reads from its training settings (the fisheries `Train` has more)."""

    epochs: int
    batch_size: int
    learning_rate: float
    patience: int
    label_smoothing: float


@dataclass(frozen=True)
class CatsDogs:
    source: Literal["demo", "kaggle", "petimages"]
    data_dir: str  # holds train.zip (kaggle) or PetImages/ (petimages)
    max_per_class: int  # real sources: images read per class, 0 = all (25,000 images are GPU work)
    demo_images: int
    resize: Literal["pad", "crop", "stretch"]
    backbone: str
    weights: str
    image_size: int
    pooling: Literal["avg", "max"]
    extract_batch_size: int
    test_fraction: float
    val_fraction: float  # of the non-test rows, for the head's early stopping
    head: Head
    train: HeadTraining
    embeddings: str
    reports: str


@dataclass(frozen=True)
class Imdb:
    source: Literal["demo", "keras"]
    vocab_size: int  # words kept (Keras' num_words), padding, start and unknown-word indices included
    maxlen: int  # reviews are padded or cut to their last `maxlen` words; the real reviews need ~500
    demo_reviews: int
    test_fraction: float  # demo only: the real IMDB comes with its own 25,000-review test set
    val_fraction: float  # of the training reviews, for early stopping
    embedding_dim: int
    embedding_dropout: float
    rnn: Literal["lstm", "gru"]
    rnn_units: int
    rnn_dropout: float  # the dropout layer after the recurrent one
    epochs: int
    patience: int
    batch_size: int
    learning_rate: float
    bow_c: float  # inverse L2 strength of the bag-of-words logistic regression
    reports: str


#: Every top-level key of params.yaml and the type its value must have.
SECTIONS: dict[str, type] = {
    "seed": int,
    "paths": Paths,
    "data": Data,
    "demo": Demo,
    "ingest": Ingest,
    "augment": Augment,
    "cv": Cv,
    "localise": Localise,
    "crops": Crops,
    "model": Model,
    "train": Train,
    "ensemble": Ensemble,
    "tracking": Tracking,
    "mnist": Mnist,
    "catsdogs": CatsDogs,
    "imdb": Imdb,
}


# ------------------------------------------------------------------------------------------ validation


def _coerce(value: object, typ: object, where: str) -> object:
    """Check `value` against the annotation `typ`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(typ)
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
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(typ):
            return None
        inner = [t for t in typing.get_args(typ) if t is not type(None)]
        errors = []
        for alternative in inner:  # the first alternative the value fits
            try:
                return _coerce(value, alternative, where)
            except ConfigError as exc:
                errors.append(str(exc).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: {' or '.join(errors)}")
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


T = TypeVar("T")


def from_dict(cls: type[T], raw: object, where: str) -> T:
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


def read_params(path: Path | str = PARAMS_FILE) -> dict[str, object]:
    """The raw file, with its top-level keys checked against `SECTIONS`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run stages from the repository root, where params.yaml lives")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; valid sections are {sorted(SECTIONS)}")
    return raw


def load(settings: type[T], path: Path | str = PARAMS_FILE) -> T:
    """A stage's `Settings` (a dataclass whose fields are sections of params.yaml), validated.

    Only the sections the stage reads are validated, so a stage never fails on another stage's section; the
    top-level keys are always checked, so a misspelt section name fails everywhere.
    """
    raw = read_params(path)
    hints = typing.get_type_hints(settings)
    kwargs = {}
    for f in dataclasses.fields(settings):
        expected = SECTIONS.get(f.name)
        if expected is None or hints[f.name] is not expected:
            # A bug in the stage's Settings, not in params.yaml.
            raise TypeError(f"{settings.__qualname__}.{f.name} must be a section of params.yaml typed "
                            f"{getattr(expected, '__name__', expected)}")
        if f.name not in raw:
            raise ConfigError(f"{path}: missing section '{f.name}'")
        kwargs[f.name] = _coerce(raw[f.name], expected, f.name)
    return settings(**kwargs)


def flatten(obj: object, prefix: str = "") -> dict[str, object]:
    """Flatten nested dataclasses/mappings into dotted keys, for MLflow params."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    out: dict[str, object] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix.rstrip(".")] = list(obj) if isinstance(obj, tuple) else obj
    return out


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """The command line every stage shares: `--params` (default params.yaml, from the repository root)."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--params", default=str(PARAMS_FILE), help="the params file (default: %(default)s)")
    return parser
