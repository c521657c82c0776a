"""Boat groups, perceptual hashes and duplicates on tiny generated frames with planted boats."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from pipeline.core import boat_groups as groups
from tests.downloads import boat_frame, boat_layout


def test_hashes_are_stable_under_brightness_and_differ_between_scenes():
    a = boat_frame(boat_layout(0, 160, 96), 1)
    brighter = np.clip(a.astype(int) + 25, 0, 255).astype(np.uint8)
    other = boat_frame(boat_layout(7, 160, 96), 1)
    grey = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in (a, brighter, other)]
    for fn in (groups.dhash, groups.ahash):
        ha, hb, hc = (fn(g, 8) for g in grey)
        assert ha.shape == (8,) and ha.dtype == np.uint8  # 64 bits, packed
        assert np.unpackbits(ha ^ hb).sum() <= 4
        assert np.unpackbits(ha ^ hc).sum() >= 12


def test_layout_keeps_night_frames_with_their_boat():
    lay = boat_layout(0, 160, 96)
    day = groups.signature(boat_frame(lay, 1), 8)["layout"]
    night = groups.signature(boat_frame(lay, 2, night=True), 8)["layout"]
    other = groups.signature(boat_frame(boat_layout(1, 160, 96), 3), 8)["layout"]
    assert np.isclose(np.linalg.norm(day), 1.0, atol=1e-4)
    assert np.linalg.norm(day - night) < 1.0 < np.linalg.norm(day - other)


def _planted(offset: int = 0):
    boats = [(offset + 0, 160, 96), (offset + 1, 160, 96), (offset + 2, 160, 96), (offset + 3, 160, 120)]
    feats, widths, heights, truth = [], [], [], []
    for b, w, h in boats:
        lay = boat_layout(b, w, h)
        for i in range(12):
            feats.append(groups.signature(boat_frame(lay, b * 100 + i, night=i % 4 == 0), 8)["layout"])
            widths.append(w), heights.append(h), truth.append(b)
    return np.stack(feats), np.array(widths), np.array(heights), np.array(truth)


def test_groups_recover_planted_boats_with_the_default_threshold():
    feats, widths, heights, truth = _planted()
    g = groups.assign_groups(widths, heights, feats, threshold=1.15)
    assert groups.agreement(g, truth) >= 0.8
    # Frames of different sizes never share a group, and ids are numbered by decreasing size.
    for gid in np.unique(g):
        assert len({(w, h) for w, h in zip(widths[g == gid], heights[g == gid], strict=True)}) == 1
    sizes = np.bincount(g)
    assert list(sizes) == sorted(sizes, reverse=True)


def test_threshold_extremes():
    feats, widths, heights, _ = _planted()
    assert len(np.unique(groups.assign_groups(widths, heights, feats, threshold=0.0))) == len(feats)
    # Everything merges within a size, never across sizes.
    assert len(np.unique(groups.assign_groups(widths, heights, feats, threshold=10.0))) == 2


def test_large_buckets_are_sampled_and_still_grouped(monkeypatch):
    monkeypatch.setattr(groups, "MAX_BUCKET", 10)
    feats, widths, heights, truth = _planted()
    g = groups.assign_groups(widths, heights, feats, threshold=1.15)
    assert (g >= 0).all() and groups.agreement(g, truth) >= 0.6


def test_agreement_ignores_label_names():
    assert groups.agreement(np.array([0, 0, 1, 1, 2]), np.array(["b", "b", "a", "a", "c"])) == pytest.approx(
        1.0
    )
    assert groups.agreement(np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1])) < 0.5


def test_near_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    dh = np.vstack(
        [base, base ^ np.eye(1, 8, 0, dtype=np.uint8), rng.integers(0, 256, (6, 8), dtype=np.uint8)]
    )
    ah = dh.copy()
    n = len(dh)
    rows = cols = np.arange(n)
    total, _, examples = groups.near_pairs(dh, ah, rows, cols, 2, same_set=True)
    brute = [
        (i, j) for i, j in itertools.combinations(range(n), 2) if np.unpackbits(dh[i] ^ dh[j]).sum() <= 2
    ]
    assert total == len(brute) >= 6
    assert {tuple(e) for e in examples.tolist()} <= set(brute)


def test_duplicates_exact_and_near_within_train_and_across():
    lay = boat_layout(0, 160, 96)
    frames = [boat_frame(lay, i) for i in range(4)] + [boat_frame(boat_layout(5, 160, 96), 9)]
    sigs = [groups.signature(f, 8) for f in frames]
    ids = np.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "t1.jpg"])
    splits = np.array(["train"] * 5 + ["test_stg1"])
    labels = np.array(["ALB", "ALB", "YFT", "BET", "NoF", ""])
    sha1 = np.array(["s0", "s0", "s2", "s3", "s4", "s0"])  # a == b byte for byte, and again in the test set
    dh = np.stack([s["dhash"] for s in sigs] + [sigs[0]["dhash"]])
    ah = np.stack([s["ahash"] for s in sigs] + [sigs[0]["ahash"]])
    rep = groups.duplicates(ids, splits, labels, sha1, dh, ah, max_bits=64)  # every pair counts as near
    assert rep["exact_within_train"]["pairs"] == 1 and rep["exact_within_train"]["examples"] == [
        ["a.jpg", "b.jpg"]
    ]
    assert rep["exact_train_test"]["pairs"] == 2  # a and b both equal t1
    assert rep["near_within_train"]["pairs"] == 10  # 5 choose 2
    assert rep["near_within_train"]["different_label"] == 10 - 1  # only (a, b) share a label
    assert rep["near_train_test"]["pairs"] == 5
    strict = groups.duplicates(ids, splits, labels, sha1, dh, ah, max_bits=0)
    assert strict["near_train_test"]["pairs"] >= 1  # t1 carries a's hashes


def test_bursts_are_mutual_near_duplicates_within_a_split_only():
    rng = np.random.default_rng(1)
    dh = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    bit = np.eye(1, 8, 0, dtype=np.uint8)[0]
    dh[1] = dh[0] ^ bit  # 1 bit from frame 0
    dh[2] = dh[1] ^ np.eye(1, 8, 3, dtype=np.uint8)[0]  # 1 bit from frame 1 but 2 from frame 0: a chain
    dh[3] = dh[0]  # identical to frame 0, but in another split
    dh[5] = dh[4]
    dh[7] = dh[6] ^ bit  # two frames, one bit apart
    ah = dh.copy()
    splits = np.array(["train", "train", "train", "test_stg1", "test_stg2", "test_stg2", "train", "train"])
    burst = groups.bursts(dh, ah, splits, max_bits=1)
    # The chain 0-1-2 is cut (0 and 2 are not near duplicates); numbered by first frame; 3 alone in its split.
    assert burst.tolist() == [0, 0, 1, 2, 3, 3, 4, 4]
    assert groups.bursts(dh, ah, splits, max_bits=2).tolist() == [0, 0, 0, 1, 2, 2, 3, 3]
    assert groups.bursts(dh, ah, splits, max_bits=0).tolist() == [0, 1, 2, 3, 4, 4, 5, 6]
    s = groups.summarise_bursts(burst, splits)
    assert s["train"] == {"bursts": 3, "frames_in_bursts": 4, "largest": [2, 2, 1]}
    assert s["test_stg2"]["frames_in_bursts"] == 2


def test_every_pair_of_a_burst_is_within_the_bits():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (1, 8), dtype=np.uint8)
    # A random walk of single-bit flips: plain components would make it one long burst.
    walk = [base[0]]
    for i in range(30):
        walk.append(walk[-1] ^ np.eye(1, 8, i % 8, dtype=np.uint8)[0] << (i % 5))
    dh = np.stack(walk)
    burst = groups.bursts(dh, dh.copy(), np.array(["train"] * len(dh)), max_bits=3)
    assert len(set(burst.tolist())) > 1
    for b in set(burst.tolist()):
        members = np.flatnonzero(burst == b)
        for i, j in itertools.combinations(members, 2):
            assert np.unpackbits(dh[i] ^ dh[j]).sum() <= 3


def test_summary_counts_groups_and_shared_test_groups():
    g = np.array([0, 0, 1, 2, 2, 3])
    splits = np.array(["train", "train", "train", "test_stg1", "train", "test_stg2"])
    s = groups.summarise_groups(g, splits, [10] * 6, [5] * 6)
    assert s["n_groups"] == 4 and s["singletons"] == 2 and s["largest"] == [2, 2, 1, 1]
    assert s["test_groups_seen_in_train"] == {"test_stg1": 1, "test_stg2": 0}
    assert s["groups_per_image_size"] == {"10x5": 4}


def test_plot_groups_draws_one_row_per_group():
    images = np.zeros((6, 8, 8, 3), np.uint8)
    fig = groups.plot_groups(images, np.array([0, 0, 1, 1, 1, 2]), [8] * 6, [8] * 6, per_group=3)
    assert len(fig.axes) == 3 * 3
