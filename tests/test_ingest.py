"""The ingest stage on a tiny Kaggle-style download: real zip and 7z archives with Kaggle's names, planted
bad files and hostile entries; plus the demo source, the stop conditions, decoding and resizing, and the
download helper's instructions (no network)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core.competition import FISH_CLASSES
from pipeline.core.decode import decode_all, decode_bytes, fit_square, jpeg_header, reduction
from pipeline.core.manifest import COLUMNS as MANIFEST_COLUMNS
from pipeline.core.params import load
from pipeline.core.sources import IngestError
from pipeline.stages import ingest
from pipeline.tools.kaggle_auth import find_credentials
from tests.downloads import (
    boat_frame,
    boat_layout,
    jpeg,
    make_download,
    png,
    rect,
    sample_submission,
    sloth_entry,
    write_annotations,
    write_folder,
    write_zip,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def settings(source: str = "kaggle", workers: int = 2, **ingest_overrides) -> ingest.Settings:
    """The repository's settings with paths relative to the test's root, at the test image size."""
    s = load(ingest.Settings, REPO / "params.yaml")
    return dataclasses.replace(
        s,
        data=dataclasses.replace(s.data, source=source),
        ingest=dataclasses.replace(s.ingest, workers=workers, **ingest_overrides),
        model=dataclasses.replace(s.model, image_size=SIZE),
    )


def listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ the stage


def test_kaggle_archives_end_to_end(tmp_path):
    dl = make_download(tmp_path)
    before = listing(dl.kaggle_dir)
    s = settings()
    paths = s.paths
    report = ingest.run(s, root=tmp_path)

    manifest = pd.read_csv(
        tmp_path / paths.manifest, dtype={"label": str, "true_boat": str}, keep_default_na=False
    )
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    expected_train = {Path(k).name: k.split("/")[1] for k in dl.train}
    train = manifest[manifest.split == "train"]
    assert dict(zip(train.id, train.label, strict=True)) == expected_train  # every valid image, right class
    assert set(manifest[manifest.split == "test_stg1"].id) == {Path(k).name for k in dl.stg1}
    assert set(manifest[manifest.split == "test_stg2"].id) == set(dl.stg2)  # prefixed test_stg2/<name>
    assert (manifest[manifest.split != "train"].label == "").all() and (manifest.true_boat == "").all()
    assert manifest.id.is_unique and (manifest.group >= 0).all() and (manifest.burst >= 0).all()
    assert manifest.set_index("id").loc["img_00001.jpg", ["width", "height"]].tolist() == [160, 96]

    images = np.load(tmp_path / paths.images, mmap_mode="r")
    assert images.shape == (len(manifest), SIZE, SIZE, 3) and images.dtype == np.uint8
    grey_row = images[manifest.index[manifest.id == "img_00100.jpg"][0]]
    assert np.array_equal(grey_row[..., 0], grey_row[..., 1]) and np.array_equal(
        grey_row[..., 1], grey_row[..., 2]
    )
    assert report["converted"] == {"grey": 1, "alpha": 1}

    reasons = {
        Path(q["path"]).name if q["split"] != "test_stg2" else q["id"]: q["reason"]
        for q in report["quarantine"]
    }
    assert set(reasons) == set(dl.bad)
    for name, fragment in dl.bad.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert report["quarantined"] == len(dl.bad)
    assert report["quarantined_test_ids"] == ["test_stg2/image_00005.jpg"]

    refused = {r["entry"] for r in report["refused_entries"]}
    assert {"../evil.jpg", "train/ALB/img_00900.jpg", "../evil7z.jpg", "test_stg2/image_00900.jpg"} <= refused
    assert any(e.startswith("/") for e in refused) and len(refused) == 5
    for folder in (tmp_path, tmp_path.parent):
        for name in dl.evil_names:
            assert not list(folder.rglob(name) if folder == tmp_path else folder.glob(name)), (folder, name)
    assert not any(p.is_symlink() for p in (tmp_path / "data").rglob("*"))
    assert listing(dl.kaggle_dir) == before  # the raw download is never written
    assert (tmp_path / "data/interim/extracted/train/train/ALB/img_00001.jpg").is_file()

    s1 = pd.read_csv(tmp_path / paths.sample_stg1)
    s2 = pd.read_csv(tmp_path / paths.sample_stg2)
    assert list(s1.columns) == ["image", *FISH_CLASSES] and set(s1.image) == {Path(k).name for k in dl.stg1}
    assert set(s2.image) == set(s1.image) | set(dl.stg2) | {"test_stg2/image_00005.jpg"}
    assert (tmp_path / paths.solution).read_text().strip() == "image,label,stage"

    on_disk = json.loads((tmp_path / paths.reports / "ingest_report.json").read_text())
    assert on_disk["counts"] == {"train": len(dl.train), "test_stg1": 5, "test_stg2": 4}
    assert on_disk["duplicates"]["exact_train_test"]["pairs"] == 1
    assert on_disk["groups"]["n_groups"] >= 4 and on_disk["ari_vs_true_boats"] is None
    assert on_disk["ignored"]["count"] == 1
    assert (tmp_path / paths.figures / "groups.png").stat().st_size > 1000
    assert not list((tmp_path / "data").rglob(".*.tmp*")) and not list(
        (tmp_path / "data").rglob("*.decoding*")
    )


def test_mixed_folders_plain_csv_and_a_user_solution(tmp_path):
    dl = make_download(tmp_path, form="folders")
    # Mix: stage 1 as Kaggle's zip beside the other pieces as folders.
    (dl.kaggle_dir / "test_stg1").rename(tmp_path / "stg1_folder")
    write_zip(dl.kaggle_dir / "test_stg1.zip", dl.stg1)
    pd.DataFrame({"image": ["img_00300.jpg"], "label": ["ALB"], "stage": [1]}).to_csv(
        dl.kaggle_dir / "solution.csv", index=False
    )
    s = settings(workers=1)
    paths = s.paths
    report = ingest.run(s, root=tmp_path)
    assert report["counts"] == {"train": len(dl.train), "test_stg1": 5, "test_stg2": 4}
    assert report["inputs"]["train"] == "data/raw/kaggle/train"
    assert report["inputs"]["test_stg1"] == "data/raw/kaggle/test_stg1.zip"
    assert pd.read_csv(tmp_path / paths.solution).to_dict("list") == {
        "image": ["img_00300.jpg"],
        "label": ["ALB"],
        "stage": [1],
    }
    manifest = pd.read_csv(tmp_path / paths.manifest)
    assert manifest.path.iloc[0].startswith("data/raw/kaggle/train/")  # folders are read in place


def test_parallel_and_serial_decoding_agree(tmp_path):
    make_download(tmp_path, form="folders")
    paths = settings().paths
    out = {}
    for workers in (1, 2):
        ingest.run(settings(workers=workers), root=tmp_path)
        out[workers] = (np.load(tmp_path / paths.images), pd.read_csv(tmp_path / paths.manifest))
    assert np.array_equal(out[1][0], out[2][0])
    pd.testing.assert_frame_equal(out[1][1], out[2][1])


def make_demo(root: Path) -> Path:
    """A miniature of pipeline.demo's output: Kaggle's layout plus solution.csv and boats.csv."""
    demo = root / "data/raw/demo"
    rows, boats = [], []
    n = 0
    for boat, (w, h) in enumerate([(160, 96), (160, 96), (160, 120), (200, 120)]):
        for i in range(10):
            n += 1
            split = "test_stg2" if boat == 3 else ("test_stg1" if i >= 8 else "train")
            name = f"image_{n:05d}.jpg" if split == "test_stg2" else f"img_{n:05d}.jpg"
            label = FISH_CLASSES[(boat * 10 + i) % 8]
            rel = f"train/{label}/{name}" if split == "train" else f"{split}/{name}"
            write_folder(demo, {rel: jpeg(boat_frame(boat_layout(boat, w, h), n, night=i % 4 == 0))})
            image_id = f"test_stg2/{name}" if split == "test_stg2" else name
            boats.append({"image": image_id, "split": split, "boat": boat})
            if split != "train":
                rows.append({"image": image_id, "label": label, "stage": 2 if split == "test_stg2" else 1})
    sol = pd.DataFrame(rows)
    sol.to_csv(demo / "solution.csv", index=False)
    # The test fish's true boxes, one reaching past its 200 x 120 frame; and the community's files for two images.
    true_boxes = [("img_00009.jpg", 1, 10.0, 20.0, 30.0, 15.0),
                  ("test_stg2/image_00031.jpg", 2, 180.0, 100.0, 40.0, 30.0)]
    pd.DataFrame(true_boxes, columns=["image", "stage", "x", "y", "width", "height"]).to_csv(
        demo / "solution_boxes.csv", index=False)
    write_annotations(demo / "annotations", {"alb_labels.json": [sloth_entry("img_00001.jpg", rect(5, 6, 30, 20))],
                                             "bet_labels.json": [sloth_entry("img_00002.jpg")]})
    pd.DataFrame(boats).to_csv(demo / "boats.csv", index=False)
    sample_submission(sol.image[sol.stage == 1].tolist()).to_csv(demo / "sample_submission_stg1.csv", index=False)
    sample_submission(sol.image.tolist()).to_csv(demo / "sample_submission_stg2.csv", index=False)
    return demo


def test_demo_source_reports_group_agreement(tmp_path):
    demo = make_demo(tmp_path)
    s = settings(source="demo")
    paths = s.paths
    report = ingest.run(s, root=tmp_path)
    manifest = pd.read_csv(tmp_path / paths.manifest)
    assert len(manifest) == 40 and manifest.true_boat.notna().all()
    assert report["ari_vs_true_boats"] >= 0.8
    assert (
        report["groups"]["test_groups_seen_in_train"]["test_stg2"] == 0
    )  # the new boat is a group of its own
    for split in ("train", "test_stg1", "test_stg2"):  # bursts never span splits
        others = set(manifest.burst[manifest.split != split])
        assert not others & set(manifest.burst[manifest.split == split])
    assert set(report["bursts"]) == {"train", "test_stg1", "test_stg2"}
    assert (tmp_path / paths.solution).read_text() == (demo / "solution.csv").read_text()
    assert pd.read_csv(tmp_path / paths.solution_boxes).values.tolist() == [
        ["img_00009.jpg", 1, 10.0, 20.0, 30.0, 15.0], ["test_stg2/image_00031.jpg", 2, 180.0, 100.0, 20.0, 20.0]]
    assert report["solution_boxes"]["clipped"] == 1
    assert report["solution_boxes"]["file"] == "data/raw/demo/solution_boxes.csv"
    assert pd.read_csv(tmp_path / paths.boxes).values.tolist() == [
        ["img_00001.jpg", 5.0, 6.0, 30.0, 20.0, "rect", "alb_labels.json"]]
    assert report["annotations"]["folder"] == "data/raw/demo/annotations"
    assert report["annotations"]["empty_entries"]["count"] == 1


# ------------------------------------------------------------------------------------------ stop conditions


def _run(tmp_path, source="kaggle"):
    return ingest.run(settings(source=source, workers=1), root=tmp_path)


def test_missing_archive_says_what_where_and_how(tmp_path):
    dl = make_download(tmp_path)
    (dl.kaggle_dir / "test_stg2.7z").unlink()
    (dl.kaggle_dir / "sample_submission_stg1.csv.zip").unlink()
    with pytest.raises(IngestError) as err:
        _run(tmp_path)
    msg = str(err.value)
    assert "test_stg2.7z" in msg and "sample_submission_stg1.csv" in msg and "train.zip" not in msg
    assert str(dl.kaggle_dir.resolve()) in msg and "make download" in msg and "rules" in msg


def test_empty_kaggle_dir_and_missing_demo(tmp_path):
    (tmp_path / "data/raw/kaggle").mkdir(parents=True)
    with pytest.raises(IngestError, match="train.zip"):
        _run(tmp_path)
    with pytest.raises(IngestError, match="pipeline.demo"):
        _run(tmp_path, source="demo")


def test_unknown_class_folder_stops_and_names_it(tmp_path):
    dl = make_download(tmp_path, form="folders")
    write_folder(dl.kaggle_dir, {"train/TUNA/img_09999.jpg": jpeg(boat_frame(boat_layout(0, 160, 96), 1))})
    with pytest.raises(IngestError, match=r"unknown class folder.*TUNA.*data/raw/kaggle/train"):
        _run(tmp_path)


def test_missing_class_stops_and_names_it(tmp_path):
    dl = make_download(tmp_path, form="folders")
    for f in (dl.kaggle_dir / "train/LAG").iterdir():
        f.unlink()
    with pytest.raises(IngestError, match=r"\['LAG'\] missing or empty"):
        _run(tmp_path)


def test_class_with_only_bad_files_stops_after_writing_the_report(tmp_path):
    dl = make_download(tmp_path, form="folders")
    for f in (dl.kaggle_dir / "train/SHARK").iterdir():
        f.write_bytes(b"")
    with pytest.raises(IngestError, match=r"no valid training image left.*SHARK"):
        _run(tmp_path)
    report = json.loads((tmp_path / "reports/ingest_report.json").read_text())
    assert sum("SHARK" in q["path"] for q in report["quarantine"]) == 2


def test_empty_test_set_stops(tmp_path):
    dl = make_download(tmp_path, form="folders")
    for f in (dl.kaggle_dir / "test_stg1").iterdir():
        f.unlink()
    with pytest.raises(IngestError, match=r"test set .*test_stg1 is empty"):
        _run(tmp_path)


def test_sample_submission_that_does_not_match_the_test_images_stops(tmp_path):
    dl = make_download(tmp_path, form="folders")
    path = dl.kaggle_dir / "sample_submission_stg2.csv"
    sample = pd.read_csv(path)
    sample.iloc[1:].to_csv(path, index=False)  # one stage-1 row lost
    with pytest.raises(IngestError, match=r"sample_submission_stg2.csv does not match.*without a row"):
        _run(tmp_path)
    sample["image"] = sample["image"].str.replace("test_stg2/", "")  # stage-2 names without their prefix
    sample.to_csv(path, index=False)
    with pytest.raises(IngestError, match="sample_submission_stg2.csv"):
        _run(tmp_path)


def test_archive_cap_stops_the_run(tmp_path):
    make_download(tmp_path)
    s = settings(workers=1, max_archive_entries=10)
    with pytest.raises(Exception, match="max_archive_entries"):
        ingest.run(s, root=tmp_path)
    assert not (tmp_path / "data/interim/extracted/train").exists()


# ------------------------------------------------------------------------------------------ decoding


def test_decode_bytes_reasons_and_conversions():
    img = boat_frame(boat_layout(0, 160, 96), 1)
    good = jpeg(img)
    assert decode_bytes(b"")[2] == "empty file (0 bytes)"
    assert "truncated JPEG" in decode_bytes(good[:-300])[2]
    assert "not an image" in decode_bytes(b"hello world")[2]
    assert "corrupt png" in decode_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50 + b"IEND\xaeB`\x82")[2]
    assert "truncated PNG" in decode_bytes(png(img)[:-40])[2]
    rgb, note, reason, size = decode_bytes(good)
    assert reason is None and note == "" and rgb.shape == (96, 160, 3) and size == (160, 96)
    flat = np.zeros((16, 16, 3), np.uint8)
    flat[:] = (30, 120, 220)  # BGR, as cv2 writes it
    assert np.abs(decode_bytes(jpeg(flat))[0][8, 8].astype(int) - [220, 120, 30]).max() <= 3  # RGB order
    grey16 = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
    rgb, note, reason, _ = decode_bytes(png(grey16))
    assert reason is None and note == "16bit+grey" and rgb.shape == (96, 160, 3) and rgb.dtype == np.uint8


def test_large_jpegs_decode_at_reduced_scale_but_report_their_true_size():
    big = cv2.resize(boat_frame(boat_layout(0, 160, 96), 1), (1280, 720))
    data = jpeg(big)
    assert jpeg_header(data) == (1280, 720, 3)
    assert jpeg_header(jpeg(cv2.cvtColor(big, cv2.COLOR_BGR2GRAY))) == (1280, 720, 1)
    assert reduction(1280, 720, 96, "pad") == 8 and reduction(1280, 720, 224, "pad") == 4
    assert reduction(1280, 720, 224, "crop") == 2 and reduction(320, 240, 96, "pad") == 2
    rgb, note, reason, size = decode_bytes(data, 96, "pad")
    assert reason is None and size == (1280, 720) and rgb.shape == (90, 160, 3)
    full = decode_bytes(data)[0]
    a = fit_square(rgb, 96, "pad").astype(int)
    b = fit_square(full, 96, "pad").astype(int)
    assert np.abs(a - b).mean() < 3  # the cache looks the same either way
    rgb, note, _, _ = decode_bytes(jpeg(cv2.cvtColor(big, cv2.COLOR_BGR2GRAY)), 96, "pad")
    assert note == "grey" and rgb.shape[2] == 3


def test_fit_square_modes():
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, :50] = 200  # left half bright
    pad = fit_square(img, 20, "pad")
    assert pad.shape == (20, 20, 3)
    assert pad[:5].max() == 0 and pad[15:].max() == 0  # black bars above and below
    assert pad[10, 2, 0] == 200 and pad[10, 17, 0] == 0  # the whole width is kept
    crop = fit_square(img, 20, "crop")
    assert crop[10, 2, 0] == 200 and crop[10, 17, 0] == 0 and crop[0].max() == 200  # centre square, no bars
    stretch = fit_square(img, 20, "stretch")
    assert stretch[0, 2, 0] == 200 and stretch[0, 17, 0] == 0
    with pytest.raises(ValueError):
        fit_square(img, 20, "zoom")


def test_unreadable_file_is_quarantined_not_fatal(tmp_path):
    good = tmp_path / "a.jpg"
    good.write_bytes(jpeg(boat_frame(boat_layout(0, 160, 96), 1)))
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "b.jpg")  # a dangling link: open() fails
    res = list(decode_all([good, tmp_path / "b.jpg"], SIZE, "pad", 8, workers=2))
    assert res[0].reason is None and res[0].image.shape == (SIZE, SIZE, 3)
    assert res[1].reason.startswith("unreadable: FileNotFoundError")


# ------------------------------------------------------------------------------------------ entry points


def _project(tmp_path: Path, source: str) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = source
    params["model"]["image_size"] = SIZE
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def _command(name: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline <name>`, as dvc.yaml and a user run it."""
    base = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", name],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_main_runs_the_stage_and_fails_cleanly(tmp_path):
    dl = make_download(tmp_path)
    _project(tmp_path, "kaggle")
    ok = _command("ingest", tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "boat groups" in ok.stdout and "quarantined" in ok.stdout
    (dl.kaggle_dir / "train.zip").unlink()
    bad = _command("ingest", tmp_path)
    assert (
        bad.returncode != 0 and "ingest: the Kaggle download" in bad.stderr and "Traceback" not in bad.stderr
    )


def test_download_without_credentials_says_what_to_do(tmp_path):
    _project(tmp_path, "kaggle")
    res = _command("download", tmp_path)  # HOME is tmp_path: no ~/.kaggle, no KAGGLE_* variables
    assert res.returncode != 0
    for needle in ("kaggle.json", "chmod 600", "Create New Token", "rules", "data/raw/kaggle"):
        assert needle in res.stderr, needle
    assert not (tmp_path / "data").exists()


def test_find_credentials(tmp_path):
    assert find_credentials({}, tmp_path) is None
    assert find_credentials({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, tmp_path)
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle/kaggle.json").write_text("{}")
    assert find_credentials({}, tmp_path).endswith("kaggle.json")
    assert find_credentials({"KAGGLE_CONFIG_DIR": str(tmp_path / "elsewhere")}, tmp_path) is None
