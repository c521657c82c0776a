"""Decode every image once, check it, resize it to the working resolution and sign it: in parallel.

Each file is read once; its bytes give the SHA-1, OpenCV decodes them (`IMREAD_UNCHANGED`, so grey-scale and
alpha are seen for what they are and converted to RGB here, not silently by the decoder), and the decoded
frame gives both the resized copy and the boat signature. A JPEG much larger than the working size (the real
frames are 1280 px wide, the cache 96-299 px) is decoded at 1/2, 1/4 or 1/8 scale instead: libjpeg scales in
the DCT, which is several times faster than a full decode plus a resize, and still reads the whole stream.
Its true size and channel count come from the JPEG header, so grey JPEGs are still seen (JPEG has no alpha).
A file that cannot be used is not an exception: it comes back with the reason (empty, unreadable, not an
image, truncated, corrupt) for the quarantine list.
Work is spread over `ingest.workers` processes; the parent only writes the results into a memory map.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.boat_groups import WORK_WIDTH, signature

# Leading bytes of the formats OpenCV decodes that a camera or a user might plausibly produce.
MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"BM": "bmp",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"RIFF": "webp",
}


@dataclass
class Decoded:
    """One file's outcome: the resized RGB frame and its signature, or the reason it was quarantined."""

    index: int
    reason: str | None = None
    image: np.ndarray | None = None
    width: int = 0
    height: int = 0
    sha1: str = ""
    converted: str = ""  # "grey", "alpha", "16bit": what had to be changed to get 8-bit RGB
    sig: dict | None = None


def sniff(data: bytes) -> str | None:
    return next((kind for magic, kind in MAGIC.items() if data.startswith(magic)), None)


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, channels) from a JPEG's start-of-frame segment, or None when there is none."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and pos + 10 <= len(data):
            h = int.from_bytes(data[pos + 5 : pos + 7], "big")
            w = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return w, h, data[pos + 9]
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        pos += 2 + length
    return None


def reduction(width: int, height: int, size: int, mode: str, min_width: int = WORK_WIDTH) -> int:
    """The largest JPEG scale-down (1, 2, 4, 8) that still leaves enough pixels for the cache and the
    signature: the side that `fit_square` scales to `size` (the long one for pad, the short one otherwise)
    and a width of at least `min_width` for the layout signature."""
    side = max(width, height) if mode == "pad" else min(width, height)
    for k in (8, 4, 2):
        if side // k >= size and width // k >= min_width:
            return k
    return 1


def truncation(data: bytes, kind: str | None) -> str | None:
    """Why the bytes look cut short, or None. libjpeg happily returns a half-grey frame for a cut JPEG,
    so the end marker is checked here (within the last KiB: some cameras append a short trailer)."""
    if kind == "jpeg" and b"\xff\xd9" not in data[-1024:]:
        return "truncated JPEG: no end-of-image marker"
    if kind == "png" and b"IEND" not in data[-64:]:
        return "truncated PNG: no IEND chunk"
    return None


def to_rgb(img: np.ndarray) -> tuple[np.ndarray | None, str, str | None]:
    """8-bit, 3-channel RGB from whatever OpenCV decoded; returns (rgb, what was converted, error)."""
    notes = []
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
        notes.append("16bit")
    elif img.dtype != np.uint8:
        return None, "", f"unsupported pixel type {img.dtype}"
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), "+".join([*notes, "grey"]), None
    if img.ndim == 3 and img.shape[2] == 4:
        # The fixed cameras never produce transparency; an alpha channel is dropped, not blended.
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB), "+".join([*notes, "alpha"]), None
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), "+".join(notes), None
    return None, "", f"unsupported layout {img.shape}"


