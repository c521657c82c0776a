"""Where the ingest stage finds its inputs: the generated demo folder, or the Kaggle download in any form.

Kaggle ships `train.zip`, `test_stg1.zip`, `test_stg2.7z` and the two sample submissions (zipped or not);
users often unpack some of them by hand. Each piece is taken from its archive when there is one (the file
Kaggle shipped, CRC-checked on the way out), else from the folder or plain file of the same name. Archives
unpack under `${paths.interim}/extracted/`, never beside the download, which stays read-only.
Then every file is listed as a candidate image with its id, split and label, and the sample submissions are
read and checked against the test files, before any pixel is decoded: a wrong download fails in seconds.
The community's box files are looked for in `data.annotations_dir` inside the source's folder (the demo's
`annotations/`, or `data/raw/kaggle/annotations/` beside the Kaggle files), where a user puts them; an
absolute path is taken as it is. True test boxes are read from `solution_boxes.csv` beside `solution.csv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.core.archives import extract, is_junk
from pipeline.core.competition import COMPETITION_URL, FISH_CLASSES, SAMPLE_SUBMISSIONS, SPLITS, STAGE2_PREFIX

SAMPLES = SAMPLE_SUBMISSIONS
ARCHIVES = {
    "train": ("train.zip", "train.7z"),
    "test_stg1": ("test_stg1.zip", "test_stg1.7z"),
    "test_stg2": ("test_stg2.7z", "test_stg2.zip"),
    SAMPLES[0]: (f"{SAMPLES[0]}.zip",),
    SAMPLES[1]: (f"{SAMPLES[1]}.zip",),
}


class IngestError(RuntimeError):
    """The input is wrong in a way no amount of skipping fixes; the message names the file to look at."""


@dataclass
class Sources:
    """The resolved inputs of one ingest run."""

    dirs: dict[str, Path]  # split -> folder of images (train: folder of class folders)
    samples: dict[str, Path]  # "stg1"/"stg2" -> sample submission CSV
    solution: Path | None = None
    solution_boxes: Path | None = None  # the test images' true boxes (the demo's), when the source has them
    annotations: Path | None = None  # the folder of the community's box files; it may not exist
    boats: Path | None = None
    origin: dict[str, str] = field(default_factory=dict)  # piece -> where it came from, for the report
    extractions: list = field(default_factory=list)


@dataclass(frozen=True)
class Candidate:
    """A file that should be an image: its manifest id, split, class (train) and path."""

    id: str
    split: str
    label: str
    path: Path


def locate_demo(demo_dir: Path, annotations_dir: str = "annotations") -> Sources:
    missing = [p for p in (*SPLITS, *SAMPLES, "solution.csv") if not (demo_dir / p).exists()]
    if missing:
        raise IngestError(
            f"the demo download in {demo_dir} lacks {', '.join(missing)}: generate it with "
            "`python -m pipeline demo` (or `dvc repro demo`), or set data.source: kaggle in params.yaml"
        )
    boats, boxes = demo_dir / "boats.csv", demo_dir / "solution_boxes.csv"
    return Sources(
        dirs={s: demo_dir / s for s in SPLITS},
        samples={"stg1": demo_dir / SAMPLES[0], "stg2": demo_dir / SAMPLES[1]},
        solution=demo_dir / "solution.csv",
        solution_boxes=boxes if boxes.exists() else None,
        annotations=demo_dir / annotations_dir,
        boats=boats if boats.exists() else None,
        origin={s: str(demo_dir / s) for s in (*SPLITS, *SAMPLES)},
    )


def _inside(folder: Path, name: str) -> Path:
    """The split folder inside an extraction (`train/` in train.zip), or the extraction itself."""
    return folder / name if (folder / name).is_dir() else folder


def _csv_inside(folder: Path, name: str) -> Path | None:
    if (folder / name).is_file():
        return folder / name
    found = sorted(p for p in folder.rglob("*.csv") if not is_junk(str(p.relative_to(folder))))
    return found[0] if len(found) == 1 else None


def locate_kaggle(kaggle_dir: Path, extract_root: Path, max_bytes: int, max_entries: int,
                  annotations_dir: str = "annotations") -> Sources:
    """Find every piece in `kaggle_dir`, unpacking archives under `extract_root`; name all that is missing."""
    found: dict[str, Path] = {}
    origin: dict[str, str] = {}
    extractions = []
    missing = []
    for piece, archive_names in ARCHIVES.items():
        archive = next((kaggle_dir / a for a in archive_names if (kaggle_dir / a).is_file()), None)
        plain = kaggle_dir / piece
        if archive is not None:
            ext = extract(archive, extract_root / piece, max_bytes, max_entries)
            extractions.append(ext)
            dest = Path(ext.dest)
            path = _csv_inside(dest, piece) if piece.endswith(".csv") else _inside(dest, piece)
            if path is None:
                raise IngestError(f"{archive} does not hold exactly one CSV file; download it again")
            found[piece], origin[piece] = path, str(archive)
        elif plain.is_dir() if piece in SPLITS else plain.is_file():
            found[piece], origin[piece] = plain, str(plain)
        else:
            alternatives = " or ".join([*archive_names, piece + ("/" if piece in SPLITS else "")])
            missing.append(alternatives)
    if missing:
        raise IngestError(
            f"the Kaggle download in {kaggle_dir.resolve()} is incomplete; missing: "
            + "; ".join(missing)
            + ". Put the competition files there: run `make download` (needs a Kaggle API token), "
            f"or download them from {COMPETITION_URL}/data after accepting the competition rules. "
            "To run offline instead, set data.source: demo in params.yaml."
        )
    solution, boxes = kaggle_dir / "solution.csv", kaggle_dir / "solution_boxes.csv"
    return Sources(
        dirs={s: found[s] for s in SPLITS},
        samples={"stg1": found[SAMPLES[0]], "stg2": found[SAMPLES[1]]},
        solution=solution if solution.is_file() else None,
        solution_boxes=boxes if boxes.is_file() else None,
        annotations=kaggle_dir / annotations_dir,
        origin=origin,
        extractions=extractions,
    )


def _files(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Files, sub-folders and junk directly inside `folder`, sorted by name."""
    files, dirs, junk = [], [], []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if is_junk(p.name) or p.name.startswith("."):
            junk.append(p)
        elif p.is_dir():
            dirs.append(p)
        else:
            files.append(p)  # broken links and unreadable files too: decoding reports them
    return files, dirs, junk


