"""Finding the fish and cutting its crop: the localiser's geometry, targets, decoding and flips, that it learns
to find a fish at all, the scores the localise stage reports, and the crops cut around its boxes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import crops, localiser
from pipeline.core.localiser import STRIDE, Detection, Letterbox
from pipeline.stages import crops as crops_stage
from pipeline.stages import localise

IN_W, IN_H = 64, 48


def as_maps(target: np.ndarray) -> np.ndarray:
    """A training target read as if the net had output it exactly (the five output channels)."""
    return target[..., :5]


# ------------------------------------------------------------------------------------------ geometry


def test_letterbox_places_a_wide_frame_centred_and_boxes_go_there_and_back():
    place = Letterbox.fit(640, 360, 224, 128)
    assert place.scale == pytest.approx(0.35) and (place.width, place.height) == (224, 126)
    assert (place.left, place.top) == (0, 1)
    boxes = np.array([[100.0, 50.0, 40.0, 20.0], [0.0, 0.0, 640.0, 360.0]])
    np.testing.assert_allclose(place.to_frame(place.to_input(boxes)), boxes)
    frame = np.full((360, 640, 3), 200, np.uint8)
    boxed = localiser.letterbox(frame, 224, 128)
    assert boxed.shape == (128, 224, 3)
    assert not boxed[0].any() and boxed[1:127].min() == 200 and not boxed[127].any()  # black bars, frame between


def test_iou_matches_hand_computed_overlaps():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 10, 10], [20, 20, 5, 5], [2, 2, 5, 5]])
    np.testing.assert_allclose(localiser.iou(a, b)[0], [1.0, 50 / 150, 0.0, 25 / 100])
    assert localiser.iou(a, np.zeros((0, 4))).shape == (1, 0)


# ------------------------------------------------------------------------------------ targets, decoding


@pytest.mark.parametrize("box", [(10.0, 8.0, 14.0, 6.0), (31.5, 20.2, 9.0, 17.0), (0.0, 0.0, 6.0, 4.0)])
def test_a_perfect_output_decodes_to_the_true_box(box):
    target = localiser.encode(np.array([box]), IN_W, IN_H)
    assert target.shape == (IN_H // STRIDE, IN_W // STRIDE, 6)
    det = localiser.decode(as_maps(target), Letterbox(1.0, 0, 0, IN_W, IN_H), IN_W, IN_H)
    assert det.confidence == 1.0
    np.testing.assert_allclose([det.x, det.y, det.width, det.height], box, atol=1e-4)


def test_a_peak_one_cell_off_still_reads_the_box_it_was_trained_on():
    """Dense regression: the cells next to a centre learn its box too, so a peak one cell off decodes to the
    same box, not to the untrained output of an empty cell."""
    box = (20.0, 16.0, 18.0, 10.0)
    target = localiser.encode(np.array([box]), IN_W, IN_H)
    i, j = np.unravel_index(int(np.argmax(target[..., 0])), target.shape[:2])
    maps = as_maps(target).copy()
    maps[i, j, 0], maps[i, j + 1, 0] = 0.5, 0.9  # the net's peak lands one cell right of the centre
    det = localiser.decode(maps, Letterbox(1.0, 0, 0, IN_W, IN_H), IN_W, IN_H)
    np.testing.assert_allclose([det.x, det.y, det.width, det.height], box, atol=1e-4)
    assert det.confidence == pytest.approx(0.9)


def test_the_cells_around_the_peak_vote_and_outvote_one_cell_that_is_off():
    """The 3 x 3 cells around a centre all learnt its box; one of them wrong (here the peak's own size, 40% too
    large) moves the decoded box by a fraction of its error, not by all of it."""
    box = (20.0, 16.0, 18.0, 10.0)
    maps = as_maps(localiser.encode(np.array([box]), IN_W, IN_H)).copy()
    i, j = np.unravel_index(int(np.argmax(maps[..., 0])), maps.shape[:2])
    maps[i, j, 3:5] += np.log(1.4)
    det = localiser.decode(maps, Letterbox(1.0, 0, 0, IN_W, IN_H), IN_W, IN_H)
    assert box[2] < det.width < box[2] * 1.2 and box[3] < det.height < box[3] * 1.2
    assert det.confidence == 1.0


def test_a_neighbouring_fishs_cells_do_not_vote_for_the_peaks_box():
    """Two fish two cells apart: the cells between them point at the other fish, so they are left out of the
    vote, and each peak still decodes to exactly its own box."""
    boxes = np.array([[10.0, 14.0, 12.0, 8.0], [18.0, 14.0, 14.0, 10.0]])
    target = localiser.encode(boxes, IN_W, IN_H)
    place = Letterbox(1.0, 0, 0, IN_W, IN_H)
    for keep, box in enumerate(boxes):
        maps = as_maps(target).copy()
        cx, cy = (boxes[1 - keep, :2] + boxes[1 - keep, 2:] / 2) / STRIDE
        maps[int(cy), int(cx), 0] = 0.0  # only this fish's peak is left
        det = localiser.decode(maps, place, IN_W, IN_H)
        np.testing.assert_allclose([det.x, det.y, det.width, det.height], box, atol=1e-4)


def test_all_zero_maps_still_decode_to_a_finite_box():
    det = localiser.decode(np.zeros((IN_H // STRIDE, IN_W // STRIDE, 5)), Letterbox(1.0, 0, 0, IN_W, IN_H), IN_W, IN_H)
    assert np.isfinite([det.x, det.y, det.width, det.height]).all() and det.confidence == 0.0


def test_a_frame_without_fish_has_an_all_zero_target():
    assert not localiser.encode(np.zeros((0, 4)), IN_W, IN_H).any()


def test_each_of_two_fish_keeps_its_own_box():
    boxes = np.array([[4.0, 4.0, 10.0, 8.0], [40.0, 28.0, 16.0, 12.0]])
    target = localiser.encode(boxes, IN_W, IN_H)
    assert int((target[..., 0] == 1.0).sum()) == 2
    place = Letterbox(1.0, 0, 0, IN_W, IN_H)
    for box in boxes:
        maps = as_maps(target).copy()
        far = localiser.iou(boxes, box[None])[:, 0] == 0  # hide the other fish's peak
        for other in boxes[far]:
            cx, cy = (other[:2] + other[2:] / 2) / STRIDE
            maps[int(cy), int(cx), 0] = 0.0
        det = localiser.decode(maps, place, IN_W, IN_H)
        np.testing.assert_allclose([det.x, det.y, det.width, det.height], box, atol=1e-4)


def test_the_maps_of_a_mirrored_frame_flip_back_to_the_frames_own_box():
    box = np.array([[9.0, 11.0, 13.0, 7.0]])
    mirrored = box.copy()
    mirrored[:, 0] = IN_W - box[:, 0] - box[:, 2]
    maps = localiser.flip_maps(as_maps(localiser.encode(mirrored, IN_W, IN_H)))
    det = localiser.decode(maps, Letterbox(1.0, 0, 0, IN_W, IN_H), IN_W, IN_H)
    np.testing.assert_allclose([det.x, det.y, det.width, det.height], box[0], atol=1e-4)


def test_the_loss_is_lowest_for_the_target_itself():
    target = localiser.encode(np.array([[20.0, 16.0, 18.0, 10.0]]), IN_W, IN_H)[None]
    exact = np.concatenate([np.clip(target[..., :1], 1e-4, 1 - 1e-4), target[..., 1:5]], -1)
    wrong_size = exact.copy()
    wrong_size[..., 3:5] += 0.5
    blind = exact.copy()
    blind[..., 0] = 0.01
    losses = [float(localiser.centernet_loss(target, m)) for m in (exact, wrong_size, blind)]
    # Sizes 0.5 off in log space on both sides cost exactly that on each of the two size channels.
    assert losses[1] - losses[0] == pytest.approx(2 * 0.5 * localiser.SIZE_WEIGHT, rel=1e-4)
    assert losses[2] > losses[0] + 1  # missing the fish costs far more than the Gaussian's own focal term


def test_input_sides_that_the_net_cannot_halve_four_times_are_refused():
    with pytest.raises(ValueError, match="multiples of 16"):
        localiser.build_localiser(72, 48)


def scenes(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Grey noisy frames with one bright elongated 'fish' each, of random size and place, and its box."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(60, 110, (n, IN_H, IN_W, 3)).astype(np.uint8)
    boxes = []
    for k in range(n):
        w, h = rng.integers(8, 18), rng.integers(5, 10)
        x, y = rng.integers(0, IN_W - w), rng.integers(0, IN_H - h)
        frames[k, y : y + h, x : x + w] = (230, 220, 90)
        boxes.append(np.array([[x, y, w, h]], dtype=np.float64))
    return frames, boxes


def test_the_localiser_learns_to_find_a_fish_on_frames_it_never_saw():
    """Trained on crops of 96 tiny scenes, it must box most held-out whole fish (a net that learnt nothing
    scores ~0): the crops, their targets and the copy of the weights into a whole-frame net all have to agree."""
    import albumentations as A

    frames, boxes = scenes(128, seed=0)
    model = localiser.fit_localiser(frames, boxes, np.arange(96), channels=8, steps=160, batch_size=16,
                                    crop_width=48, crop_height=32, scale_jitter=0.2, positive_share=0.7, views=1,
                                    learning_rate=0.01, policy=A.Compose([]), seed=0)
    assert model.input_shape == (None, IN_H, IN_W, 3)  # it boxes whole frames, though it trained on crops
    maps = localiser.predict_maps(model, frames[96:])
    place = Letterbox(1.0, 0, 0, IN_W, IN_H)
    scores = localise.box_scores([localiser.decode(m, place, IN_W, IN_H) for m in maps], boxes[96:])
    assert scores["n_images"] == 32
    assert scores["share_iou_50"] >= 0.6, scores


def bright_box(crop: np.ndarray) -> np.ndarray:
    """x, y, width, height of the bright pixels of a crop (the planted fish)."""
    ys, xs = np.nonzero(crop[..., 0] > 170)
    return np.array([xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()], dtype=np.float64)


def test_a_training_crop_moves_scales_and_flips_its_box_with_its_pixels():
    """Wherever a crop is cut, however it is rescaled and flipped, the box it returns is where the fish's pixels
    are: a box that drifted from its fish would teach the net to miss by that much."""
    frames, boxes = scenes(1, seed=3)
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(60):
        crop, out = localiser.draw_crop(frames[0], boxes[0], rng, 40, 32, scale_jitter=0.4, positive_share=1.0)
        assert crop.shape == (32, 40, 3) and crop.dtype == np.uint8
        assert len(out) == 1  # every crop is centred near the only fish: its centre is inside
        drawn = bright_box(crop)
        inner = (out[0, :2] > 1).all() and (out[0, :2] + out[0, 2:] < [39, 31]).all()
        if inner:  # a fish cut by the crop's edge has pixels only on one side of it
            np.testing.assert_allclose(drawn, out[0], atol=1.5)
            seen += 1
    assert seen > 20


def test_crops_away_from_fish_hold_no_centres_and_views_keep_the_frame_itself():
    frames, boxes = scenes(2, seed=4)
    rng = np.random.default_rng(1)
    for _ in range(20):
        crop, out = localiser.draw_crop(frames[0], np.zeros((0, 4)), rng, 32, 32, 0.3, 1.0)
        assert out.shape == (0, 4) and crop.shape == (32, 32, 3)  # no fish: a background crop, no centres
    import albumentations as A

    views = localiser.photometric_views(frames, A.Compose([A.InvertImg(p=1.0)]), 3, seed=0)
    assert views.shape == (3, *frames.shape)
    np.testing.assert_array_equal(views[0], frames)
    np.testing.assert_array_equal(views[1], 255 - frames)


def test_crop_batches_are_repeatable_by_index_and_differ_between_indices():
    frames, boxes = scenes(8, seed=5)
    make = lambda: localiser.CropBatches(frames[None], boxes, np.arange(8), batch_size=4, steps=3, crop_w=32,  # noqa: E731
                                         crop_h=32, scale_jitter=0.3, positive_share=0.7, seed=9)
    a, b = make(), make()
    assert len(a) == 3
    x0, t0 = a[0]
    assert x0.shape == (4, 32, 32, 3) and t0.shape == (4, 32 // STRIDE, 32 // STRIDE, 6)
    np.testing.assert_array_equal(b[0][0], x0)
    np.testing.assert_array_equal(b[0][1], t0)
    assert not np.array_equal(a[1][0], x0)


def test_the_trained_localiser_does_not_depend_on_how_many_threads_built_its_batches(monkeypatch):
    """The threads that build batches ahead of the step are a speed setting: batch i is the same draw whichever
    thread builds it and the steps take them in order, so two and three threads train the same net."""
    import albumentations as A

    frames, boxes = scenes(24, seed=7)
    maps = []
    for threads in (2, 3):
        monkeypatch.setattr(localiser, "INPUT_THREADS", threads)
        model = localiser.fit_localiser(frames, boxes, np.arange(24), channels=8, steps=12, batch_size=4,
                                        crop_width=32, crop_height=32, scale_jitter=0.2, positive_share=0.7,
                                        views=1, learning_rate=0.01, policy=A.Compose([]), seed=3)
        maps.append(localiser.predict_maps(model, frames[:6]))
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-5)


def test_folds_trained_in_processes_of_their_own_are_the_folds_trained_here():
    """localise.processes is a speed setting: a fold trained in a spawned process, beside another fold, ends
    with the very weights it ends with when the folds train one after another in the stage's own process."""
    import dataclasses

    from pipeline.core.params import load

    s = load(localise.Settings)
    s = dataclasses.replace(s, localise=dataclasses.replace(
        s.localise, width=IN_W, height=IN_H, channels=8, crop_width=32, crop_height=32, views=2, steps=8,
        batch_size=4))
    frames, boxes = scenes(12, seed=8)
    jobs = [localise.FoldJob(k, np.arange(12)[np.arange(12) % 2 != k], seed=5 + k, line=k) for k in range(2)]
    here = list(localise.trained_folds(jobs, frames, boxes, s, processes=1))
    apart = list(localise.trained_folds(jobs, frames, boxes, s, processes=2))
    assert len(apart) == 2
    for (mine, _), (theirs, _) in zip(here, apart, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(here[0][0][0], here[1][0][0])  # the two folds are two different nets


def _fold_processes_running(timeout: float = 120.0):
    """Start tests/fold_processes_script.py; once both its fold processes train, return it and their pids."""
    from tests.factories import ROOT

    script = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fold_processes_script.py")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    parent = int(script.stdout.readline())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(parent), "-f", "spawn_main"],
                                                   capture_output=True, text=True).stdout.split()]
        if len(children) == 2 and all(_cpu_seconds(p) > 8 for p in children):  # past TensorFlow's import
            return script, children
        time.sleep(1)
    script.kill()
    pytest.fail("the two fold processes never started training")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # exited, not yet reaped by whoever adopted it
            return True
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_fold_process_that_dies_stops_the_stage_with_what_to_do():
    script, children = _fold_processes_running()
    os.kill(children[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    out, _ = script.communicate(timeout=120)
    assert "fold's process died" in out and "localise.processes: 1" in out
    assert _gone(children[1], within=30), "the other fold process outlived the stage"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_fold_processes_end_themselves_when_the_stage_is_killed():
    script, children = _fold_processes_running()
    script.kill()  # no chance to shut its pool down
    script.wait(timeout=30)
    assert all(_gone(pid, within=15) for pid in children), "a fold process kept running after the stage died"


def test_folds_train_two_or_more_at_once_on_cpus_none_alone_at_the_end_and_one_at_a_time_on_a_gpu():
    assert localise.fold_processes("auto", n_folds=5, cpus=2) == 3  # 3 + 2: no fold trains alone at the end
    assert localise.fold_processes("auto", n_folds=4, cpus=2) == 2  # 2 + 2
    assert localise.fold_processes("auto", n_folds=3, cpus=2) == 3
    assert localise.fold_processes("auto", n_folds=7, cpus=16) == 4  # 4 + 3
    assert localise.fold_processes("auto", n_folds=1, cpus=2) == 1
    assert localise.fold_processes("auto", n_folds=5, cpus=16, devices=1) == 1  # a GPU
    assert localise.fold_processes("auto", n_folds=5, cpus=1) == 1
    assert localise.fold_processes(8, n_folds=5, cpus=2) == 5  # never more processes than folds
    from pipeline.core.params import ConfigError

    with pytest.raises(ConfigError, match="localise.processes"):
        localise.fold_processes(0, n_folds=5, cpus=2)


def test_crops_larger_than_the_frame_are_refused():
    frames, boxes = scenes(4, seed=6)
    with pytest.raises(ValueError, match="crop_width"):
        localiser.fit_localiser(frames, boxes, np.arange(4), channels=8, steps=1, batch_size=2, crop_width=80,
                                crop_height=32, scale_jitter=0.0, positive_share=0.5, views=1, learning_rate=0.01,
                                policy=None, seed=0)


# ------------------------------------------------------------------------------------------ stage scores


def test_box_scores_take_each_frames_best_matching_fish_and_skip_frames_without_one():
    dets = [Detection(0, 0, 10, 10, 0.9), Detection(50, 50, 10, 10, 0.8), Detection(0, 0, 10, 10, 0.1)]
    truth = [np.array([[100.0, 100, 5, 5], [0, 0, 10, 10]]), np.array([[55.0, 50, 10, 10]]), np.zeros((0, 4))]
    scores = localise.box_scores(dets, truth)
    assert scores["n_images"] == 2
    assert scores["mean_iou"] == pytest.approx((1.0 + 50 / 150) / 2)
    assert scores["share_iou_50"] == 0.5


def test_confidence_that_tells_fish_from_nof_scores_an_auc_of_one():
    out = localise.nof_separation(np.array([0.9, 0.8, 0.2, 0.1]), np.array([True, True, False, False]))
    assert out["auc_fish_vs_nof"] == 1.0 and out["confidence_fish"] == pytest.approx(0.85)


# ------------------------------------------------------------------------------------------------ crops


def test_a_crop_is_a_square_around_the_box_with_its_margin_from_the_full_frame():
    frame = np.zeros((200, 300, 3), np.uint8)
    frame[90:110, 130:170] = 255  # a 40 x 20 'fish'
    crop = crops.cut(frame, (130, 90, 40, 20), margin=0.25, min_side=16, size=30)
    assert crop.shape == (30, 30, 3)
    # The square is 60 px (40 + 2 x 25%): the fish spans 2/3 of its width and 1/3 of its height, centred.
    lit = np.argwhere(crop[..., 0] > 127)
    assert (lit[:, 1].min(), lit[:, 1].max()) == (5, 24) and (lit[:, 0].min(), lit[:, 0].max()) == (10, 19)


def test_a_tiny_box_is_cut_at_the_minimum_side_and_the_part_off_the_frame_is_black():
    frame = np.full((100, 100, 3), 128, np.uint8)
    assert crops.square((50, 50, 2, 2), margin=0.25, min_side=32)[2] == 32
    corner = crops.cut(frame, (0, 0, 20, 20), margin=0.5, min_side=8, size=40)
    assert not corner[:10, :10].any() and corner[-10:, -10:].min() == 128  # 40 px square: half off the frame


def test_truth_crops_use_the_largest_box_and_a_misaligned_table_is_refused(tmp_path):
    from pipeline.core.params import Crops

    manifest = pd.DataFrame({"id": ["a.jpg", "b.jpg", "t.jpg"], "split": ["train", "train", "test_stg1"]})
    localised = manifest.assign(x=1.0, y=1.0, width=5.0, height=5.0, confidence=0.5, fold=[0, 1, -1])
    pd.DataFrame({"id": ["a.jpg", "a.jpg"], "x": [0, 10], "y": [0, 10], "width": [4, 30], "height": [4, 20]}
                 ).to_csv(tmp_path / "boxes.csv", index=False)
    pd.DataFrame({"image": ["t.jpg"], "stage": [1], "x": [7], "y": [8], "width": [9], "height": [10]}
                 ).to_csv(tmp_path / "solution_boxes.csv", index=False)

    class P:
        boxes, solution_boxes = str(tmp_path / "boxes.csv"), str(tmp_path / "solution_boxes.csv")
        localised, manifest = "localised.csv", "manifest.csv"

    truth = Crops(backbones=("vgg16",), image_size=32, margin=0.25, min_side=16, boxes="truth")
    got = crops_stage.crop_boxes(manifest, localised, truth, P)
    np.testing.assert_array_equal(got, [[10, 10, 30, 20], [1, 1, 5, 5], [7, 8, 9, 10]])  # b: no box, keeps its own
    localised_only = crops_stage.crop_boxes(manifest, localised, Crops(("vgg16",), 32, 0.25, 16, "localised"), P)
    np.testing.assert_array_equal(localised_only, [[1, 1, 5, 5]] * 3)
    with pytest.raises(ValueError, match="not row-aligned"):
        crops_stage.crop_boxes(manifest, localised.iloc[::-1], truth, P)


def test_a_localiser_saved_twice_is_the_same_file_and_loads_back(tmp_path):
    """DVC compares the fold models by digest: the same weights must give the same bytes though the layers'
    shared dtype policy is another object (at another address) in another process, and the file must load."""
    import keras

    from pipeline.core.files import save_keras

    saved = []
    for k in range(2):
        keras.config.set_dtype_policy("float32")  # a new policy object, as a new process would have
        keras.utils.set_random_seed(0)
        model = localiser.build_localiser(IN_W, IN_H, 8)
        save_keras(model, tmp_path / f"{k}.keras")
        saved.append((tmp_path / f"{k}.keras").read_bytes())
    assert saved[0] == saved[1]
    frames, _ = scenes(2, seed=1)
    loaded = keras.models.load_model(tmp_path / "1.keras", compile=False)
    np.testing.assert_allclose(localiser.predict_maps(loaded, frames), localiser.predict_maps(model, frames),
                               atol=1e-6)
