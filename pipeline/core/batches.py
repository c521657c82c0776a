"""Online augmentation for fine-tuning: a Keras dataset of augmented batches read from the image cache.

The policy itself lives in `pipeline.core.augmentation`, which imports neither Keras nor TensorFlow, so the
worker processes that draw batches start in a fraction of the time and memory; this module is the Keras side.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ProcessPoolExecutor

import keras
import numpy as np

from pipeline.core.augmentation import draw_in_worker, draw_rows, start_worker
from pipeline.core.devices import rows_for_replicas
from pipeline.core.pools import spawn_pool


class AugmentedBatches(keras.utils.PyDataset):
    """Online augmentation for fine-tuning: shuffled batches of policy draws read from the image cache.

    Reads the memory-mapped working-resolution cache, so no JPEG is decoded during training. Batches stay
    uint8: the model casts them on its device, a quarter of the bytes a float batch would move. Each batch
    draws from a generator seeded by (seed, epoch, batch), so a batch is the same whoever draws it.

    Who draws: `processes=0`, `workers` threads of this process. Augmentation holds Python's lock for much
    of its time, so threads stop helping at two or three (bench.gpu). `processes=N` (N > 0, needs a
    memory-mapped `images`): N worker processes (`pools.spawn_pool`: spawned, and ending themselves if this
    process dies) started on the first batch and stopped by `close()`; each opens the cache itself, and
    `workers` threads keep them all busy.

    With `replicas` > 1 (a `tf.distribute` strategy's `num_replicas_in_sync`) the last batch of an epoch is
    cut to a multiple of it, since Keras fails on a batch that does not split evenly over the replicas; the
    few rows left out change every epoch.
    """

    def __init__(self, images, rows, labels, n_classes, batch_size, policy, seed, workers=2, replicas=1,
                 processes=0, **kwargs):
        super().__init__(workers=max(workers, processes), **kwargs)
        if processes and not getattr(images, "filename", None):
            raise ValueError("worker processes read the image cache from disk: pass a memory-mapped array")
        self.images, self.rows, self.batch_size, self.policy = images, np.asarray(rows), batch_size, policy
        # As many rows as the shared rule keeps (it also refuses a batch size the replicas cannot share); which
        # rows are left out changes with every epoch's order.
        self.usable = len(rows_for_replicas(len(self.rows), batch_size, replicas, seed))
        if self.usable < replicas:
            raise ValueError(f"{len(self.rows)} rows cannot fill a batch for {replicas} replicas")
        self.targets = keras.utils.to_categorical(np.asarray(labels), n_classes)
        self.seed, self.epoch, self.processes = seed, 0, processes
        self.order = np.random.default_rng([seed, 0]).permutation(len(self.rows))
        self._local = threading.local()  # one copy of the policy per thread: its random state is not shared
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __len__(self) -> int:
        return -(-self.usable // self.batch_size)

    def __getitem__(self, i: int):
        pos = self.order[i * self.batch_size : min((i + 1) * self.batch_size, self.usable)]
        rows = self.rows[pos]
        seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
        if self.processes:
            return self._process_pool().submit(draw_in_worker, rows, seed).result(), self.targets[pos]
        policy = getattr(self._local, "policy", None)
        if policy is None:
            policy = self._local.policy = copy.deepcopy(self.policy)
        return draw_rows(self.images, rows, policy, seed), self.targets[pos]

    def _process_pool(self) -> ProcessPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = spawn_pool(self.processes, start_worker, (str(self.images.filename), self.policy))
            return self._pool

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
