"""The community's fish boxes, as users have them: Sloth JSON files read into one table of boxes per image.

The NCFM community labelled the training fish with Sloth, one file per class with fish (`alb_labels.json` ...
`yft_labels.json`, `competition.ANNOTATION_FILES`; none for NoF), each a JSON list of image entries
`{"filename": "img_00003.jpg", "class": "image", "annotations": [records]}`. A record is dispatched on its
own `class`:
- `"rect"`: `x`, `y` (top-left corner), `width`, `height` in pixels of the original frame, floats; a few
  real ones start at a negative x or y or end past the frame.
- `"point"`: one end of a fish. Files of the same names circulate holding a head point and a tail point per
  fish; a pair becomes the box around a band POINT_HALF_DEPTH of the fish's length either side of the
  head-to-tail line, lengthened by POINT_END_MARGIN at each end (the points sit on the snout and the tail's
  fork; the fins and the tail's lobes stick out past them). An entry with an odd number of points carries a
  dummy first point, which is dropped, and the first entry of a point file that names no training image is
  the files' dummy first record, skipped.
`filename` may carry a folder (`../train/ALB/img_00003.jpg`, `C:\\fish\\img_00003.jpg`): entries match the
manifest's training images by base name. Boxes are clipped to the frame (the manifest has every image's
original width and height); a box with nothing left inside is dropped. Everything dropped, clipped or
converted is counted in the report section `match` returns, with examples, so a user can see what became of
every file, entry and record. A file that is not JSON, or not a list of entries, stops the run:
`AnnotationError` names the file and the position (ingest turns it into an `IngestError`).

This module reads files and returns tables and report sections; it writes nothing.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.competition import ANNOTATION_FILES, FISH_CLASSES

#: Half the fish's depth either side of its head-to-tail line, as a share of that line's length: tunas are
#: about a quarter as deep as they are long, a third with their fins.
POINT_HALF_DEPTH = 0.15
#: Added beyond the head point and beyond the tail point, as a share of the length between them.
POINT_END_MARGIN = 0.05
#: A clipped box narrower or lower than this (pixels) has nothing of the frame in it: dropped as off the frame.
MIN_SIDE = 1.0
#: Examples listed per kind of problem in the report (the counts are always complete).
EXAMPLES = 10

BOX_COLUMNS: tuple[str, ...] = ("id", "x", "y", "width", "height", "kind", "source")
SOLUTION_BOX_COLUMNS: tuple[str, ...] = ("image", "stage", "x", "y", "width", "height")


class AnnotationError(ValueError):
    """An annotation or solution-box file cannot be read at all; the message names the file and the position."""


@dataclass
class AnnotationFile:
    """One class file, parsed: its class and its entries, still unmatched."""

    path: Path
    label: str
    entries: list


@dataclass
class Folder:
    """What `load_folder` found: the parsed class files, and the files it set aside with the reason."""

    path: Path | None
    found: bool
    files: list[AnnotationFile] = field(default_factory=list)
    ignored: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ files


def base_name(filename: str) -> str:
    """The file name without any folder, POSIX or Windows (`C:\\fish\\img_00003.jpg` -> `img_00003.jpg`)."""
    return filename.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].strip()


def class_of_file(name: str) -> str | None:
    """The class a `<class>_labels.json` file is for, whatever its case (`NoF_labels.json` -> `NoF`), or None."""
    lower = name.lower()
    if not lower.endswith("_labels.json"):
        return None
    stem = lower[: -len("_labels.json")]
    return next((c for c in FISH_CLASSES if c.lower() == stem), None)


def read_sloth(path: Path) -> list:
    """A Sloth file's entries; `AnnotationError` naming the file (and line and column) if it is not one."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: files saved on Windows often open with a BOM
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {exc.start}); annotation files are JSON") from exc
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (character {exc.pos}); "
            "fix the file, download it again or move it out of the annotations folder"
        ) from exc
    if not isinstance(data, list):
        raise AnnotationError(
            f"{path}: expected a JSON list of image entries (Sloth's format: "
            '[{"filename": ..., "class": "image", "annotations": [...]}, ...]), found a JSON '
            f"{type(data).__name__.replace('dict', 'object')}"
        )
    return data


