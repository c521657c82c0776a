"""Finding the fish: a small CenterNet-style heat-map network, its training targets and its decoding.

Why this design (issue 13, and the measurements it quotes): a plain box-regression head on a classifier's
features broke on unseen boats on Kaggle (1.13 against 0.84 for whole frames), while detectors reached
0.5-0.6. On synthetic scenes on two CPU cores a heat-map net (stride 4, focal loss, width/height maps,
~100k parameters) beat a from-scratch RetinaNet and a box+class head by far. So: a fully convolutional net
sees the whole letterboxed frame and predicts, on a grid `STRIDE` times coarser than its input, where fish
centres are (a heat map trained with CenterNet's focal loss on Gaussian peaks), each centre's offset within
its cell, and the box's width and height. It knows nothing of boats or classes, which is what lets it work on
boats it never saw. The peak's height is the box's confidence: its objectness, evidence for NoF.

Frames are letterboxed (scaled to fit, padded with black, centred) into `width` × `height` pixels; every
function here converts between that input's coordinates and the original frame's. Everything is pure:
NumPy for the geometry and targets, `keras.ops` in the model and loss, so the same code trains under any
Keras backend (TensorFlow here, JAX on the lent GPU machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import keras
import numpy as np
from keras import layers, ops

STRIDE = 4  # output cell side in input pixels
#: Output channels: heat (1, sigmoid), the offset from the cell to the fish's centre (2, in cells), and the
#: log of the box's width and height in cells (2, linear): an error in log size costs the same for a small
#: fish as for a large one, as an error in IoU does.
HEAT, OFFSET, SIZE = slice(0, 1), slice(1, 3), slice(3, 5)
#: Target channels: the five above, then each cell's regression weight (its heat near a centre, else 0).
MASK = slice(5, 6)
FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0  # CenterNet's focal loss exponents
SIZE_WEIGHT, OFFSET_WEIGHT = 1.0, 1.0
REGRESS_RADIUS = 1  # cells on each side of a centre that learn its box (3 x 3)


# ------------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Letterbox:
    """How one frame sits in the localiser's input: scaled by `scale`, then shifted by (`left`, `top`)."""

    scale: float
    left: int
    top: int
    width: int  # of the scaled frame inside the input
    height: int

    @classmethod
    def fit(cls, frame_w: int, frame_h: int, in_w: int, in_h: int) -> Letterbox:
        scale = min(in_w / frame_w, in_h / frame_h)
        w, h = max(1, round(frame_w * scale)), max(1, round(frame_h * scale))
        return cls(scale, (in_w - w) // 2, (in_h - h) // 2, w, h)

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """(n, 4) x, y, width, height in frame pixels → input pixels."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return np.column_stack([boxes[:, 0] * self.scale + self.left, boxes[:, 1] * self.scale + self.top,
                                boxes[:, 2] * self.scale, boxes[:, 3] * self.scale])

    def to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """(n, 4) x, y, width, height in input pixels → frame pixels."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return np.column_stack([(boxes[:, 0] - self.left) / self.scale, (boxes[:, 1] - self.top) / self.scale,
                                boxes[:, 2] / self.scale, boxes[:, 3] / self.scale])


def letterbox(rgb: np.ndarray, in_w: int, in_h: int) -> np.ndarray:
    """The frame scaled to fit `in_w` × `in_h` and centred on black: the localiser's input (uint8 RGB)."""
    box = Letterbox.fit(rgb.shape[1], rgb.shape[0], in_w, in_h)
    interp = cv2.INTER_AREA if box.scale < 1 else cv2.INTER_LINEAR
    out = np.zeros((in_h, in_w, 3), dtype=np.uint8)
    out[box.top : box.top + box.height, box.left : box.left + box.width] = cv2.resize(
        rgb, (box.width, box.height), interpolation=interp)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes `a` (n, 4) and `b` (m, 4), x, y, width, height: (n, m)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    y1 = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


# ------------------------------------------------------------------------------------------- targets


