"""The ensemble as one MLflow pyfunc model that predicts class probabilities from raw images.

`mlflow.pyfunc.load_model(uri).predict(x)` takes file paths, encoded image bytes, H×W×3 uint8 arrays (one,
a list, or an (N, H, W, 3) batch) or a DataFrame with a `path` (or `image`) column, and returns a DataFrame
of probabilities in the ensemble's class order, one row per input row. Inside, it repeats what the pipeline
did: decode and fit each image to the working square exactly as ingest does (`pipeline.decode`), run every
backbone's frozen extractor and average that backbone's fold heads (for a fine-tuned backbone: average its
fold classifiers on the pixels), then apply the ensemble stage's fitted combination (per-model temperatures,
weighted arithmetic or geometric mean or stacker, burst smoothing, ensemble temperature, class-prior
correction, clip, one floor per class when fitted). Test-time augmentation is not repeated: one view per image.

Smoothing needs the other frames of a burst, and a served model only sees what one `predict` call gives it,
so it smooths across the images of that call: they are hashed as ingest hashes them (dHash and aHash of the
same decoded frame, `ingest.group_hash_size`) and grouped into bursts within `ingest.near_duplicate_bits`,
exactly as ingest groups one split. Send a burst's frames in one call to get what the pipeline submitted;
one image alone is predicted unsmoothed, and `params={"smoothing": False}` turns it off.

Logged size stays small: the fold heads are small `.keras` files, and an extractor with `weights: none` (or
`imagenet`) is rebuilt at load time from its recorded settings — `keras.utils.set_random_seed(seed)` then
`pipeline.models.build_extractor`, the same two calls the train stage makes — and checked against a digest of
the weights recorded when the model was logged, so a Keras version that initialises differently fails loudly
instead of predicting garbage. `extractors="file"` logs the extractors as `.keras` files instead
(self-contained, tens of MB per backbone; automatic for a weights file path).

Inputs, written by the train and ensemble stages:
`<predictions>/<backbone>/extractor.json` ({backbone, image_size, weights, pooling, precision, seed, fine_tuned}),
`<predictions>/<backbone>/models/head_fold<k>.keras` (`classifier_fold<k>.keras` when fine-tuned), and the
ensemble report (`paths.ensemble_report`: `models`, `fitted` (the chosen candidate's `Fitted`), `chosen`,
and `prior` with `train_shares` / `target_shares`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

try:  # the class must subclass PythonModel to be logged; importing this module must still work without mlflow
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]

SETTINGS_FILE = "settings.json"
ARTIFACT_KEY = "ensemble"
# What the logged model needs to load; pinned to the versions that logged it.
REQUIREMENTS = ("mlflow", "tensorflow", "keras", "numpy", "pandas", "opencv-python-headless", "scikit-learn")
_HEAD_FILE = re.compile(r"head_fold(\d+)\.keras$")
_CLASSIFIER_FILE = re.compile(r"classifier_fold(\d+)\.keras$")
MODEL_SCRIPT = """\
import mlflow

from pipeline.core.serving import EnsembleModel

mlflow.models.set_model(EnsembleModel())
"""


class ServingError(ValueError):
    """The pipeline's outputs cannot be packaged, or an input cannot be predicted on; the message says why."""


# ------------------------------------------------------------------------------------------ the maths


def combine(per_model: Sequence[np.ndarray], settings: Mapping[str, Any], keys: np.ndarray | None = None
            ) -> np.ndarray:
    """The ensemble stage's fitted combination of per-model probabilities: `pipeline.core.ensembling.predict`
    itself, on the `Fitted` the stage wrote into its report, with the same class-prior correction; `keys`
    are the rows' bursts for the fitted smoothing (None: no smoothing)."""
    from pipeline.core.ensembling import fitted_from_json, predict

    prior = settings.get("prior") or {}
    ratio = None
    if prior.get("target") is not None:
        ratio = (np.asarray(prior["train"]), np.asarray(prior["target"]))
    return predict(fitted_from_json(settings["fitted"]), np.stack(per_model).astype(np.float64), ratio, keys)