def load_folder(folder: Path | None) -> Folder:
    """Parse every class file in `folder` (not its sub-folders), before any image is decoded.

    A missing folder is no error (no boxes; the report says so). Files that are not a class's
    `<class>_labels.json`, and the NoF file some users have, are set aside with the reason; broken JSON in a
    class file raises `AnnotationError`.
    """
    if folder is None or not Path(folder).is_dir():
        return Folder(None if folder is None else Path(folder), False)
    out = Folder(Path(folder), True)
    for path in sorted(Path(folder).iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.name.startswith("__") or path.is_dir():
            continue  # hidden files, macOS resource forks, sub-folders
        label = class_of_file(path.name)
        if label is None:
            out.ignored.append({"file": path.name, "reason": "not a class file: expected "
                                + ", ".join(ANNOTATION_FILES.values())})
        elif label == "NoF":
            out.ignored.append({"file": path.name, "reason": "not read: NoF frames hold no fish, so a NoF file "
                                "has no box to give (any box in it would contradict the frame's label)"})
        else:
            out.files.append(AnnotationFile(path, label, read_sloth(path)))
    return out


# ------------------------------------------------------------------------------------------ boxes


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def points_to_box(head: tuple[float, float], tail: tuple[float, float]) -> tuple[float, float, float, float]:
    """The box (x, y, width, height) around a fish whose head and tail points are given.

    The fish is taken as a band POINT_HALF_DEPTH of its length either side of the head-to-tail line,
    lengthened by POINT_END_MARGIN at each end: its axis-aligned box is what a rectangle would have been.
    """
    (hx, hy), (tx, ty) = head, tail
    length = math.hypot(hx - tx, hy - ty)
    if length == 0:
        return hx, hy, 0.0, 0.0
    ux, uy = (hx - tx) / length, (hy - ty) / length
    ends = POINT_END_MARGIN * length
    half = POINT_HALF_DEPTH * length
    xs, ys = [], []
    for px, py, sign in ((hx, hy, 1.0), (tx, ty, -1.0)):
        cx, cy = px + sign * ends * ux, py + sign * ends * uy
        for side in (1.0, -1.0):
            xs.append(cx - side * half * uy)
            ys.append(cy + side * half * ux)
    return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)


def clip_box(box: tuple[float, float, float, float], width: float, height: float
             ) -> tuple[float, float, float, float] | None:
    """`box` cut to the frame `width` x `height` (the same tuple when it lies inside); None when less than
    MIN_SIDE of it is left inside."""
    x, y, w, h = box
    if x >= 0 and y >= 0 and x + w <= width and y + h <= height and w >= MIN_SIDE and h >= MIN_SIDE:
        return box
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
        return None
    return x0, y0, x1 - x0, y1 - y0


class _Tally:
    """Counts and a few examples of each thing the report lists."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list] = {}

    def add(self, kind: str, example: object = None, n: int = 1) -> None:
        self.counts[kind] += n
        if example is not None and len(self.examples.setdefault(kind, [])) < EXAMPLES:
            self.examples[kind].append(example)

    def section(self, kind: str) -> dict:
        return {"count": int(self.counts[kind]), "examples": self.examples.get(kind, [])}


def _records(entry_records: list, where: dict, tally: _Tally) -> list[tuple[tuple[float, float, float, float], str]]:
    """The boxes of one entry's records (`rect` as drawn, `point` pairs converted), each with its kind."""
    boxes, points = [], []
    for k, rec in enumerate(entry_records):
        kind = rec.get("class") if isinstance(rec, dict) else None
        if kind == "rect":
            x, y, w, h = (_number(rec.get(key)) for key in ("x", "y", "width", "height"))
            if None in (x, y, w, h):
                tally.add("invalid_records", {**where, "record": k, "reason": "rect without numeric x, y, width "
                                              "and height"})
            elif w <= 0 or h <= 0:
                tally.add("invalid_records", {**where, "record": k, "reason": f"rect of size {w} x {h}"})
            else:
                boxes.append(((x, y, w, h), "rect"))
        elif kind == "point":
            x, y = _number(rec.get("x")), _number(rec.get("y"))
            if None in (x, y):
                tally.add("invalid_records", {**where, "record": k, "reason": "point without numeric x and y"})
            else:
                points.append((x, y))
        else:
            tally.add("invalid_records", {**where, "record": k, "reason": f"unknown record class {kind!r} "
                                          "(expected rect or point)"})
    if points:
        tally.add("point_records", n=len(points))
        if len(points) % 2:  # the circulating point files open an entry's list with a dummy point
            tally.add("dummy_points", where)
            points = points[1:]
        for head, tail in zip(points[0::2], points[1::2], strict=True):
            boxes.append((points_to_box(head, tail), "point"))
            tally.add("point_boxes")
    return boxes