REDUCED = {
    (2, 3): cv2.IMREAD_REDUCED_COLOR_2,
    (4, 3): cv2.IMREAD_REDUCED_COLOR_4,
    (8, 3): cv2.IMREAD_REDUCED_COLOR_8,
    (2, 1): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, 1): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, 1): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def decode_bytes(
    data: bytes, size: int = 0, mode: str = "pad"
) -> tuple[np.ndarray | None, str, str | None, tuple]:
    """Decode file bytes to RGB uint8, at reduced scale for a large JPEG when `size` is given.

    Returns (rgb, conversion note, quarantine reason, (original width, original height)).
    """
    if not data:
        return None, "", "empty file (0 bytes)", (0, 0)
    kind = sniff(data)
    cut = truncation(data, kind)
    if cut:
        return None, "", cut, (0, 0)
    flags, header = cv2.IMREAD_UNCHANGED, jpeg_header(data) if kind == "jpeg" else None
    if header and size:
        k = reduction(header[0], header[1], size, mode)
        # IGNORE_ORIENTATION: the same pixels IMREAD_UNCHANGED gives (fixed cameras, no EXIF rotation).
        flags = REDUCED.get((k, 1 if header[2] == 1 else 3), flags)
        flags = flags | cv2.IMREAD_IGNORE_ORIENTATION if flags != cv2.IMREAD_UNCHANGED else flags
    if header and header[2] == 4 and flags == cv2.IMREAD_UNCHANGED:
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # CMYK: convert, never read it as BGRA
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:
        img, err = None, str(exc).strip().splitlines()[-1]
    else:
        err = "OpenCV could not decode it"
    if img is None or img.size == 0:
        if kind is None:
            return None, "", f"not an image: content starts with {data[:12]!r}", (0, 0)
        return None, "", f"corrupt {kind}: {err}", (0, 0)
    rgb, note, reason = to_rgb(img)
    original = (header[0], header[1]) if header else (img.shape[1], img.shape[0])
    return rgb, note, reason, original


def fit_square(rgb: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize to size x size: `pad` keeps the whole frame and pads with black, `crop` keeps the centre
    square, `stretch` ignores the aspect ratio."""
    h, w = rgb.shape[:2]
    if mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        rgb = rgb[top : top + side, left : left + side]
        h = w = side
    if mode in ("crop", "stretch"):
        interp = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LINEAR
        return cv2.resize(rgb, (size, size), interpolation=interp)
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r}; use pad, crop or stretch")
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(rgb, (nw, nh), interpolation=interp)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    return out


def decode_file(index: int, path: str | Path, size: int, mode: str, hash_size: int) -> Decoded:
    """Read, check, decode, convert, resize and sign one file; never raises for a bad file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return Decoded(index, reason=f"unreadable: {type(exc).__name__}: {exc.strerror or exc}")
    rgb, converted, reason, (w, h) = decode_bytes(data, size, mode)
    if reason:
        return Decoded(index, reason=reason, sha1=hashlib.sha1(data).hexdigest())
    return Decoded(
        index,
        image=fit_square(rgb, size, mode),
        width=w,
        height=h,
        sha1=hashlib.sha1(data).hexdigest(),
        converted=converted,
        sig=signature(rgb, hash_size),
    )


def _job(args: tuple) -> Decoded:
    return decode_file(*args)


def _quiet_worker() -> None:
    # Each process decodes one image at a time; OpenCV's own thread pool would only oversubscribe the cores.
    cv2.setNumThreads(1)


def decode_all(
    paths: Iterable[str | Path], size: int, mode: str, hash_size: int, workers: int
) -> Iterator[Decoded]:
    """Decode every path, in order, with `workers` processes (1: in this process)."""
    tasks = [(i, str(p), size, mode, hash_size) for i, p in enumerate(paths)]
    if workers <= 1 or len(tasks) < 2:
        yield from map(_job, tasks)
        return
    # Never a plain fork: a child forked from a process whose OpenCV or TensorFlow thread pools have run (a
    # test session, a notebook, the served model) can deadlock on a lock held by a thread it did not inherit.
    # A fork server is a fresh interpreter that forks the workers instead: as quick after its first start.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])
    with context.Pool(workers, initializer=_quiet_worker) as pool:
        yield from pool.imap(_job, tasks, chunksize=max(1, min(32, len(tasks) // (workers * 8))))
