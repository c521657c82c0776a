"""Ingest stage: the download (demo or Kaggle, archives or folders) in; checked images, manifest, groups out.

Reads `data`, `ingest`, `model.image_size` and `paths` from params.yaml. Finds the inputs (unpacking the
Kaggle archives safely under `${paths.interim}/extracted/`), checks the class folders and the sample
submissions before decoding anything, decodes every file once in parallel (bad files go to a quarantine list
with their reason, the run goes on), writes the resized images into a memory-mapped `.npy` so real-size data
never has to fit in memory, clusters the frames into boat groups, looks for exact and near duplicates, and
writes the manifest, the normalised sample submissions, the solution and `reports/ingest_report.json`.
The community's box annotations (`data.annotations_dir`, Sloth JSON, `pipeline.core.annotations`) are parsed
before decoding, so broken JSON fails in seconds, and matched to the training images after it: their boxes,
clipped to the frame, go to `paths.boxes`, the test images' true boxes (the demo has them) to
`paths.solution_boxes`, and the report's `annotations` section says what became of every file and entry.
Every output is written to a temporary name and renamed into place. See docs/ARCHITECTURE.md for formats.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.core import annotations as boxes_of
from pipeline.core import boat_groups as groups
from pipeline.core.competition import FISH_CLASSES
from pipeline.core.decode import decode_all
from pipeline.core.files import atomic_path, save_figure, write_csv, write_json
from pipeline.core.manifest import COLUMNS as MANIFEST_COLUMNS
from pipeline.core.params import Data, Ingest, Model, Paths, load, stage_parser
from pipeline.core.sources import (
    IngestError,
    Sources,
    list_candidates,
    load_samples,
    locate_demo,
    locate_kaggle,
    read_solution,
)


@dataclass(frozen=True)
class Settings:
    paths: Paths
    data: Data
    ingest: Ingest
    model: Model  # model.image_size: the side of the cached square images


def _rel(path: Path, root: Path) -> str:
    """Paths in the manifest and report are relative to the repository when they lie inside it.

    Symlinks are not resolved: a data folder linked to another disk still reads as data/raw/...
    """
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return str(path)


def locate(data: Data, ingest: Ingest, paths: Paths, root: Path) -> Sources:
    if data.source == "demo":
        return locate_demo(root / data.demo_dir, data.annotations_dir)
    return locate_kaggle(
        root / data.kaggle_dir,
        root / paths.interim / "extracted",
        ingest.max_archive_bytes,
        ingest.max_archive_entries,
        data.annotations_dir,
    )


def decode_into(cands, images_path: Path, size: int, ingest: Ingest):
    """Decode every candidate into a memory map of valid frames, in candidate order.

    Returns the valid results (without pixels) and the quarantined ones. Frames are written as they arrive,
    so memory holds one chunk of results, not the data set.
    """
    tmp = images_path.with_name(f".{images_path.name}.decoding.npy")
    images_path.parent.mkdir(parents=True, exist_ok=True)
    buf = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(cands), size, size, 3))
    valid, bad = [], []
    try:
        stream = decode_all(
            [c.path for c in cands], size, ingest.resize, ingest.group_hash_size, ingest.workers
        )
        for res in tqdm(stream, total=len(cands), desc="decode", unit="img", mininterval=1.0):
            if res.reason:
                bad.append(res)
                continue
            buf[len(valid)] = res.image
            res.image = None
            valid.append(res)
        buf.flush()
        # Quarantined files leave the tail unused: copy the valid rows into a file of the right shape.
        with atomic_path(images_path) as out:
            if len(valid) == len(cands):
                del buf
                os.replace(tmp, out)
            else:
                final = np.lib.format.open_memmap(
                    out, mode="w+", dtype=np.uint8, shape=(len(valid), size, size, 3)
                )
                for start in range(0, len(valid), 1024):
                    stop = min(start + 1024, len(valid))
                    final[start:stop] = buf[start:stop]
                final.flush()
                del final, buf
    finally:
        if tmp.exists():
            tmp.unlink()
    return valid, bad


def build_manifest(cands, valid, root: Path, true_boats: dict[tuple[str, str], str]) -> pd.DataFrame:
    rows = []
    for res in valid:
        c = cands[res.index]
        rows.append(
            {
                "id": c.id,
                "split": c.split,
                "path": _rel(c.path, root),
                "label": c.label,
                "width": res.width,
                "height": res.height,
                "group": -1,
                "burst": -1,
                "sha1": res.sha1,
                "true_boat": true_boats.get((c.split, c.id), ""),
            }
        )
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def check_decoded(manifest: pd.DataFrame, sources: Sources) -> None:
    """After quarantine: every class still has training images and every test set has images."""
    counts = Counter(manifest.loc[manifest.split == "train", "label"])
    empty = [c for c in FISH_CLASSES if counts[c] == 0]
    if empty:
        raise IngestError(
            f"no valid training image left for class(es) {empty} in {sources.dirs['train']}; "
            "see the quarantine list in reports/ingest_report.json"
        )
    for split in ("test_stg1", "test_stg2"):
        if not (manifest.split == split).any():
            raise IngestError(
                f"no valid image in the test set {sources.dirs[split]}; see the quarantine list "
                "in reports/ingest_report.json"
            )


def describe(data, ingest, image_size, root, sources, manifest, valid, quarantine, ignored) -> dict:
    """The report's account of the inputs: where they came from, what was kept, quarantined or refused."""
    extractions = sources.extractions
    train = manifest.split == "train"
    sizes = Counter(zip(manifest.width, manifest.height, strict=True)).most_common()
    return {
        "source": data.source,
        "inputs": {k: _rel(Path(v), root) for k, v in sources.origin.items()},
        "image_size": image_size,
        "resize": ingest.resize,
        "counts": {s: int((manifest.split == s).sum()) for s in ("train", "test_stg1", "test_stg2")},
        "classes": {c: int((train & (manifest.label == c)).sum()) for c in FISH_CLASSES},
        "quarantined": len(quarantine),
        "quarantine": quarantine,
        # Test images that have a sample-submission row but no pixels: submit must still predict them.
        "quarantined_test_ids": [q["id"] for q in quarantine if q["split"] != "train" and "id" in q],
        "converted": dict(Counter(r.converted for r in valid if r.converted)),
        "original_sizes": {f"{w}x{h}": n for (w, h), n in sizes},
        "archives": [
            {"archive": _rel(Path(e.archive), root), "files": e.files, "bytes": e.bytes} for e in extractions
        ],
        "refused_entries": [r for e in extractions for r in e.refused],
        "ignored": {
            "count": len(ignored) + sum(len(e.ignored) for e in extractions),
            "examples": (ignored + [i for e in extractions for i in e.ignored])[:20],
        },
    }


