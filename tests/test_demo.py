"""The generated stand-in for the Kaggle download: layout, names, shares, boats, determinism, learnability,
and the fish at the real cameras' scale with their boxes (the community's annotation files, the solution's)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.core.competition import ANNOTATION_FILES, FISH_CLASSES
from pipeline.core.metrics import kaggle_log_loss, prior_log_loss
from pipeline.core.params import Demo
from pipeline.generators import demo

TINY = Demo(n_train=48, n_test_stg1=12, n_test_stg2=16, train_boats=3, new_boats=2, width=96,
            night_share=0.25, burst=2.0, seed=7)
HEADER = "image,ALB,BET,DOL,LAG,NoF,OTHER,SHARK,YFT"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, demo.write_demo(TINY, out)


def test_same_seed_gives_byte_identical_files(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    demo.write_demo(TINY, again)
    assert _files(again) == _files(out)


def test_a_different_seed_draws_different_images(tiny, tmp_path):
    out, _ = tiny
    other = tmp_path / "other"
    demo.write_demo(dataclasses.replace(TINY, seed=TINY.seed + 1), other)
    first = {v for k, v in _files(out).items() if k.endswith(".jpg")}
    second = {v for k, v in _files(other).items() if k.endswith(".jpg")}
    assert not first & second


def test_exact_kaggle_layout(tiny):
    out, _ = tiny
    names = set(_files(out))
    csvs = {"sample_submission_stg1.csv", "sample_submission_stg2.csv", "solution.csv", "solution_boxes.csv",
            "boats.csv"}
    assert csvs <= names
    boxes = {n for n in names if n.startswith("annotations/")}
    assert boxes == {f"annotations/{f}" for f in ANNOTATION_FILES.values()}  # one per class with fish, no NoF
    images = names - csvs - boxes
    train = {n for n in images if n.startswith("train/")}
    stg1 = {n for n in images if n.startswith("test_stg1/")}
    stg2 = {n for n in images if n.startswith("test_stg2/")}
    assert train | stg1 | stg2 == images
    assert all(re.fullmatch(r"train/(ALB|BET|DOL|LAG|NoF|OTHER|SHARK|YFT)/img_\d{5}\.jpg", n) for n in train)
    assert all(re.fullmatch(r"test_stg1/img_\d{5}\.jpg", n) for n in stg1)
    assert all(re.fullmatch(r"test_stg2/image_\d{5}\.jpg", n) for n in stg2)
    assert (len(train), len(stg1), len(stg2)) == (TINY.n_train, TINY.n_test_stg1, TINY.n_test_stg2)
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(FISH_CLASSES)
    per_class = [len(list((out / "train" / c).iterdir())) for c in FISH_CLASSES]
    assert min(per_class) >= demo.MIN_TRAIN_PER_CLASS
    # One numbering for train and stage 1: a name never repeats across the two.
    bare = [Path(n).name for n in train | stg1]
    assert len(set(bare)) == len(bare)


def test_images_are_jpegs_in_their_boats_camera_size(tiny):
    out, rows = tiny
    sizes: dict[int, set] = {}
    for row in rows.itertuples():
        data = (out / row.path).read_bytes()
        assert data[:2] == b"\xff\xd8"
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape[1] == TINY.width and img.shape[2] == 3
        sizes.setdefault(row.boat, set()).add(img.shape)
    assert all(len(s) == 1 for s in sizes.values())  # a boat's camera never changes size


def test_sample_submissions_list_exactly_the_test_files_on_disk(tiny):
    out, _ = tiny
    on_disk1 = sorted(p.name for p in (out / "test_stg1").iterdir())
    on_disk2 = sorted(f"test_stg2/{p.name}" for p in (out / "test_stg2").iterdir())
    for name, expected in (("sample_submission_stg1.csv", on_disk1),
                           ("sample_submission_stg2.csv", on_disk1 + on_disk2)):
        text = (out / name).read_text()
        assert text.splitlines()[0] == HEADER
        sample = pd.read_csv(out / name)
        assert sorted(sample.image) == sorted(expected)
        assert np.all(sample[list(FISH_CLASSES)].to_numpy() == 0.125)


def test_solution_labels_every_test_image(tiny):
    out, rows = tiny
    solution = pd.read_csv(out / "solution.csv")
    assert list(solution.columns) == ["image", "label", "stage"]
    assert sorted(solution.image) == sorted(pd.read_csv(out / "sample_submission_stg2.csv").image)
    assert set(solution.label) <= set(FISH_CLASSES)
    assert (solution.stage == np.where(solution.image.str.startswith("test_stg2/"), 2, 1)).all()
    truth = rows.set_index("image").label
    assert (solution.set_index("image").label == truth.loc[solution.image]).all()


def test_boats_file_and_stage2_boats_are_new(tiny):
    out, rows = tiny
    boats = pd.read_csv(out / "boats.csv")
    assert list(boats.columns) == ["image", "split", "boat", "event"]
    assert sorted(boats.image) == sorted(rows.image) and boats.image.is_unique
    seen = set(boats.boat[boats.split != "test_stg2"])
    new = set(boats.boat[boats.split == "test_stg2"])
    assert seen == set(range(TINY.train_boats)) == set(boats.boat[boats.split == "train"])
    assert new and not seen & new


def test_class_shares_follow_the_real_training_set():
    real = plan_counts(Demo(3777, 1000, 12153, 6, 3, 320, 0.15, 3.0, 1), "train")
    assert real == demo.TRAIN_COUNTS
    small = plan_counts(Demo(400, 100, 200, 6, 3, 320, 0.15, 3.0, 1), "train")
    shares = {c: n / 400 for c, n in small.items()}
    assert min(small.values()) >= demo.MIN_TRAIN_PER_CLASS
    assert all(abs(shares[c] - demo.TRAIN_COUNTS[c] / 3777) < 0.01 for c in FISH_CLASSES)
    stage2 = plan_counts(Demo(400, 100, 1000, 6, 3, 320, 0.15, 3.0, 1), "test_stg2")
    assert stage2["BET"] == 108 and stage2["SHARK"] == 12
    assert stage2["ALB"] / stage2["YFT"] == pytest.approx(1719 / 734, rel=0.02)


def plan_counts(cfg: Demo, split: str) -> dict[str, int]:
    labels = demo.plan(cfg).query("split == @split").label
    return {c: int((labels == c).sum()) for c in FISH_CLASSES}


def test_names_do_not_reveal_class_or_split():
    rows = demo.plan(Demo(600, 200, 100, 6, 3, 320, 0.15, 3.0, 3))
    first = rows[rows.split != "test_stg2"]
    numbers = first.image.str.slice(4, 9).astype(int)
    assert numbers.is_unique
    classes = first.label.map(FISH_CLASSES.index)
    assert abs(np.corrcoef(numbers.rank(), classes.rank())[0, 1]) < 0.2
    train, stg1 = numbers[first.split == "train"], numbers[first.split == "test_stg1"]
    assert stg1.min() < train.median() < stg1.max()
    stg2 = rows[rows.split == "test_stg2"].image.str.slice(16, 21).astype(int)
    assert sorted(stg2) == list(range(1, 101))


def test_night_frames_follow_the_share_and_look_like_night_vision():
    rows = demo.plan(Demo(400, 100, 200, 6, 3, 320, 0.15, 3.0, 5))
    stage2 = rows.split == "test_stg2"
    assert abs(rows[~stage2].night.sum() - 0.15 * 500) <= 3  # whole bursts at a time
    assert abs(rows[stage2].night.sum() - 0.15 * 200) <= 3
    assert rows.groupby("event").night.nunique().max() == 1
    by_class = rows[~stage2].groupby("label").night.mean()
    assert by_class.between(0.05, 0.25).all(), by_class  # night says nothing about the fish
    boat = demo.draw_boat(demo.boat_rng(5, 0), 0, 128)
    night = demo.draw_scene(demo.event_rng(5, 0), demo.image_rng(5, 0), boat, "ALB", True).image.astype(float)
    day = demo.draw_scene(demo.event_rng(5, 0), demo.image_rng(5, 0), boat, "ALB", False).image.astype(float)
    r, g, b = night.reshape(-1, 3).mean(axis=0)
    assert g > 1.4 * r and g > 1.4 * b
    assert night[..., 1].std() < day.mean(axis=2).std()  # flatter than daylight
    r, g, b = day.reshape(-1, 3).mean(axis=0)
    assert g < 1.2 * min(r, b)


def test_bursts_are_runs_of_one_catch_on_one_boat_some_reaching_into_stage_1():
    rows = demo.plan(Demo(400, 100, 200, 6, 3, 320, 0.15, 3.0, 5))
    events = rows.groupby("event")
    assert events.boat.nunique().max() == 1 and events.label.nunique().max() == 1
    assert events.size().mean() == pytest.approx(3.0, rel=0.25)
    splits = events.split.agg(set)
    assert any(s == {"train", "test_stg1"} for s in splits)  # Kaggle's stage 1 held near-copies of train
    assert not any("test_stg2" in s and len(s) > 1 for s in splits)
    assert (demo.plan(Demo(400, 100, 200, 6, 3, 320, 0.15, 1.0, 5)).groupby("event").size() == 1).all()


def test_frames_of_one_burst_are_near_copies_and_other_catches_are_not():
    rows = demo.plan(Demo(120, 0, 0, 2, 0, 160, 0.0, 3.0, 9)).query("label != 'NoF'")
    boats = {b: demo.draw_boat(demo.boat_rng(9, b), b, 160) for b in (0, 1)}
    sizes = rows.groupby("event").size()
    first, second = rows[rows.event == sizes.index[sizes >= 2][0]].iloc[:2].itertuples()
    other = rows[(rows.boat == first.boat) & (rows.label == first.label) & (rows.event != first.event)].iloc[0]

    def frame(row) -> np.ndarray:
        return demo.draw_row(9, row, boats).image.astype(float)

    same, different = np.abs(frame(first) - frame(second)).mean(), np.abs(frame(first) - frame(other)).mean()
    assert 0 < same < 0.6 * different, (same, different)


def test_each_image_can_be_redrawn_alone(tiny):
    out, rows = tiny
    boats = {b: demo.draw_boat(demo.boat_rng(TINY.seed, b), b, TINY.width) for b in (0, TINY.train_boats)}
    for row in rows[rows.boat.isin(boats)].iloc[[0, -1]].itertuples():
        image = demo.draw_row(TINY.seed, row, boats).image
        assert demo.encode_jpeg(image) == (out / row.path).read_bytes()


def test_rewriting_removes_stale_files(tmp_path):
    out = tmp_path / "demo"
    (out / "train" / "ALB").mkdir(parents=True)
    (out / "train" / "ALB" / "img_99999.jpg").write_bytes(b"stale")
    demo.write_demo(TINY, out)
    assert not (out / "train" / "ALB" / "img_99999.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="n_train"):
        demo.plan(dataclasses.replace(TINY, n_train=20))
    with pytest.raises(ValueError, match="new_boats"):
        demo.plan(dataclasses.replace(TINY, new_boats=0))


def test_fish_cover_3_to_15_percent_of_the_width_and_differ_in_colour():
    width, height = 640, 360
    colour: dict[str, np.ndarray] = {}
    yellow: dict[str, float] = {}
    lengths: dict[str, list[float]] = {}
    for label in set(FISH_CLASSES) - {"NoF"}:
        pixels = []
        for k in range(8):
            rng = np.random.default_rng([11, k])
            img = np.zeros((height, width, 3), np.float32)
            fish = demo.place_fish(rng, img, label)
            mask = img.max(axis=2) > 0.02
            (_, (a, b), _) = cv2.minAreaRect(np.argwhere(mask)[:, ::-1].astype(np.float32))
            lengths.setdefault(label, []).append(max(a, b) / width)
            x, y, w, h = fish.box
            # The box is tight around the fish: grown by its anti-aliased rim, a pixel, it holds all of it.
            assert mask[int(y) - 1: int(y + h) + 1, int(x) - 1: int(x + w) + 1].sum() >= 0.99 * mask.sum()
            assert mask[int(y): int(y + h), int(x): int(x + w)].mean() > 0.15
            pixels.append(img[mask])
        fish_pixels = np.concatenate(pixels)
        colour[label] = fish_pixels.mean(axis=0)
        yellow[label] = float(np.mean((fish_pixels[:, 0] > 0.6) & (fish_pixels[:, 1] > 0.5)
                                      & (fish_pixels[:, 2] < 0.35)))
    every = np.concatenate(list(lengths.values()))
    assert every.min() >= 0.03 - 2 / width and every.max() <= 0.15 + 2 / width, (every.min(), every.max())
    assert np.mean(lengths["SHARK"]) > np.mean(lengths["LAG"]) + 0.03  # a blue shark is long, an opah round
    green_cast = {k: c[1] - c[2] for k, c in colour.items()}
    assert green_cast["DOL"] > green_cast["ALB"] + 0.1  # green-gold against the pale blue-silver tuna
    assert colour["LAG"][0] > colour["ALB"][0] + 0.1  # red fins, pink belly
    assert yellow["YFT"] > 3 * yellow["ALB"]  # the tunas part on fin colour
    assert np.ptp(colour["SHARK"]) < np.ptp(colour["DOL"])  # grey


@pytest.fixture(scope="module")
def drawn() -> list[tuple]:
    """150 fish frames of the default camera sizes at 320 px (rows and their frames): enough to see shares."""
    cfg = Demo(200, 0, 0, 4, 0, 320, 0.15, 3.0, 21)
    rows = demo.plan(cfg).query("label != 'NoF'").iloc[:150]
    boats = {b: demo.draw_boat(demo.boat_rng(cfg.seed, b), b, cfg.width) for b in range(cfg.train_boats)}
    return [(row, demo.draw_row(cfg.seed, row, boats)) for row in rows.itertuples()]


def test_frames_hold_one_fish_or_a_haul_some_across_the_edge(drawn):
    counts = np.array([len(frame.boxes) for _, frame in drawn])
    assert counts.min() >= 1 and 0.1 < np.mean(counts > 1) < 0.45, np.bincount(counts)
    assert all(len(f.boxes) <= demo.SEVERAL_FISH[row.label][1] for row, f in drawn)
    past = [((b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 0] + b[:, 2] > f.image.shape[1])
             | (b[:, 1] + b[:, 3] > f.image.shape[0])).any() for _, f in drawn for b in [f.boxes]]
    assert 0 < np.mean(past) < 0.2  # a few boxes reach past the frame, as in the real files
    for _, frame in drawn:  # every box holds a fish that is at least partly in the frame
        x, y, w, h = frame.boxes.T
        assert (x + w > 0).all() and (y + h > 0).all() and (x < frame.image.shape[1]).all()
        assert (y < frame.image.shape[0]).all() and (w >= 1).all() and (h >= 1).all()


def test_some_fish_are_partly_hidden_by_crew_or_gear_but_never_the_main_one_mostly(drawn):
    main = np.array([frame.visible[-1] for _, frame in drawn])
    assert main.min() >= demo.MIN_VISIBLE
    assert 0.15 < np.mean(main < 0.9) < 0.7, np.quantile(main, [0.1, 0.5])
    assert np.mean(main == 1.0) > 0.3  # most catches lie in plain view


def test_frames_of_one_burst_show_the_same_haul_a_little_moved(drawn):
    by_event: dict[int, list] = {}
    for row, frame in drawn:
        by_event.setdefault(row.event, []).append(frame)
    pairs = [(a, b) for frames in by_event.values() if len(frames) > 1 for a, b in [frames[:2]]]
    assert len(pairs) >= 10
    for a, b in pairs:
        assert len(a.boxes) == len(b.boxes)
        np.testing.assert_array_equal(a.boxes[:-1], b.boxes[:-1])  # the haul lies still...
        shift = np.abs(a.boxes[-1] - b.boxes[-1])[:2].max()
        assert shift < 0.5 * max(a.boxes[-1][2:]) + 2  # ...the fish in hand moves a little


def test_annotation_files_are_sloth_json_near_the_true_boxes(tiny):
    out, rows = tiny
    boats = {b: demo.draw_boat(demo.boat_rng(TINY.seed, b), b, TINY.width)
             for b in range(TINY.train_boats + TINY.new_boats)}
    train = rows[rows.split == "train"].set_index("image")
    seen = set()
    for label, name in ANNOTATION_FILES.items():
        entries = json.loads((out / "annotations" / name).read_text())
        names = [e["filename"] for e in entries]
        assert names == sorted(train.index[train.label == label])  # every training image of the class
        for entry in entries:
            assert entry["class"] == "image" and set(entry) == {"filename", "class", "annotations"}
            truth = demo.draw_row(TINY.seed, train.loc[[entry["filename"]]].reset_index().iloc[0], boats)
            rects = entry["annotations"]
            assert all(r["class"] == "rect" and isinstance(r["x"], float) and r["width"] > 0 for r in rects)
            if rects:
                assert len(rects) == len(demo._seen(truth))
                drawn_boxes = np.array([[r["x"], r["y"], r["width"], r["height"]] for r in rects])
                assert np.abs(drawn_boxes - demo._seen(truth)).max() <= 0.15 * truth.boxes[:, 2:].max() + 1
            seen.add(entry["filename"])
    assert seen == set(train.index[train.label != "NoF"])


def test_hand_drawn_boxes_stray_a_little_and_some_entries_are_empty():
    rng = np.random.default_rng(3)
    box = np.array([-3.0, 100.0, 60.0, 30.0])
    rects = [demo.hand_drawn(rng, box) for _ in range(400)]
    xs = np.array([r["x"] for r in rects])
    assert abs(xs.mean() - box[0]) < 0.5 and 0.5 < xs.std() < 2.5 and (xs < 0).mean() > 0.9
    assert all(r == json.loads(json.dumps(r)) and round(r["width"], 1) == r["width"] for r in rects)
    frames = {k: demo.Frame(np.empty(0, np.uint8), box[None], np.ones(1)) for k in range(600)}
    rows = pd.DataFrame({"key": range(600), "image": [f"img_{k:05d}.jpg" for k in range(600)], "split": "train",
                         "label": "ALB"})
    entries = demo.sloth_files(1, rows, frames)["alb_labels.json"]
    empty = np.mean([not e["annotations"] for e in entries])
    assert 0.005 < empty < 0.05  # EMPTY_ENTRY_SHARE, 2%


def test_solution_boxes_hold_the_true_boxes_of_the_test_fish(tiny):
    out, rows = tiny
    boxes = pd.read_csv(out / "solution_boxes.csv")
    assert list(boxes.columns) == ["image", "stage", "x", "y", "width", "height"]
    solution = pd.read_csv(out / "solution.csv").set_index("image")
    fish = set(solution.index[solution.label != "NoF"])
    assert set(boxes.image) == fish  # every test frame with fish has a box, no empty frame has one
    assert (boxes.stage == solution.stage.loc[boxes.image].to_numpy()).all()
    assert (boxes.width > 0).all() and (boxes.height > 0).all()
    boats = {b: demo.draw_boat(demo.boat_rng(TINY.seed, b), b, TINY.width)
             for b in range(TINY.train_boats + TINY.new_boats)}
    for image in boxes.image.unique()[:3]:
        truth = demo._seen(demo.draw_row(TINY.seed, rows[rows.image == image].iloc[0], boats))
        mine = boxes.loc[boxes.image == image, ["x", "y", "width", "height"]].to_numpy()
        np.testing.assert_allclose(mine, truth[np.lexsort((truth[:, 1], truth[:, 0]))])  # sorted by x, then y


def _hue_histogram(img: np.ndarray) -> np.ndarray:
    """Hue x saturation histogram of the coloured pixels of a 96 px resize; grey deck pixels left out."""
    small = cv2.resize(img, (96, 96), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [18, 4], [0, 180, 0, 256]).reshape(18, 4)[:, 1:]
    return np.sqrt(hist.ravel() / (96 * 96))


def _grouped_log_loss(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    oof = np.full((len(y), len(FISH_CLASSES)), 1e-3)
    for fit, held in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(X, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.03, max_iter=2000)).fit(X[fit], y[fit])
        oof[np.ix_(held, model.classes_)] = model.predict_proba(X[held])
    return kaggle_log_loss(y, oof)


def test_the_fish_box_holds_the_signal_the_whole_frame_dilutes():
    """Colour histograms across unseen boats: of the whole frame they barely beat the prior; of the main
    fish's box (the whole frame for NoF) they do far better. What the competition's winners found."""
    cfg = Demo(300, 0, 0, 6, 0, 320, 0.15, 3.0, 2017)
    rows = demo.plan(cfg)
    boats = {b: demo.draw_boat(demo.boat_rng(cfg.seed, b), b, cfg.width) for b in range(cfg.train_boats)}
    whole, crops = [], []
    for row in rows.itertuples():
        frame = demo.draw_row(cfg.seed, row, boats)
        whole.append(_hue_histogram(frame.image))
        if len(frame.boxes):
            x, y, w, h = frame.boxes[-1]
            x0, y0 = int(max(x, 0)), int(max(y, 0))
            crops.append(_hue_histogram(frame.image[y0: int(y + h), x0: int(x + w)]))
        else:
            crops.append(whole[-1])
    y = rows.label.map(FISH_CLASSES.index).to_numpy()
    frame_loss = _grouped_log_loss(np.stack(whole), y, rows.boat.to_numpy())
    crop_loss = _grouped_log_loss(np.stack(crops), y, rows.boat.to_numpy())
    prior = prior_log_loss(y, y, len(FISH_CLASSES))
    assert frame_loss > 1.1, frame_loss  # the fish is a few per cent of the frame
    assert crop_loss < frame_loss - 0.25 and crop_loss < prior - 0.4, (crop_loss, frame_loss, prior)
    assert crop_loss > 0.5, crop_loss  # night frames, hidden fish and look-alike tunas keep it hard


def test_main_writes_the_configured_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text(
        "data:\n  source: demo\n  demo_dir: raw/demo\n  kaggle_dir: raw/kaggle\n  annotations_dir: annotations\n"
        "demo:\n  n_train: 40\n  n_test_stg1: 4\n  n_test_stg2: 4\n  train_boats: 2\n  new_boats: 1\n"
        "  width: 64\n  night_share: 0.1\n  burst: 2.0\n  seed: 1\n"
    )
    monkeypatch.chdir(tmp_path)
    demo.main([])
    assert len(pd.read_csv(tmp_path / "raw/demo/sample_submission_stg2.csv")) == 8
    assert len(list((tmp_path / "raw/demo/train").rglob("*.jpg"))) == 40
    assert len(list((tmp_path / "raw/demo/annotations").glob("*_labels.json"))) == 7
    assert "demo: wrote 40 train" in capsys.readouterr().out