def weights_digest(model: Any) -> str:
    """SHA-1 of every weight of a Keras model: proof that a rebuilt extractor is the one the heads saw."""
    digest = hashlib.sha1()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- inputs


def _source(item: Any) -> bytes | np.ndarray:
    """A file's bytes (decoded later, per working size, as ingest does) or an RGB uint8 array."""
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise ServingError(f"no such image file: {path}")
        return path.read_bytes()
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    img = np.asarray(item)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ServingError(f"expected an H×W×3 RGB image, got an array of shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)  # 0-255 floats, as the pipeline's pixels
    return np.ascontiguousarray(img[..., :3])


def as_sources(model_input: Any) -> tuple[list[bytes | np.ndarray], Any]:
    """Whatever pyfunc was given → (file bytes or RGB arrays, index for the output rows)."""
    import pandas as pd

    index = None
    if isinstance(model_input, pd.DataFrame):
        index = model_input.index
        column = next((c for c in ("path", "image") if c in model_input.columns), None)
        if column is None and model_input.shape[1] == 1:
            column = model_input.columns[0]
        if column is None:
            raise ServingError(f"a DataFrame needs a 'path' or 'image' column; got {list(model_input.columns)}")
        items = list(model_input[column])
    elif isinstance(model_input, pd.Series):
        index, items = model_input.index, list(model_input)
    elif isinstance(model_input, (str, Path, bytes)):
        items = [model_input]
    elif isinstance(model_input, np.ndarray) and model_input.dtype != object:
        items = [model_input] if model_input.ndim in (2, 3) else list(model_input)
    else:
        items = list(model_input)
    return [_source(item) for item in items], index


def decoded(source: bytes | np.ndarray, size: int, mode: str) -> np.ndarray:
    """The RGB frame ingest would have decoded for this image (a large JPEG at reduced scale for `size`; 0:
    at full resolution, as the crop stage decodes)."""
    return decoded_with_size(source, size, mode)[0]


def decoded_with_size(source: bytes | np.ndarray, size: int, mode: str) -> tuple[np.ndarray, tuple[int, int]]:
    """`decoded`, and the original frame's (width, height), which a reduced-scale decode does not show."""
    from pipeline.core.decode import decode_bytes

    if isinstance(source, bytes):
        rgb, _, reason, original = decode_bytes(source, size, mode)
        if rgb is None:
            raise ServingError(f"cannot use this image: {reason}")
        return rgb, original
    return source, (source.shape[1], source.shape[0])


def to_square(source: bytes | np.ndarray, size: int, mode: str) -> np.ndarray:
    """The size×size RGB frame ingest would have cached for this image (`pipeline.decode`'s own steps:
    a large JPEG is decoded at reduced scale for the target size, then fitted by `mode`)."""
    from pipeline.core.decode import fit_square

    return fit_square(decoded(source, size, mode), size, mode)


def burst_keys(frames: Sequence[np.ndarray], hash_size: int, max_bits: int) -> np.ndarray:
    """Bursts among decoded frames, as ingest finds them within one split (`boat_groups.bursts`)."""
    from pipeline.core.boat_groups import bursts, signature

    sigs = [signature(f, hash_size) for f in frames]
    dh, ah = np.stack([s["dhash"] for s in sigs]), np.stack([s["ahash"] for s in sigs])
    return bursts(dh, ah, np.zeros(len(frames), dtype=np.int64), max_bits)


# ------------------------------------------------------------------------------------------- the model


class EnsembleModel(PythonModel):
    """Raw images → ensemble probabilities; see the module docstring for the accepted inputs."""

    # Inputs are paths, bytes or arrays by design, so there is no schema: tell MLflow not to derive one from
    # `predict`'s type hints (it would warn on every import that there are none).
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        import keras

        folder = Path(context.artifacts[ARTIFACT_KEY])
        self.settings = json.loads((folder / SETTINGS_FILE).read_text())
        self.classes = list(self.settings["classes"])
        self.extractors, self.heads = [], []
        import pipeline.core.backbones  # noqa: F401 - registers BackbonePreprocess, which extractors and classifiers use

        for entry in self.settings["backbones"]:
            self.extractors.append(None if entry.get("fine_tuned") else load_extractor(entry, folder))
            self.heads.append([keras.saving.load_model(folder / h, compile=False) for h in entry["heads"]])
        localiser = self.settings.get("localiser")
        self.localisers = [keras.saving.load_model(folder / m, compile=False) for m in localiser["models"]] \
            if localiser else []

    def crops(self, sources: list[bytes | np.ndarray], entry: Mapping[str, Any]) -> np.ndarray:
        """The crop stage's crops: the fold localisers' averaged maps on the letterboxed frame (decoded as the
        localise stage decodes it) give the box, cut from the frame at full resolution."""
        from pipeline.core.crops import cut
        from pipeline.core.localiser import Letterbox, decode, letterbox, predict_maps

        cfg = self.settings["localiser"]
        w, h = cfg["width"], cfg["height"]
        inputs, sizes = [], []
        for src in sources:
            rgb, size = decoded_with_size(src, max(w, h), "pad")
            inputs.append(letterbox(rgb, w, h))
            sizes.append(size)
        inputs = np.stack(inputs)
        maps = np.mean([predict_maps(m, inputs, flip=cfg["flip_tta"]) for m in self.localisers], axis=0)
        crop = entry["crop"]
        out = []
        for src, m, (fw, fh) in zip(sources, maps, sizes, strict=True):
            d = decode(m, Letterbox.fit(fw, fh, w, h), w, h)
            out.append(cut(decoded(src, 0, "pad"), (d.x, d.y, d.width, d.height), crop["margin"],
                           crop["min_side"], entry["image_size"]))
        return np.stack(out)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        sources, index = as_sources(model_input)
        if not sources:
            return pd.DataFrame(columns=self.classes, dtype=np.float64)
        from pipeline.core.decode import fit_square

        params = params or {}
        batch_size = int(params.get("batch_size", self.settings.get("batch_size", 32)))
        mode = self.settings["resize"]
        frames: dict[int, list[np.ndarray]] = {}
        squares: dict[int, np.ndarray] = {}
        per_model = []
        crops: dict[tuple, np.ndarray] = {}
        for entry, extractor, heads in zip(self.settings["backbones"], self.extractors, self.heads, strict=True):
            size = entry["image_size"]
            if entry.get("input", "frames") == "crops":
                key = (size, entry["crop"]["margin"], entry["crop"]["min_side"])
                if key not in crops:
                    crops[key] = self.crops(sources, entry)
                pixels = crops[key]
            else:
                if size not in squares:
                    frames[size] = [decoded(src, size, mode) for src in sources]
                    squares[size] = np.stack([fit_square(f, size, mode) for f in frames[size]])
                pixels = squares[size]
            # A model's prediction is the mean of its fold models, as for the pipeline's test predictions:
            # fold heads on the shared frozen extractor's features, or fine-tuned classifiers on the pixels.
            if extractor is None:
                per_model.append(np.mean([_batched(c, pixels, batch_size) for c in heads], axis=0))
            else:
                features = _batched(extractor, pixels, batch_size)
                per_model.append(np.mean([_batched(h, features, 1024) for h in heads], axis=0))
        keys = None
        smoothing = self.settings["fitted"].get("smoothing", 0.0)
        if smoothing and params.get("smoothing", True) and len(sources) > 1 and self.settings.get("bursts"):
            # Hashed on the frame decoded for the frame models' size, as ingest decodes at model.image_size.
            first = next(iter(frames.values())) if frames else [decoded(s_, 0, mode) for s_ in sources]
            keys = burst_keys(first, self.settings["bursts"]["hash_size"], self.settings["bursts"]["max_bits"])
        proba = combine(per_model, self.settings, keys)
        return pd.DataFrame(proba, columns=self.classes, index=index)


def _batched(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    # Eager calls, not Model.predict: predict traces a new tf.function per model and per batch shape, which
    # for a handful of images costs more than the forward pass and floods the log with retracing warnings.
    return np.concatenate([np.asarray(model(x[i : i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)])


def load_extractor(entry: Mapping[str, Any], folder: Path) -> Any:
    """The backbone's frozen extractor: its logged `.keras` file, or rebuilt from its settings and checked."""
    import keras

    if entry.get("extractor_file"):
        import pipeline.core.backbones  # noqa: F401 - registers BackbonePreprocess for deserialisation

        return keras.saving.load_model(folder / entry["extractor_file"], compile=False)
    extractor = build_seeded_extractor(entry)
    expected, found = entry.get("weights_digest"), None
    if expected and (found := weights_digest(extractor)) != expected:
        raise ServingError(
            f"the rebuilt {entry['backbone']} extractor differs from the one logged (weights digest {found[:12]} "
            f"!= {expected[:12]}; logged with keras {entry.get('keras_version')}, this is keras {keras.__version__}). "
            "Load it with the logged Keras version, or log the model with extractors='file'."
        )
    return extractor


def build_seeded_extractor(entry: Mapping[str, Any]) -> Any:
    """The same two calls as the train stage: global seed, then build (random init depends on both)."""
    import keras

    from pipeline.core.backbones import build_extractor

    keras.utils.set_random_seed(int(entry["seed"]))
    return build_extractor(entry["backbone"], int(entry["image_size"]), entry["weights"], entry["pooling"],
                           entry.get("precision"))  # recorded since extract_precision; before, the global policy


# ---------------------------------------------------------------------------------------------- logging


def ensemble_settings(
    predictions_dir: str | Path,
    report: Mapping[str, Any],
    backbones: Sequence[str] | None = None,
    resize: str = "pad",
    bursts: Mapping[str, int] | None = None,
    localiser: str | Path | None = None,
) -> dict[str, Any]:
    """Everything the served model needs, read from the train and ensemble stages' outputs (no files copied).

    `bursts` is `{"hash_size", "max_bits"}` (ingest's `group_hash_size` and `near_duplicate_bits`), how the
    served model finds bursts among the images of one call; None: it never smooths. `localiser` is the localise
    stage's folder (`paths.localiser`: fold models and settings), which crop models need."""
    if "fitted" not in report:
        raise ServingError(
            "this ensemble report has no 'fitted' entry (written by the ensemble stage since the served model "
            "calls the stage's own predict); run the ensemble stage again"
        )
    backbones = list(backbones or report.get("models") or [])
    if not backbones:
        raise ServingError("no backbones: pass them, or the ensemble report must list 'models'")
    if len(report["fitted"]["model_temperatures"]) != len(backbones):
        raise ServingError(f"the ensemble report was fitted on {len(report['fitted']['model_temperatures'])} "
                           f"models, not the {len(backbones)} given ({backbones})")
    entries = []
    for bb in backbones:
        folder = Path(predictions_dir) / bb
        ext_file = folder / "extractor.json"
        if not ext_file.is_file():
            raise ServingError(f"{ext_file} is missing: the train stage writes it beside the predictions")
        ext = json.loads(ext_file.read_text())
        if ext.get("fine_tuned"):
            # Fine-tuning changed the backbone in every fold: serve each fold's whole classifier.
            pattern, found, what = _CLASSIFIER_FILE, "classifier_fold*.keras", "fine-tuned fold classifiers"
        else:
            pattern, found, what = _HEAD_FILE, "head_fold*.keras", "fold heads"
        models = sorted((folder / "models").glob(found), key=lambda p: int(pattern.search(p.name).group(1)))
        if not models:
            raise ServingError(f"no {what} in {folder / 'models'} ({found}, written by train)")
        entries.append({
            **{k: ext[k] for k in ("backbone", "image_size", "weights", "pooling", "seed")},
            **({"precision": ext["precision"]} if "precision" in ext else {}),
            "name": bb,
            "input": ext.get("input", "frames"),
            **({"crop": ext["crop"]} if ext.get("input") == "crops" else {}),
            "fine_tuned": bool(ext.get("fine_tuned")),
            "head_paths": [str(h) for h in models],
        })
    located = None
    if any(e["input"] == "crops" for e in entries):
        folder = Path(localiser) if localiser is not None else None
        if folder is None or not (folder / "settings.json").is_file():
            raise ServingError(f"crop models need the localise stage's models and settings.json (paths.localiser), "
                               f"not found in {folder}")
        cfg = json.loads((folder / "settings.json").read_text())
        paths = sorted(folder.glob("fold*.keras"), key=lambda p: int(p.stem.removeprefix("fold")))
        if len(paths) != cfg["folds"]:
            raise ServingError(f"{folder} holds {len(paths)} fold localisers, its settings.json says {cfg['folds']}")
        located = {"width": cfg["width"], "height": cfg["height"], "flip_tta": cfg["flip_tta"],
                   "model_paths": [str(p) for p in paths]}
    from pipeline.core.competition import FISH_CLASSES

    prior = report.get("prior") or {}
    target = prior.get("target_shares")
    return {
        "classes": list(FISH_CLASSES),
        "resize": resize,
        "method": report["fitted"]["method"],
        "backbones": entries,
        "fitted": report["fitted"],
        "prior": {
            "train": [float(prior["train_shares"][c]) for c in FISH_CLASSES] if target else None,
            "target": [float(target[c]) for c in FISH_CLASSES] if target else None,
        },
        "bursts": None if bursts is None else {"hash_size": int(bursts["hash_size"]),
                                               "max_bits": int(bursts["max_bits"])},
        "localiser": located,
        "cv_logloss": report.get("chosen", {}).get("cv_logloss"),
    }


def stage_model(settings: Mapping[str, Any], folder: Path, extractors: str = "auto") -> dict[str, Any]:
    """Copy the heads (and, when asked, the extractors) into `folder` with the settings; returns them."""
    import keras

    if extractors not in ("auto", "rebuild", "file"):
        raise ServingError(f"extractors must be auto, rebuild or file, not {extractors!r}")
    out = {**settings, "backbones": [], "keras_version": keras.__version__}
    if settings.get("localiser"):
        located = dict(settings["localiser"])
        (folder / "localiser").mkdir(parents=True, exist_ok=True)
        located["models"] = []
        for path in located.pop("model_paths"):
            rel = f"localiser/{Path(path).name}"
            keras.saving.load_model(path, compile=False).save(folder / rel)
            located["models"].append(rel)
        out["localiser"] = located
    for entry in settings["backbones"]:
        entry = dict(entry)
        bb = entry.get("name", entry["backbone"])
        (folder / "heads" / bb).mkdir(parents=True, exist_ok=True)
        entry["heads"] = []
        for head in entry.pop("head_paths"):
            rel = f"heads/{bb}/{Path(head).name}"
            # Re-saved uncompiled: the train stage's file carries Adam's two moment copies of every weight,
            # two thirds of its size, which serving never uses.
            keras.saving.load_model(head, compile=False).save(folder / rel)
            entry["heads"].append(rel)
        if entry.get("fine_tuned"):  # each fold's classifier holds its own backbone: no shared extractor
            entry["extractor_file"] = None
            out["backbones"].append(entry)
            continue
        # A weights file path will not exist where the model is served: ship the extractor itself.
        as_file = extractors == "file" or (extractors == "auto" and entry["weights"] not in ("none", "imagenet"))
        extractor = build_seeded_extractor(entry)
        if as_file:
            entry["extractor_file"] = f"extractors/{bb}.keras"
            (folder / "extractors").mkdir(exist_ok=True)
            extractor.save(folder / entry["extractor_file"])
        else:
            entry["extractor_file"] = None
            entry["weights_digest"] = weights_digest(extractor)
            entry["keras_version"] = keras.__version__
        out["backbones"].append(entry)
    (folder / SETTINGS_FILE).write_text(json.dumps(out, indent=2) + "\n")
    return out


def _requirements() -> list[str]:
    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def _copy_package(dest: Path) -> Path:
    """The `pipeline` package's sources (no caches), so the logged model loads without this checkout."""
    src = Path(__file__).resolve().parents[1]  # the whole package, not only this layer
    target = dest / "pipeline"

    def skip(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or ((Path(folder) / n).is_file() and not n.endswith(".py"))]

    shutil.copytree(src, target, ignore=skip)
    return target


def log_ensemble_model(
    predictions_dir: str | Path,
    ensemble_report: str | Path | Mapping[str, Any],
    backbones: Sequence[str] | None = None,
    *,
    resize: str = "pad",
    name: str = "model",
    extractors: str = "auto",
    registered_model: str | None = None,
    metric_key: str = "cv_logloss",
    alias: str = "champion",
    pool: str | None = None,
    bursts: Mapping[str, int] | None = None,
    localiser: str | Path | None = None,
) -> dict[str, Any] | None:
    """Log the ensemble as a pyfunc model in the open MLflow run, and optionally register it.

    Call it inside the ensemble stage's `tracking.start_run(...)`, after the stage's outputs and metrics are
    written and logged. `resize` is params.yaml's `ingest.resize`, `bursts` as for `ensemble_settings`. With
    `registered_model`, the model becomes a new version of that name and `alias` points at the version with
    the lowest `metric_key` (a metric of the run: the ensemble's headline CV) among those of the same
    comparison `pool` (`tracking.register_best`). Returns `{"model_uri", "run_id", "registered"}`, or None,
    after one clear message on stderr, when there is no open run, tracking is off, or the outputs cannot be
    packaged: like all tracking, it never fails the stage.
    """
    import warnings

    from pipeline.core import tracking

    run_id = tracking.active_run_id()
    if run_id is None:
        return None
    with tempfile.TemporaryDirectory(prefix="fishpipe-model-") as tmp:
        folder = Path(tmp) / ARTIFACT_KEY
        try:
            report = ensemble_report
            if not isinstance(report, Mapping):
                report = json.loads(Path(report).read_text())
            settings = ensemble_settings(predictions_dir, report, backbones, resize, bursts, localiser)
            folder.mkdir()
            staged = stage_model(settings, folder, extractors)
            code = _copy_package(Path(tmp) / "code")
            # MLflow's "models from code": a two-line script instead of a pickled object, so loading the model
            # imports this module by name rather than unpickling code.
            entry_script = Path(tmp) / "ensemble_model.py"
            entry_script.write_text(MODEL_SCRIPT)
        except Exception as exc:  # noqa: BLE001 - e.g. ImageNet weights missing here: still not the stage's fault
            print(f"WARNING: the ensemble model is not logged to MLflow: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return None
        try:
            import mlflow

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no signature": inputs are paths, bytes or arrays by design
                info = mlflow.pyfunc.log_model(
                    name=name,
                    python_model=str(entry_script),
                    artifacts={ARTIFACT_KEY: str(folder)},
                    code_paths=[str(code)],
                    pip_requirements=_requirements(),
                    metadata={"classes": staged["classes"], "method": staged["method"],
                              "backbones": [b.get("name", b["backbone"]) for b in staged["backbones"]]},
                )
        except Exception as exc:  # noqa: BLE001 - tracking must never break a stage
            tracking.report_failure("log_ensemble_model", exc)
            return None
    registered = None
    if registered_model:
        registered = tracking.register_best(run_id, name, registered_model, metric_key, alias, pool=pool)
    return {"model_uri": info.model_uri, "run_id": run_id, "registered": registered}