def gaussian_radius(w: float, h: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: how far a centre may move while a box of this size keeps `min_overlap` IoU."""
    a1, b1, c1 = 1.0, h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + np.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + np.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + np.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return float(max(0.0, min(r1, r2, r3)))


def encode(boxes: np.ndarray, in_w: int, in_h: int) -> np.ndarray:
    """Training target (in_h/STRIDE, in_w/STRIDE, 6) for boxes (n, 4) in input pixels; n may be 0 (no fish).

    The heat channel is CenterNet's: a Gaussian around each centre cell, 1 at the cell itself. The box is
    regressed densely (as TTFNet does), not at the centre cell alone: every cell near a centre (within
    `REGRESS_RADIUS` cells) learns the offset from itself to the centre and the box's log size, weighted by
    its heat. Decoding reads the box at the highest peak, and a peak one cell off the true centre (which
    noise makes common for a fish a few cells long) then still reads a trained box rather than an untrained
    one, which is what held centre-only regression to a train-set IoU of 0.63 on the demo.
    """
    gh, gw = in_h // STRIDE, in_w // STRIDE
    target = np.zeros((gh, gw, 6), dtype=np.float32)
    ys, xs = np.mgrid[0:gh, 0:gw]
    # Where two fish's neighbourhoods overlap, a cell learns the box of the centre it is nearer (more heat).
    for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        cx, cy = (x + w / 2) / STRIDE, (y + h / 2) / STRIDE
        i, j = int(np.clip(cy, 0, gh - 1)), int(np.clip(cx, 0, gw - 1))
        sigma = max(gaussian_radius(w / STRIDE, h / STRIDE), 0.0) / 3 + 0.5
        peak = np.exp(-((xs - j) ** 2 + (ys - i) ** 2) / (2 * sigma**2))
        target[..., 0] = np.maximum(target[..., 0], peak)
        target[i, j, 0] = 1.0
        near = (np.abs(xs - j) <= REGRESS_RADIUS) & (np.abs(ys - i) <= REGRESS_RADIUS)
        weight = np.where(near, peak, 0.0)
        take = weight > target[..., 5]
        target[take, 1] = cx - xs[take]
        target[take, 2] = cy - ys[take]
        target[take, 3:5] = np.log(np.maximum((w / STRIDE, h / STRIDE), 0.25))
        target[take, 5] = weight[take]
    return target


@dataclass(frozen=True)
class Detection:
    """The most confident box of one frame, in frame pixels, and its confidence (heat-map peak)."""

    x: float
    y: float
    width: float
    height: float
    confidence: float


def decode(maps: np.ndarray, box: Letterbox, in_w: int, in_h: int) -> Detection:
    """The highest peak of one frame's output maps (gh, gw, 5) as a box in the original frame.

    The box is a vote of the cells around the peak (within `REGRESS_RADIUS`), not the peak cell's alone: each was
    trained on the same box, weighted by its heat (`encode`), so their heat-weighted mean averages out one
    cell's error. Only cells that point at the peak's own centre (within a cell of it) vote, so a neighbouring
    fish's cells do not pull the box towards theirs. On the demo's out-of-fold maps this moved the share of
    frames at IoU >= 0.5 from 78.6% to 81.7% and stage 2's from 93.8% to 94.9% (the same fold models).
    """
    heat = maps[..., 0]
    gh, gw = heat.shape
    i, j = np.unravel_index(int(np.argmax(heat)), heat.shape)
    rows, cols = np.mgrid[max(0, i - REGRESS_RADIUS) : min(gh, i + REGRESS_RADIUS + 1),
                          max(0, j - REGRESS_RADIUS) : min(gw, j + REGRESS_RADIUS + 1)]
    cx, cy = cols + maps[rows, cols, 1], rows + maps[rows, cols, 2]  # each cell's centre, in cells
    peak = (i - rows[0, 0], j - cols[0, 0])
    agree = (np.abs(cx - cx[peak]) <= 1) & (np.abs(cy - cy[peak]) <= 1)
    weight = np.where(agree, heat[rows, cols] + 1e-12, 0.0)  # the peak itself votes even where all is 0
    weight = weight / weight.sum()
    cx, cy = float((cx * weight).sum()) * STRIDE, float((cy * weight).sum()) * STRIDE
    w, h = np.exp([(maps[rows, cols, c] * weight).sum() for c in (3, 4)]) * STRIDE
    x, y, w, h = box.to_frame(np.array([[cx - w / 2, cy - h / 2, w, h]]))[0]
    return Detection(float(x), float(y), float(w), float(h), float(heat[i, j]))


def flip_maps(maps: np.ndarray) -> np.ndarray:
    """Output maps of a horizontally flipped input, turned back into the unflipped frame's maps."""
    out = maps[..., ::-1, :].copy()
    out[..., 1] = 1.0 - out[..., 1]  # the x offset mirrors; the grid's cells mirror too
    # A centre at cell j + dx in the flipped frame sits at (gw - 1 - j) + (1 - dx) in the original.
    return out


# --------------------------------------------------------------------------------------------- model


def _conv(x, filters: int, stride: int = 1, name: str = ""):
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)  # 0.9: short runs do not diverge
    return layers.ReLU(name=f"{name}_relu")(x)


