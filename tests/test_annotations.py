"""The community's box files as users have them: Sloth JSON with rectangles or head/tail points, folder paths
in file names, boxes off the frame, unknown names, a NoF file, broken JSON; read into one clipped table of
boxes, with a report that says what became of each."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import annotations as ann
from pipeline.core.competition import ANNOTATION_FILES
from pipeline.core.params import load
from pipeline.core.sources import IngestError
from pipeline.stages import ingest
from tests.downloads import (
    make_download,
    plant_annotations,
    point,
    rect,
    sloth_entry,
    write_annotations,
)

REPO = Path(__file__).resolve().parents[1]


def settings(source: str = "kaggle") -> ingest.Settings:
    s = load(ingest.Settings, REPO / "params.yaml")
    return dataclasses.replace(s, data=dataclasses.replace(s.data, source=source),
                               ingest=dataclasses.replace(s.ingest, workers=1),
                               model=dataclasses.replace(s.model, image_size=32))


def manifest(rows: list[tuple]) -> pd.DataFrame:
    """A manifest of (id, split, label, width, height) rows: all that matching boxes reads."""
    return pd.DataFrame(rows, columns=["id", "split", "label", "width", "height"])


# ------------------------------------------------------------------------------------------ pieces


def test_file_names_lose_their_folders_posix_or_windows():
    assert ann.base_name("img_00003.jpg") == "img_00003.jpg"
    assert ann.base_name("../input/train/ALB/img_00003.jpg") == "img_00003.jpg"
    assert ann.base_name("C:\\Users\\me\\fish\\img_00003.jpg") == "img_00003.jpg"


def test_class_files_are_recognised_whatever_their_case():
    assert ann.class_of_file("alb_labels.json") == "ALB" and ann.class_of_file("YFT_labels.json") == "YFT"
    assert ann.class_of_file("NoF_labels.json") == "NoF" and ann.class_of_file("nof_labels.json") == "NoF"
    assert ann.class_of_file("tuna_labels.json") is None and ann.class_of_file("alb.json") is None
    assert set(ANNOTATION_FILES) == {"ALB", "BET", "DOL", "LAG", "OTHER", "SHARK", "YFT"}


def test_a_head_and_tail_pair_becomes_the_box_of_a_band_around_the_fish():
    x, y, w, h = ann.points_to_box((100, 50), (60, 50))  # lying flat, head right, 40 px long
    assert (x, y, w, h) == pytest.approx((58, 44, 44, 12))  # 5% past each end, 15% of its length each side
    assert ann.points_to_box((20, 60), (20, 100)) == pytest.approx((14, 58, 12, 44))  # upright
    head, tail = (130.0, 40.0), (70.0, 100.0)  # diagonal: the box holds both ends and is near square
    x, y, w, h = ann.points_to_box(head, tail)
    for px, py in (head, tail):
        assert x < px < x + w and y < py < y + h
    assert w == pytest.approx(h)


def test_boxes_are_clipped_to_the_frame_or_dropped_when_nothing_is_left():
    assert ann.clip_box((10.0, 20.0, 30.0, 15.0), 160, 96) == (10.0, 20.0, 30.0, 15.0)
    assert ann.clip_box((-5.5, 40.0, 20.0, 10.0), 160, 96) == pytest.approx((0, 40, 14.5, 10))
    assert ann.clip_box((150.0, 80.0, 20.0, 30.0), 160, 96) == pytest.approx((150, 80, 10, 16))
    assert ann.clip_box((500.0, 10.0, 20.0, 20.0), 160, 96) is None
    assert ann.clip_box((159.5, 10.0, 20.0, 20.0), 160, 96) is None  # half a pixel left: nothing to crop


def test_broken_json_names_the_file_and_the_place(tmp_path):
    path = tmp_path / "shark_labels.json"
    path.write_text('[\n {"filename": "img_00013.jpg",\n  "annotations": [\n')
    with pytest.raises(ann.AnnotationError, match=r"shark_labels.json: not valid JSON: .* at line 4 column 1"):
        ann.read_sloth(path)
    path.write_text('{"filename": "img_00013.jpg"}')
    with pytest.raises(ann.AnnotationError, match=r"shark_labels.json: expected a JSON list .* found a JSON object"):
        ann.read_sloth(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([sloth_entry("img_00013.jpg")]).encode())  # a Windows BOM
    assert ann.read_sloth(path) == [sloth_entry("img_00013.jpg")]
    path.write_bytes(b"[\xff\xfe]")
    with pytest.raises(ann.AnnotationError, match="shark_labels.json: not UTF-8"):
        ann.read_sloth(path)


# ------------------------------------------------------------------------------------------ matching


def test_planted_folder_gives_the_right_boxes_and_says_what_became_of_each_defect(tmp_path):
    planted = plant_annotations(tmp_path)
    frame = manifest([("img_00001.jpg", "train", "ALB", 160, 96), ("img_00002.jpg", "train", "ALB", 160, 96),
                      ("img_00003.jpg", "train", "BET", 160, 96), ("img_00004.jpg", "train", "BET", 160, 96),
                      ("img_00009.jpg", "train", "NoF", 160, 96), ("img_00015.jpg", "train", "YFT", 160, 96),
                      ("img_00016.jpg", "train", "YFT", 160, 120), ("img_00300.jpg", "test_stg1", "", 160, 96)])
    boxes, report = ann.match(ann.load_folder(planted.folder), frame, {"img_00200.jpg"})
    pd.testing.assert_frame_equal(boxes, planted.boxes)
    check_report(report, planted)


def check_report(report: dict, planted) -> None:
    """What the report must say about `plant_annotations`' folder (shared with the ingest test below)."""
    assert report["found"] and report["boxes"] == 8 and report["images_with_boxes"] == 5
    assert {f["file"]: (f["format"], f["boxes"]) for f in report["files"]} == {
        "alb_labels.json": ("rect", 5), "bet_labels.json": ("rect", 1), "yft_labels.json": ("point", 2)}
    ignored = {i["file"]: i["reason"] for i in report["ignored_files"]}
    assert set(ignored) == set(planted.ignored)
    for name, fragment in planted.ignored.items():
        assert fragment in ignored[name], ignored[name]
    unmatched = {u["filename"]: u["reason"] for u in report["unmatched"]["examples"]}
    assert report["unmatched"]["count"] == 3 and set(unmatched) == set(planted.unmatched)
    for name, fragment in planted.unmatched.items():
        assert fragment in unmatched[name], unmatched[name]
    assert report["off_frame"]["count"] == 1 and report["off_frame"]["examples"][0]["box"] == [500, 10, 20, 20]
    assert report["clipped"]["count"] == 3
    assert {c["clipped_to"][0] for c in report["clipped"]["examples"]} == {0.0, 100.0, 150.0}
    mismatch = {m["id"]: m for m in report["class_mismatch"]["examples"]}
    assert report["class_mismatch"]["count"] == 2
    assert mismatch["img_00003.jpg"]["folder_class"] == "BET" and "kept" in mismatch["img_00003.jpg"]["action"]
    assert "dropped" in mismatch["img_00009.jpg"]["action"]
    assert report["empty_entries"]["count"] == 1
    assert report["empty_entries"]["examples"][0]["filename"] == "img_00004.jpg"
    assert report["duplicates"]["count"] == 1
    assert report["invalid_records"]["count"] == 2 and report["invalid_entries"]["count"] == 1
    assert "polygon" in report["invalid_records"]["examples"][0]["reason"]
    points = report["points"]
    assert (points["records"], points["boxes"]) == (5, 2)  # two pairs and a dummy point (the dummy record: skipped)
    assert points["dummy_points"]["count"] == 1 and points["dummy_entries"]["count"] == 1
    assert points["half_depth"] == ann.POINT_HALF_DEPTH and points["end_margin"] == ann.POINT_END_MARGIN
    without = report["train_images_without_boxes"]
    assert without["by_class"]["NoF"] >= 1 and without["by_class"]["BET"] >= 1  # img_00004: an empty entry