def group_frames(manifest: pd.DataFrame, valid, ingest: Ingest) -> tuple[np.ndarray, np.ndarray, dict]:
    """Boat group and burst of every manifest row, and the report's groups, bursts, duplicates and
    agreement sections."""
    sig = {k: np.stack([r.sig[k] for r in valid]) for k in ("layout", "dhash", "ahash")}
    w, h, split = manifest.width.to_numpy(), manifest.height.to_numpy(), manifest.split.to_numpy()
    group = groups.assign_groups(w, h, sig["layout"], ingest.group_threshold)
    dups = groups.duplicates(
        manifest.id.to_numpy(), split, manifest.label.to_numpy(), manifest.sha1.to_numpy(),
        sig["dhash"], sig["ahash"], ingest.near_duplicate_bits,
    )  # fmt: skip
    burst = groups.bursts(sig["dhash"], sig["ahash"], split, ingest.near_duplicate_bits)
    known = (manifest.true_boat != "").to_numpy()  # the demo knows every frame's boat; Kaggle's none
    ari = groups.agreement(group[known], manifest.true_boat.to_numpy()[known]) if known.any() else None
    return group, burst, {
        "groups": groups.summarise_groups(group, split, w, h),
        "bursts": groups.summarise_bursts(burst, split),
        "duplicates": dups,
        "ari_vs_true_boats": ari,
    }