def list_candidates(dirs: dict[str, Path]) -> tuple[list[Candidate], list[dict], list[str]]:
    """Every file that should be an image, in manifest order (train by class, then stage 1, stage 2).

    Returns the candidates, files quarantined already (a stray file beside the class folders, a folder
    where an image should be) and junk that was skipped.
    """
    cands: list[Candidate] = []
    quarantine: list[dict] = []
    ignored: list[str] = []
    train = dirs["train"]
    files, class_dirs, junk = _files(train)
    ignored += [str(p) for p in junk]
    unknown = [d.name for d in class_dirs if d.name not in FISH_CLASSES]
    if unknown:
        raise IngestError(
            f"unknown class folder(s) {unknown} in {train}; the classes are exactly {list(FISH_CLASSES)} "
            "(case matters): move or delete the folder"
        )
    quarantine += [{"path": str(p), "split": "train", "reason": "file outside a class folder"} for p in files]
    present = {d.name: d for d in class_dirs}
    empty = [c for c in FISH_CLASSES if c not in present or not _files(present[c])[0]]
    if empty:
        raise IngestError(
            f"class folder(s) {empty} missing or empty in {train}; every class of {list(FISH_CLASSES)} needs "
            "training images: check that train.zip (or the train/ folder) is complete"
        )
    for cls in FISH_CLASSES:
        files, subdirs, junk = _files(present[cls])
        ignored += [str(p) for p in junk]
        quarantine += [
            {"path": str(p), "split": "train", "reason": "folder inside a class folder"} for p in subdirs
        ]
        cands += [Candidate(p.name, "train", cls, p) for p in files]
    for split in ("test_stg1", "test_stg2"):
        files, subdirs, junk = _files(dirs[split])
        ignored += [str(p) for p in junk]
        quarantine += [
            {"path": str(p), "split": split, "reason": "folder inside the test folder"} for p in subdirs
        ]
        if not files:
            raise IngestError(
                f"the test set {dirs[split]} is empty: check that the {split} archive or folder is complete"
            )
        prefix = STAGE2_PREFIX if split == "test_stg2" else ""  # Kaggle's stage-2 submission names
        cands += [Candidate(prefix + p.name, split, "", p) for p in files]
    # Ids are unique within a split (a class folder cannot hold two files of one name, but two class
    # folders can); a training image may share a stage-1 image's name, as many competitions' downloads do.
    seen: dict[tuple[str, str], Path] = {}
    for c in cands:
        if (c.split, c.id) in seen:
            raise IngestError(
                f"two {c.split} files share the name {c.id!r}: {seen[c.split, c.id]} and {c.path}; "
                "an image name may appear once per split: rename or delete one of them"
            )
        seen[c.split, c.id] = c.path
    return cands, quarantine, ignored