def match(folder: Folder, manifest: pd.DataFrame, quarantined: frozenset[str] | set[str] = frozenset()
          ) -> tuple[pd.DataFrame, dict]:
    """The boxes table (`BOX_COLUMNS`, one row per box, clipped to the frame, sorted) and the report section.

    `manifest` gives the training images (`id`, `label`, `width`, `height`) and the test ids; `quarantined`
    the names of training files that ingest set aside, so that their entries say why they found no image.
    """
    train = manifest[manifest.split == "train"].set_index("id")
    tests = {base_name(i) for i in manifest.loc[manifest.split != "train", "id"]}
    tally = _Tally()
    rows: list[tuple] = []
    seen: set[tuple] = set()
    files_report = []
    for af in folder.files:
        kinds = Counter(rec.get("class") for e in af.entries if isinstance(e, dict)
                        for rec in (e.get("annotations") or []) if isinstance(rec, dict))
        point_file = kinds.get("point", 0) > 0 and kinds.get("rect", 0) == 0
        n_boxes = 0
        for i, entry in enumerate(af.entries):
            where = {"file": af.path.name, "entry": i}
            if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
                tally.add("invalid_entries", {**where, "reason": "not an object with a filename"})
                continue
            name = base_name(entry["filename"])
            where = {"file": af.path.name, "filename": entry["filename"]}
            records = entry.get("annotations", [])
            if not isinstance(records, list):
                tally.add("invalid_entries", {**where, "reason": "annotations is not a list"})
                continue
            if name not in train.index:
                if point_file and i == 0:
                    tally.add("dummy_entries", where)
                elif name in quarantined:
                    tally.add("unmatched", {**where, "reason": "the training image was quarantined"})
                elif name in tests:
                    tally.add("unmatched", {**where, "reason": "a test image: test boxes are never used"})
                else:
                    tally.add("unmatched", {**where, "reason": "no training image of this name"})
                continue
            if not records:
                tally.add("empty_entries", where)
                continue
            image = train.loc[name]
            if image.label != af.label:
                action = "boxes dropped: a NoF frame holds no fish" if image.label == "NoF" else "boxes kept"
                tally.add("class_mismatch", {"id": name, "file": af.path.name, "file_class": af.label,
                                             "folder_class": image.label, "action": action})
                if image.label == "NoF":
                    continue
            for box, kind in _records(records, where, tally):
                clipped = clip_box(box, image.width, image.height)
                shown = [round(v, 2) for v in box]
                if clipped is None:
                    tally.add("off_frame", {"id": name, "file": af.path.name, "box": shown,
                                            "frame": [int(image.width), int(image.height)]})
                    continue
                if clipped != box:
                    tally.add("clipped", {"id": name, "file": af.path.name, "box": shown,
                                          "clipped_to": [round(v, 2) for v in clipped]})
                key = (name, *(round(v, 2) for v in clipped))
                if key in seen:  # the same image listed twice, or in two class files
                    tally.add("duplicates", {"id": name, "file": af.path.name, "box": shown})
                    continue
                seen.add(key)
                rows.append((name, *(round(v, 3) for v in clipped), kind, af.path.name))
                n_boxes += 1
        shape = {(True, False): "rect", (False, True): "point", (True, True): "mixed", (False, False): "empty"}
        files_report.append({"file": af.path.name, "class": af.label, "entries": len(af.entries),
                             "format": shape[kinds.get("rect", 0) > 0, kinds.get("point", 0) > 0],
                             "boxes": n_boxes})
    boxes = pd.DataFrame(rows, columns=list(BOX_COLUMNS))
    boxes = boxes.sort_values(["id", "source", "x", "y"], kind="stable").reset_index(drop=True)
    return boxes, _report(folder, files_report, tally, boxes, train)