def run(s: Settings, root: Path | str = ".") -> dict:
    """The whole stage on the repository (or test folder) `root`; returns the report it wrote."""
    paths, data, ingest, image_size = s.paths, s.data, s.ingest, s.model.image_size
    root = Path(root)
    t0 = time.perf_counter()
    report_path = root / paths.reports / "ingest_report.json"
    # A declared DVC output even when nothing needs unpacking (the demo, or extracted Kaggle folders).
    (root / paths.interim / "extracted").mkdir(parents=True, exist_ok=True)
    sources = locate(data, ingest, paths, root)
    t_extract = time.perf_counter() - t0
    cands, quarantine, ignored = list_candidates(sources.dirs)
    samples = load_samples(sources, cands)  # before decoding: a mismatched download fails in seconds
    solution = read_solution(sources.solution)
    folder = _annotations(sources.annotations)  # broken JSON too
    true_boats: dict[tuple[str, str], str] = {}
    if sources.boats is not None:
        boats = pd.read_csv(sources.boats, dtype=str)
        true_boats = dict(zip(zip(boats["split"], boats["image"], strict=True), boats["boat"], strict=True))

    t1 = time.perf_counter()
    valid, bad = decode_into(cands, root / paths.images, image_size, ingest)
    t_decode = time.perf_counter() - t1
    for r in bad:
        c = cands[r.index]
        quarantine.append({"id": c.id, "path": _rel(c.path, root), "split": c.split, "reason": r.reason})
    manifest = build_manifest(cands, valid, root, true_boats)
    report = describe(data, ingest, image_size, root, sources, manifest, valid, quarantine, ignored)
    try:
        check_decoded(manifest, sources)
    except IngestError:
        write_json(report_path, report)  # the quarantine list is what the user needs to read next
        raise

    t2 = time.perf_counter()
    manifest["group"], manifest["burst"], grouping = group_frames(manifest, valid, ingest)
    report.update(grouping)
    t_groups = time.perf_counter() - t2
    quarantined_train = {Path(q["path"]).name for q in quarantine if q["split"] == "train"}
    boxes, report["annotations"] = boxes_of.match(folder, manifest, quarantined_train)
    if folder.path is not None:
        report["annotations"]["folder"] = _rel(folder.path, root)
    solution_boxes, report["solution_boxes"] = _solution_boxes(sources.solution_boxes, manifest, root)

    write_csv(root / paths.manifest, manifest)
    write_csv(root / paths.sample_stg1, samples["stg1"])
    write_csv(root / paths.sample_stg2, samples["stg2"])
    write_csv(root / paths.solution, solution)
    write_csv(root / paths.boxes, boxes)
    write_csv(root / paths.solution_boxes, solution_boxes)
    images = np.load(root / paths.images, mmap_mode="r")
    w, h = manifest.width.to_numpy(), manifest.height.to_numpy()
    fig = groups.plot_groups(images, manifest.group.to_numpy(), w, h)
    save_figure(fig, root / paths.figures / "groups.png")
    write_json(report_path, report)
    # Timings go to the log, not the report: a DVC output must be the same bytes every run.
    print(f"ingest: unpack {t_extract:.1f} s, decode {t_decode:.1f} s ({len(cands) / max(t_decode, 1e-9):.0f} img/s), "
          f"groups {t_groups:.1f} s")
    return report


def _annotations(folder: Path | None) -> boxes_of.Folder:
    try:
        return boxes_of.load_folder(folder)
    except boxes_of.AnnotationError as exc:
        raise IngestError(str(exc)) from exc


def _solution_boxes(path: Path | None, manifest: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, dict]:
    try:
        frame, section = boxes_of.read_solution_boxes(path, manifest)
    except boxes_of.AnnotationError as exc:
        raise IngestError(str(exc)) from exc
    if path is not None:
        section["file"] = _rel(path, root)
    return frame, section


def main(argv: list[str] | None = None) -> None:
    settings = load(Settings, stage_parser(__doc__).parse_args(argv).params)
    try:
        report = run(settings)
    except IngestError as exc:
        sys.exit(f"ingest: {exc}")
    g, ari, a = report["groups"], report["ari_vs_true_boats"], report["annotations"]
    print(
        f"ingest: {report['counts']} images, {report['quarantined']} quarantined, "
        f"{len(report['refused_entries'])} archive entries refused, {g['n_groups']} boat groups"
        + (f", ARI vs true boats {ari:.3f}" if ari is not None else "")
    )
    print(
        f"ingest: {a['boxes']} boxes on {a['images_with_boxes']} training images"
        + (f" from {len(a['files'])} annotation files" if a["found"] else f" ({a['note']})")
        + f"; {a['unmatched']['count']} unmatched entries, {a['clipped']['count']} boxes clipped, "
        f"{a['off_frame']['count']} off the frame, {len(a['ignored_files'])} files ignored; "
        f"{report['solution_boxes']['boxes']} true test boxes"
    )


if __name__ == "__main__":
    main()