def build_localiser(in_w: int, in_h: int, width: int = 16) -> keras.Model:
    """Raw uint8 RGB (in_h, in_w, 3) → maps (in_h/4, in_w/4, 5); `width` channels at stride 4 (~100k weights
    at 16). A U-shaped net: down to stride 16 for context (a fish is 10-40 px, its deck hundreds), back up to
    stride 4 with a skip, then the three heads."""
    if in_w % 16 or in_h % 16:
        raise ValueError(f"localise.width and localise.height must be multiples of 16, got {in_w}x{in_h}")
    inputs = keras.Input((in_h, in_w, 3), name="frame")
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    x = _conv(x, width // 2, 2, "stem")  # /2
    s4 = _conv(_conv(x, width, 2, "down4"), width, 1, "block4")  # /4
    s8 = _conv(_conv(s4, width * 2, 2, "down8"), width * 2, 1, "block8")  # /8
    s16 = _conv(_conv(s8, width * 4, 2, "down16"), width * 4, 1, "block16")  # /16
    up8 = layers.Concatenate(name="skip8")([layers.UpSampling2D(2, name="up8")(s16), s8])
    up8 = _conv(up8, width * 2, 1, "fuse8")
    up4 = layers.Concatenate(name="skip4")([layers.UpSampling2D(2, name="up4")(up8), s4])
    up4 = _conv(up4, width, 1, "fuse4")
    # CenterNet's prior: the heat head starts out saying "no centre here" (sigmoid(-2.19) = 0.1), so the first
    # steps are not swamped by the background cells.
    heat = layers.Conv2D(1, 1, activation="sigmoid", bias_initializer=keras.initializers.Constant(-2.19),
                         dtype="float32", name="heat")(up4)
    offset = layers.Conv2D(2, 1, dtype="float32", name="offset")(up4)  # linear: cells near a centre too
    size = layers.Conv2D(2, 1, dtype="float32", name="size")(up4)
    return keras.Model(inputs, layers.Concatenate(dtype="float32", name="maps")([heat, offset, size]),
                       name="localiser")


def centernet_loss(target, maps):
    """Focal loss on the heat map (normalised by the number of fish) + heat-weighted L1 on the offsets and log
    sizes of the cells near each centre."""
    heat = ops.clip(maps[..., 0], 1e-6, 1 - 1e-6)
    peak = target[..., 0]
    centre = ops.cast(ops.equal(peak, 1.0), "float32")
    n = ops.maximum(ops.sum(centre), 1.0)
    positive = -ops.log(heat) * ops.power(1 - heat, FOCAL_ALPHA) * centre
    negative = -ops.log(1 - heat) * ops.power(heat, FOCAL_ALPHA) * ops.power(1 - peak, FOCAL_BETA) * (1 - centre)
    focal = (ops.sum(positive) + ops.sum(negative)) / n
    weight = target[..., 5:6]  # the heat of the cells near a centre; 0 elsewhere
    norm = ops.maximum(ops.sum(weight), 1.0)
    offset = ops.sum(ops.abs(maps[..., 1:3] - target[..., 1:3]) * weight) / norm
    size = ops.sum(ops.abs(maps[..., 3:5] - target[..., 3:5]) * weight) / norm
    return focal + OFFSET_WEIGHT * offset + SIZE_WEIGHT * size


# ------------------------------------------------------------------------------------------ training


def photometric_views(frames: np.ndarray, policy, n_views: int, seed: int) -> np.ndarray:
    """(n_views, n, h, w, 3): view 0 is `frames` itself, the others one draw each of `policy` per frame.

    Drawn once per fold rather than per sample: the photometric policy costs about as much as a training step
    on these small inputs, and the geometric draws (scale, position, flips) already make every sample new."""
    out = np.empty((max(1, n_views), *frames.shape), dtype=np.uint8)
    out[0] = frames
    for v in range(1, len(out)):
        policy.set_random_seed(int(np.random.default_rng([seed, v]).integers(2**31)))
        for k, frame in enumerate(frames):
            out[v, k] = policy(image=frame)["image"]
    return out


def draw_crop(frame: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, crop_w: int, crop_h: int,
              scale_jitter: float, positive_share: float) -> tuple[np.ndarray, np.ndarray]:
    """One training sample: a `crop_w` x `crop_h` window of a letterboxed frame, the frame first rescaled by
    exp(U(-scale_jitter, scale_jitter)), the window around a random fish with probability `positive_share`
    (the fish's centre anywhere in it) and anywhere otherwise, then flipped at random either way.

    Returns the crop and the boxes (input pixels, x, y, width, height) whose centres fall inside it: a fish cut
    off at its middle is not a centre this crop can learn. Outside the frame is black, as the letterbox is.
    """
    frame_h, frame_w = frame.shape[:2]
    scale = float(np.exp(rng.uniform(-scale_jitter, scale_jitter))) if scale_jitter > 0 else 1.0
    scaled = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
    room_x, room_y = max(0.0, frame_w * scale - crop_w), max(0.0, frame_h * scale - crop_h)
    if len(scaled) and rng.random() < positive_share:
        x, y, w, h = scaled[rng.integers(len(scaled))]
        left = float(np.clip(x + w / 2 - rng.uniform(STRIDE, crop_w - STRIDE), 0, room_x))
        top = float(np.clip(y + h / 2 - rng.uniform(STRIDE, crop_h - STRIDE), 0, room_y))
    else:
        left, top = rng.uniform(0, room_x), rng.uniform(0, room_y)
    warp = np.float32([[scale, 0, -left], [0, scale, -top]])
    crop = cv2.warpAffine(frame, warp, (crop_w, crop_h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    out = scaled - [left, top, 0, 0]
    if rng.random() < 0.5:
        crop, out[:, 0] = crop[:, ::-1], crop_w - out[:, 0] - out[:, 2]
    if rng.random() < 0.5:
        crop, out[:, 1] = crop[::-1], crop_h - out[:, 1] - out[:, 3]
    centre = out[:, :2] + out[:, 2:] / 2
    inside = (centre[:, 0] >= 0) & (centre[:, 0] < crop_w) & (centre[:, 1] >= 0) & (centre[:, 1] < crop_h)
    return np.ascontiguousarray(crop), out[inside]


#: Threads building the next batches while the net trains. Two, not Keras' default of one: with one, `fit` feeds
#: through a tf.data generator dataset whose teardown stalled after half the folds, for about 15 ms per step
#: trained (48 s after a 2,400-step fold, on two cores); with two it feeds from its own ordered queue and never
#: did (tests/test_localiser.py checks that the boxes do not depend on how many threads built the batches).
INPUT_THREADS = 2


class CropBatches(keras.utils.PyDataset):
    """`steps` training batches of random crops (`draw_crop`) of the frames at `rows`, each from a random
    photometric view (`photometric_views`), and their targets (`encode`).

    Why crops: a fully convolutional net learns the same weights from a quarter of the frame at a quarter of the
    cost, and most of a frame is deck that teaches nothing new. Centring most crops near a fish puts the scarce
    positives in every batch; the rescaling shows every fish size on every deck (one grouped fold of the demo,
    1,500 steps: held-out IoU 0.55 without it, 0.57 with it; 0.52 and 0.66 on stage 2's new boats). Batch `i` is
    drawn from a generator seeded by (seed, i), so a run is repeatable whatever order the batches are asked for.
    """

    def __init__(self, views: np.ndarray, boxes: list[np.ndarray], rows: np.ndarray, *, batch_size: int, steps: int,
                 crop_w: int, crop_h: int, scale_jitter: float, positive_share: float, seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.views, self.boxes, self.rows = views, boxes, np.asarray(rows)
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.crop = dict(crop_w=crop_w, crop_h=crop_h, scale_jitter=scale_jitter, positive_share=positive_share)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, i])
        w, h = self.crop["crop_w"], self.crop["crop_h"]
        x = np.empty((self.batch_size, h, w, 3), dtype=np.uint8)
        t = np.empty((self.batch_size, h // STRIDE, w // STRIDE, 6), dtype=np.float32)
        for k, row in enumerate(rng.choice(self.rows, self.batch_size)):
            x[k], boxes = draw_crop(self.views[rng.integers(len(self.views)), row], self.boxes[row], rng, **self.crop)
            t[k] = encode(boxes, w, h)
        return x, t


class StepProgress(keras.callbacks.Callback):
    """A tqdm bar over the training steps, with the running loss (Keras' own bar is one line per epoch in a log)."""

    def __init__(self, steps: int, label: str, line: int = 0) -> None:
        super().__init__()
        self.steps, self.label, self.line, self.bar = steps, label, line, None

    def on_train_begin(self, logs=None) -> None:
        from tqdm import tqdm

        # `line`: the terminal line of this bar, so folds trained at once each keep their own
        self.bar = tqdm(total=self.steps, desc=self.label, unit="step", mininterval=5, position=self.line)

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        self.bar.update(1)
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}", refresh=False)

    def on_train_end(self, logs=None) -> None:
        self.bar.close()


def fit_localiser(frames: np.ndarray, boxes: list[np.ndarray], rows: np.ndarray, *, channels: int, steps: int,
                  batch_size: int, crop_width: int, crop_height: int, scale_jitter: float, positive_share: float,
                  views: int, learning_rate: float, policy, seed: int, progress: str = "", progress_line: int = 0
                  ) -> keras.Model:
    """Train a fresh localiser for `steps` batches of crops of the frames at `rows` (`boxes[i]`: frame i's boxes
    in input pixels), with a cosine-decayed learning rate, and return it as a net for whole frames (the same
    weights: it is fully convolutional). No validation set: its held-out frames are the out-of-fold boxes it is
    then scored on. `progress`: a label for a progress bar of the steps (none when empty), on terminal line
    `progress_line`.

    No XLA (Keras' "auto", which op determinism turns off): on two CPU cores a compiled step measured no faster
    (32.7 against 33.8 ms for 32 crops, the same process)."""
    in_h, in_w = frames.shape[1:3]
    if crop_width > in_w or crop_height > in_h:
        raise ValueError(f"localise.crop_width x crop_height ({crop_width}x{crop_height}) must fit in "
                         f"localise.width x height ({in_w}x{in_h})")
    keras.utils.set_random_seed(seed)
    model = build_localiser(crop_width, crop_height, channels)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=centernet_loss)
    # Only the rows trained on get views: on the real data every view of every frame would be gigabytes.
    rows = np.asarray(rows)
    drawn = photometric_views(frames[rows], policy, views, seed)
    data = CropBatches(drawn, [boxes[r] for r in rows], np.arange(len(rows)), batch_size=batch_size, steps=steps,
                       crop_w=crop_width, crop_h=crop_height, scale_jitter=scale_jitter,
                       positive_share=positive_share, seed=seed, workers=INPUT_THREADS)
    # No shuffle: batch i is already a random draw of its own, and Python's global random stays out of it.
    model.fit(data, epochs=1, shuffle=False, verbose=0,
              callbacks=[StepProgress(steps, progress, progress_line)] if progress else [])
    whole = build_localiser(in_w, in_h, channels)
    whole.set_weights(model.get_weights())
    return whole


def predict_maps(model: keras.Model, frames: np.ndarray, batch_size: int = 32, flip: bool = True) -> np.ndarray:
    """Output maps of `frames`; with `flip`, averaged with those of the mirrored frames (test-time flip)."""
    maps = np.concatenate([np.asarray(model(frames[i : i + batch_size], training=False))
                           for i in range(0, len(frames), batch_size)]) if len(frames) else np.zeros((0,))
    if flip and len(frames):
        mirrored = np.concatenate([np.asarray(model(np.ascontiguousarray(frames[i : i + batch_size, :, ::-1]),
                                                    training=False)) for i in range(0, len(frames), batch_size)])
        maps = (maps + flip_maps(mirrored)) / 2
    return maps