def test_without_a_folder_there_are_no_boxes_and_the_report_says_why(tmp_path):
    frame = manifest([("img_00001.jpg", "train", "ALB", 160, 96)])
    boxes, report = ann.match(ann.load_folder(tmp_path / "nowhere"), frame)
    assert list(boxes.columns) == list(ann.BOX_COLUMNS) and boxes.empty
    assert not report["found"] and "no annotation folder" in report["note"]
    assert report["train_images_without_boxes"]["count"] == 1


def test_the_same_boxes_come_out_in_the_same_order_whatever_the_file_order(tmp_path):
    frame = manifest([("img_00001.jpg", "train", "ALB", 160, 96), ("img_00002.jpg", "train", "ALB", 160, 96)])
    entries = [sloth_entry("img_00002.jpg", rect(9, 9, 9, 9)), sloth_entry("img_00001.jpg", rect(5, 5, 5, 5)),
               sloth_entry("img_00001.jpg", rect(1, 1, 5, 5))]
    one = ann.match(ann.load_folder(write_annotations(tmp_path / "a", {"alb_labels.json": entries})), frame)[0]
    two = ann.match(ann.load_folder(write_annotations(tmp_path / "b", {"alb_labels.json": entries[::-1]})), frame)[0]
    pd.testing.assert_frame_equal(one, two)
    assert one.id.tolist() == ["img_00001.jpg", "img_00001.jpg", "img_00002.jpg"] and one.x.tolist() == [1, 5, 9]