def _report(folder: Folder, files: list[dict], tally: _Tally, boxes: pd.DataFrame, train: pd.DataFrame) -> dict:
    boxed = set(boxes.id)
    without = train.index[~train.index.isin(boxed)]
    if not folder.found:
        note = "no annotation folder: no boxes (put the community's <class>_labels.json files there)"
    elif not folder.files:
        note = "no class file in the annotation folder: no boxes"
    else:
        note = "every training image without a box is fine: NoF, or not annotated"
    return {
        "folder": None if folder.path is None else str(folder.path),
        "found": folder.found,
        "note": note,
        "files": files,
        "ignored_files": folder.ignored,
        "boxes": len(boxes),
        "images_with_boxes": len(boxed),
        "boxes_by_kind": {k: int(v) for k, v in boxes.kind.value_counts().sort_index().items()},
        "train_images_without_boxes": {
            "count": len(without),
            "by_class": {c: int((train.loc[without, "label"] == c).sum()) for c in FISH_CLASSES},
        },
        "unmatched": tally.section("unmatched"),
        "empty_entries": tally.section("empty_entries"),
        "class_mismatch": tally.section("class_mismatch"),
        "clipped": tally.section("clipped"),
        "off_frame": tally.section("off_frame"),
        "duplicates": tally.section("duplicates"),
        "points": {
            "records": int(tally.counts["point_records"]),
            "boxes": int(tally.counts["point_boxes"]),
            "dummy_points": tally.section("dummy_points"),
            "dummy_entries": tally.section("dummy_entries"),
            "half_depth": POINT_HALF_DEPTH,
            "end_margin": POINT_END_MARGIN,
        },
        "invalid_entries": tally.section("invalid_entries"),
        "invalid_records": tally.section("invalid_records"),
    }


# ------------------------------------------------------------------------------------------ solution


def read_solution_boxes(path: Path | None, manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The test images' true boxes when the source has them (the demo does), clipped to the frame and sorted;
    a header-only table otherwise. Rows naming no test image of the manifest are dropped and reported."""
    empty = pd.DataFrame(columns=list(SOLUTION_BOX_COLUMNS))
    if path is None:
        return empty, {"file": None, "boxes": 0}
    try:
        frame = pd.read_csv(path, dtype={"image": str})
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"cannot read the solution boxes {path}: {exc}") from exc
    missing = [c for c in SOLUTION_BOX_COLUMNS if c not in frame.columns]
    if missing:
        raise AnnotationError(f"{path} lacks column(s) {missing}; a solution-box file is "
                              f"{','.join(SOLUTION_BOX_COLUMNS)}, one row per fish")
    numbers = frame[["stage", "x", "y", "width", "height"]].apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(numbers.to_numpy(dtype=float)).all(axis=1) | ~numbers.stage.isin([1, 2]).to_numpy()
    if bad.any():
        raise AnnotationError(f"{path}: row(s) {list(np.flatnonzero(bad)[:5] + 2)} lack a stage of 1 or 2 or "
                              "numeric x, y, width and height")
    tests = manifest[manifest.split != "train"].set_index("id")
    tally = _Tally()
    out = []
    for row in frame.assign(**numbers).itertuples(index=False):
        if row.image not in tests.index:
            tally.add("unmatched", row.image)
            continue
        image = tests.loc[row.image]
        box = (float(row.x), float(row.y), float(row.width), float(row.height))
        clipped = clip_box(box, image.width, image.height)
        if clipped is None:
            tally.add("off_frame", {"image": row.image, "box": [round(v, 2) for v in box]})
            continue
        if clipped != box:
            tally.add("clipped")
        out.append((row.image, int(row.stage), *(round(v, 3) for v in clipped)))
    boxes = pd.DataFrame(out, columns=list(SOLUTION_BOX_COLUMNS))
    boxes = boxes.sort_values(["stage", "image", "x", "y"], kind="stable").reset_index(drop=True)
    return boxes, {
        "file": str(path),
        "boxes": len(boxes),
        "images": int(boxes.image.nunique()),
        "clipped": int(tally.counts["clipped"]),
        "off_frame": tally.section("off_frame"),
        "unmatched": tally.section("unmatched"),
    }