def read_sample(path: Path) -> pd.DataFrame:
    """A sample submission, normalised: `image` then the classes in Kaggle's order, names stripped."""
    try:
        frame = pd.read_csv(path, dtype={"image": str})
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot read the sample submission {path}: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("image", *FISH_CLASSES) if c not in frame.columns]
    if missing:
        raise IngestError(
            f"the sample submission {path} lacks column(s) {missing}; its header must be "
            f"image,{','.join(FISH_CLASSES)}"
        )
    frame = frame[["image", *FISH_CLASSES]].copy()
    frame["image"] = frame["image"].astype(str).str.strip()
    dup = frame["image"][frame["image"].duplicated()].tolist()
    if dup:
        raise IngestError(f"the sample submission {path} repeats image(s) {dup[:5]}")
    return frame


def check_sample(sample: pd.DataFrame, expected: set[str], path: Path, where: str) -> None:
    """Stop unless the sample's rows are exactly the expected test ids."""
    names = set(sample["image"])
    extra, lacking = sorted(names - expected), sorted(expected - names)
    if extra or lacking:
        parts = []
        if extra:
            parts.append(f"{len(extra)} row(s) with no test image (e.g. {extra[:3]})")
        if lacking:
            parts.append(f"{len(lacking)} test image(s) without a row (e.g. {lacking[:3]})")
        raise IngestError(
            f"the sample submission {path} does not match the test images in {where}: "
            + "; ".join(parts)
            + ". Use the sample submission and test archive of the same Kaggle download."
        )


def load_samples(sources: Sources, cands: list[Candidate]) -> dict[str, pd.DataFrame]:
    """Read both sample submissions and check them against the test files (valid or not: all need rows)."""
    stg1 = {c.id for c in cands if c.split == "test_stg1"}
    stg2 = {c.id for c in cands if c.split == "test_stg2"}
    s1 = read_sample(sources.samples["stg1"])
    check_sample(s1, stg1, sources.samples["stg1"], str(sources.dirs["test_stg1"]))
    s2 = read_sample(sources.samples["stg2"])
    check_sample(
        s2,
        stg1 | stg2,
        sources.samples["stg2"],
        f"{sources.dirs['test_stg1']} and {sources.dirs['test_stg2']}",
    )
    return {"stg1": s1, "stg2": s2}


def read_solution(path: Path | None) -> pd.DataFrame:
    """The true test labels when the source has them; else an empty frame with the right header."""
    if path is None:
        return pd.DataFrame(columns=["image", "label", "stage"])
    frame = pd.read_csv(path, dtype={"image": str, "label": str})
    missing = [c for c in ("image", "label", "stage") if c not in frame.columns]
    if missing:
        raise IngestError(f"{path} lacks column(s) {missing}; a solution file is image,label,stage")
    bad = sorted(set(frame["label"]) - set(FISH_CLASSES))
    if bad:
        raise IngestError(f"{path} has unknown label(s) {bad[:5]}; labels are {list(FISH_CLASSES)}")
    return frame[["image", "label", "stage"]]
