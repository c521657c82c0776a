"""Augment stage: stored views a user can trust, and the online batches fine-tuning trains on."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from pipeline.core.augmentation import NightVision, make_views, train_policy
from pipeline.core.batches import AugmentedBatches
from pipeline.core.params import Augment
from tests.factories import section


@pytest.fixture(scope="module")
def cfg() -> Augment:
    return section(Augment, "augment", tta_views=3, train_views=2)


def images(n: int = 6, size: int = 24) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_views_are_the_test_time_flips_then_training_draws_for_training_rows_only(cfg):
    x, is_train = images(), np.array([True, True, True, True, False, False])
    views = make_views(x, is_train, cfg, seed=1)
    assert views.shape == (5, *x.shape) and views.dtype == np.uint8
    np.testing.assert_array_equal(views[0], x)
    np.testing.assert_array_equal(views[1], x[:, :, ::-1])  # horizontal flip
    np.testing.assert_array_equal(views[2], x[:, ::-1])  # vertical flip
    assert not views[3:, ~is_train].any()  # test images get no training draws
    assert all((views[v, i] != x[i]).any() for v in (3, 4) for i in np.flatnonzero(is_train))
    np.testing.assert_array_equal(make_views(x, is_train, cfg, seed=1), views)  # reproducible
    assert (make_views(x, is_train, cfg, seed=2)[3:] != views[3:]).any()


def test_too_many_test_time_views_are_refused(cfg):
    with pytest.raises(ValueError, match="tta_views"):
        make_views(images(), np.ones(6, bool), dataclasses.replace(cfg, tta_views=5), seed=0)


def test_night_vision_is_green_and_flat():
    day = cv2.resize(images(1, 8)[0], (64, 64), interpolation=cv2.INTER_NEAREST)
    night = NightVision(p=1.0)(image=day)["image"].astype(float)
    r, g, b = night.reshape(-1, 3).mean(axis=0)
    assert g > 1.8 * r and g > 1.8 * b
    assert night[..., 1].std() < day.astype(float).mean(axis=2).std()


@pytest.mark.parametrize(("replicas", "n_rows"), [(1, 21), (2, 21), (4, 23)])
def test_fine_tuning_batches_cover_the_rows_and_split_evenly_over_replicas(cfg, replicas, n_rows):
    x = images(30)
    rows, labels = np.arange(3, 3 + n_rows), np.arange(n_rows) % 8
    batches = AugmentedBatches(x, rows, labels, 8, 8, train_policy(cfg), seed=0,
                                       replicas=replicas)
    seen = []
    for i in range(len(batches)):
        batch, targets = batches[i]
        assert batch.dtype == np.uint8 and batch.shape[1:] == x.shape[1:]
        assert len(batch) % replicas == 0 and len(batch) == len(targets)
        seen.append(targets.argmax(1))
    seen = np.concatenate(seen)
    assert n_rows - replicas < len(seen) <= n_rows  # at most replicas - 1 rows wait for the next epoch
    assert np.bincount(seen, minlength=8).max() <= np.bincount(labels, minlength=8).max()
    first = batches.order.copy()
    batches.on_epoch_end()
    assert (batches.order != first).any()  # reshuffled: a different few rows are left out next time


def test_fine_tuning_batches_are_the_same_whichever_thread_draws_them(cfg):
    x = images(40)

    def batches():
        return AugmentedBatches(x, np.arange(40), np.arange(40) % 8, 8, 8, train_policy(cfg), seed=3)

    one, other = batches(), batches()
    first = [one[i][0] for i in range(len(one))]
    with ThreadPoolExecutor(4) as pool:  # reversed and concurrent: the order threads reach batches varies
        second = list(pool.map(lambda i: other[i][0], reversed(range(len(other)))))[::-1]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    one.on_epoch_end()
    assert any((one[i][0] != first[i]).any() for i in range(len(one)))  # a new epoch draws anew


def test_worker_processes_draw_exactly_the_batches_threads_draw(cfg, tmp_path):
    np.save(tmp_path / "cache.npy", images(40))
    cache = np.load(tmp_path / "cache.npy", mmap_mode="r")
    rows, labels = np.arange(3, 40), np.arange(37) % 8

    def batches(processes: int) -> AugmentedBatches:
        return AugmentedBatches(cache, rows, labels, 8, 8, train_policy(cfg), seed=5,
                                        processes=processes)

    threads, pool = batches(0), batches(2)
    try:
        for i in range(len(threads)):
            expected, target = threads[i]
            drawn, pool_target = pool[i]
            np.testing.assert_array_equal(drawn, expected)
            np.testing.assert_array_equal(pool_target, target)
    finally:
        pool.close()
    with pytest.raises(ValueError, match="memory-mapped"):
        AugmentedBatches(images(), rows, labels, 8, 8, train_policy(cfg), seed=5, processes=2)


def test_a_batch_size_the_replicas_cannot_share_is_refused(cfg):
    with pytest.raises(ValueError, match="multiple of the number of GPUs"):
        AugmentedBatches(images(), np.arange(6), np.zeros(6, int), 8, 6, train_policy(cfg), seed=0,
                                 replicas=4)
