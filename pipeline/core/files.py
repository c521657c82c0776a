"""File-system helpers shared by the stages: atomic, reproducible writes of JSON, CSV, arrays and figures.

A stage that dies half-way must never leave a half-written output that DVC or a user could mistake for a
finished one, so every output is written to a temporary name in the same folder and renamed into place.
And a DVC output must be a function of its inputs: two runs of the same maths give the same bytes, so the
writers here leave out what would differ (zip entry times in `.npz` and `.keras` files, Keras' save date).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private (0600); outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=_jsonable)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def write_csv(path: str | Path, frame: Any) -> None:
    """Write a pandas DataFrame atomically, without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def file_digest(path: str | Path, chunk: int = 1 << 24) -> str:
    """SHA-1 of a file's bytes."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


#: Zip entry time of every archive written here (the earliest a zip can say): no run's clock leaks in.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """`np.savez` with fixed entry times, atomically: equal arrays give equal bytes."""
    with atomic_path(path, suffix=".npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", ZIP_EPOCH), "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)


def _renumber_shared_objects(config: object) -> object:
    """`config` with each `shared_object_id` (the Python id() of an object several layers share, such as one
    dtype policy) replaced by its order of first appearance: the ids only have to agree within the file."""
    numbers: dict[object, int] = {}

    def walk(node: object) -> object:
        if isinstance(node, dict):
            return {k: numbers.setdefault(v, len(numbers) + 1) if k == "shared_object_id" else walk(v)
                    for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(config)


def save_keras(model: object, path: str | Path) -> None:
    """`model.save(path)` with the save date, shared-object ids and zip entry times fixed, atomically.

    A `.keras` file is a zip of the config, `metadata.json` (Keras version and date saved) and the weights;
    the same model saved twice then differs only in the date, in the memory addresses the config records for
    objects its layers share, and in the entry times: all three are normalised here.
    """
    path = Path(path)
    with atomic_path(path, suffix=".keras") as tmp:
        raw = Path(tmp).with_name(Path(tmp).name + ".raw.keras")
        try:
            model.save(raw)
            with zipfile.ZipFile(raw) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
                for info in sorted(src.infolist(), key=lambda i: i.filename):
                    data = src.read(info)
                    if info.filename == "metadata.json":
                        meta = json.loads(data)
                        meta.pop("date_saved", None)
                        data = json.dumps(meta, sort_keys=True).encode()
                    elif info.filename == "config.json":
                        data = json.dumps(_renumber_shared_objects(json.loads(data))).encode()
                    dst.writestr(zipfile.ZipInfo(info.filename, ZIP_EPOCH), data, zipfile.ZIP_DEFLATED)
        finally:
            with contextlib.suppress(FileNotFoundError):
                raw.unlink()