def test_point_files_from_generated_fish_give_boxes_close_to_the_drawn_ones(tmp_path):
    """Head and tail points of fish lying every way; the converted boxes hold the true ones' middles."""
    rng = np.random.default_rng(0)
    entries, truth, rows = [], [], []
    for k in range(40):
        length, angle = rng.uniform(40, 120), rng.uniform(0, 2 * np.pi)
        centre = rng.uniform(150, 450, 2)
        half = 0.5 * length * np.array([np.cos(angle), np.sin(angle)])
        head, tail = centre + half, centre - half
        name = f"img_{k:05d}.jpg"
        entries.append(sloth_entry(name, point(*map(float, head)), point(*map(float, tail))))
        truth.append(centre)
        rows.append((name, "train", "ALB", 640, 600))
    boxes, report = ann.match(ann.load_folder(write_annotations(tmp_path, {"alb_labels.json": entries})),
                              manifest(rows))
    assert report["points"]["boxes"] == 40 and (boxes.kind == "point").all()
    middles = boxes[["x", "y"]].to_numpy() + boxes[["width", "height"]].to_numpy() / 2
    np.testing.assert_allclose(middles, np.array(truth), atol=2e-3)  # the table keeps 3 decimals


# ------------------------------------------------------------------------------------------ the stage


def test_ingest_reads_a_planted_folder_beside_the_kaggle_download(tmp_path):
    dl = make_download(tmp_path, form="folders")
    planted = plant_annotations(dl.kaggle_dir)
    s = settings()
    report = ingest.run(s, root=tmp_path)
    boxes = pd.read_csv(tmp_path / s.paths.boxes)
    pd.testing.assert_frame_equal(boxes, planted.boxes, check_dtype=False)
    check_report(report["annotations"], planted)
    assert report["annotations"]["folder"] == "data/raw/kaggle/annotations"
    on_disk = json.loads((tmp_path / s.paths.reports / "ingest_report.json").read_text())
    assert on_disk["annotations"] == report["annotations"]
    assert (tmp_path / s.paths.solution_boxes).read_text().strip() == "image,stage,x,y,width,height"
    assert report["solution_boxes"] == {"file": None, "boxes": 0}


def test_broken_json_stops_ingest_before_decoding_and_names_the_file(tmp_path):
    dl = make_download(tmp_path, form="folders")
    write_annotations(dl.kaggle_dir / "annotations", {"alb_labels.json": [sloth_entry("img_00001.jpg")],
                                                      "lag_labels.json": '[{"filename": "img_00007.jpg",, }]'})
    s = settings()
    with pytest.raises(IngestError, match=r"annotations/lag_labels.json: not valid JSON: .* line 1 column 31"):
        ingest.run(s, root=tmp_path)
    assert not (tmp_path / s.paths.images).exists()  # failed in seconds, not after decoding


def test_kaggle_download_without_annotations_gives_an_empty_table(tmp_path):
    make_download(tmp_path, form="folders")
    s = settings()
    report = ingest.run(s, root=tmp_path)
    assert (tmp_path / s.paths.boxes).read_text().strip() == ",".join(ann.BOX_COLUMNS)
    assert not report["annotations"]["found"] and "no annotation folder" in report["annotations"]["note"]


def test_solution_boxes_are_clipped_and_unknown_images_dropped(tmp_path):
    frame = manifest([("img_00001.jpg", "train", "ALB", 160, 96), ("img_00300.jpg", "test_stg1", "", 160, 96),
                      ("test_stg2/image_00001.jpg", "test_stg2", "", 200, 120)])
    path = tmp_path / "solution_boxes.csv"
    rows = [("test_stg2/image_00001.jpg", 2, 190.0, 10.0, 20.0, 20.0), ("img_00300.jpg", 1, -4.0, 3.0, 10.0, 10.0),
            ("img_00300.jpg", 1, 300.0, 3.0, 10.0, 10.0), ("img_77777.jpg", 1, 1.0, 1.0, 5.0, 5.0)]
    pd.DataFrame(rows, columns=list(ann.SOLUTION_BOX_COLUMNS)).to_csv(path, index=False)
    boxes, report = ann.read_solution_boxes(path, frame)
    assert boxes.values.tolist() == [["img_00300.jpg", 1, 0.0, 3.0, 6.0, 10.0],
                                     ["test_stg2/image_00001.jpg", 2, 190.0, 10.0, 10.0, 20.0]]
    assert report["clipped"] == 2 and report["off_frame"]["count"] == 1
    assert report["unmatched"] == {"count": 1, "examples": ["img_77777.jpg"]}
    path.write_text("image,x,y\nimg_00300.jpg,1,2\n")
    with pytest.raises(ann.AnnotationError, match=r"solution_boxes.csv lacks column\(s\) \['stage', 'width'"):
        ann.read_solution_boxes(path, frame)
