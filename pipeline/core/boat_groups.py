"""Boat groups, perceptual hashes and duplicates: what honest cross-validation needs from ingest.

Frames from one boat and camera share an image size and a scene layout (deck edges, rails, hatches, the
camera angle), so a group is found by clustering, within each image size, a cheap signature of that layout:
a 16 x 16 map of edge strength, computed after histogram equalisation and normalised for contrast, so that
night-vision frames (green, dim, flat) stay with their boat's daylight frames. Colour histograms were tried
and dropped: night vision changes a boat's colours more than a change of boat does. Average-linkage
agglomerative clustering cuts at `ingest.group_threshold`, a Euclidean distance between unit-norm layouts
(sqrt(2 - 2 r), r their correlation: 0 identical, about 1.4 unrelated).
Perceptual hashes (dHash and aHash, written here with OpenCV so no extra package is needed) find near
duplicates; SHA-1 of the bytes finds exact ones. Frames of one split that are all near duplicates of each
other are a burst (`bursts`): the frames of one catch, whose predictions the ensemble may smooth. Everything
here is pure except `plot_groups`.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import cv2
import numpy as np
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

LAYOUT = 16  # side of the edge map: enough for the deck's layout, too coarse for the fish or the crew
WORK_WIDTH = 128  # frames are shrunk to this width first, so the signature does not depend on resolution
MAX_BUCKET = 3000  # larger size buckets are clustered on a sample and the rest assigned to the nearest centre
EXAMPLES = 20


# ------------------------------------------------------------------------------------------ signatures


def _bits(bool_grid: np.ndarray) -> np.ndarray:
    return np.packbits(bool_grid.reshape(-1))


def dhash(grey: np.ndarray, hash_size: int) -> np.ndarray:
    """Difference hash: is each pixel brighter than its right neighbour, on a (size+1) x size thumbnail."""
    small = cv2.resize(grey, (hash_size + 1, hash_size), interpolation=cv2.INTER_AREA)
    return _bits(small[:, 1:] > small[:, :-1])


def ahash(grey: np.ndarray, hash_size: int) -> np.ndarray:
    """Average hash: is each pixel of a size x size thumbnail brighter than the thumbnail's mean."""
    small = cv2.resize(grey, (hash_size, hash_size), interpolation=cv2.INTER_AREA).astype(np.float32)
    return _bits(small > small.mean())


def layout(small: np.ndarray) -> np.ndarray:
    """Unit-norm, zero-mean LAYOUT x LAYOUT map of edge strength (where the deck's lines are), from a grey
    frame WORK_WIDTH pixels wide."""
    small = cv2.equalizeHist(small).astype(np.float32)  # night vision: dim and flat, same lines
    mag = cv2.magnitude(
        cv2.Sobel(small, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(small, cv2.CV_32F, 0, 1, ksize=3)
    )
    vec = cv2.resize(mag, (LAYOUT, LAYOUT), interpolation=cv2.INTER_AREA).reshape(-1)
    vec -= vec.mean()
    return (vec / max(float(np.linalg.norm(vec)), 1e-6)).astype(np.float32)


def signature(rgb: np.ndarray, hash_size: int) -> dict[str, np.ndarray]:
    """Everything grouping and duplicate search need from one decoded RGB frame, a few hundred bytes."""
    h, w = rgb.shape[:2]
    # Shrink first: every signature is coarser than WORK_WIDTH, and a full-size grey copy would cost more.
    small = cv2.resize(rgb, (WORK_WIDTH, max(1, round(h * WORK_WIDTH / w))), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    return {"layout": layout(grey), "dhash": dhash(grey, hash_size), "ahash": ahash(grey, hash_size)}


# ------------------------------------------------------------------------------------------ clustering


def _cluster(feats: np.ndarray, threshold: float, rng: np.random.Generator) -> np.ndarray:
    n = len(feats)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    # Average linkage needs O(n^2) memory; a sample fixes the centres, the rest join the nearest one.
    sample = np.sort(rng.choice(n, MAX_BUCKET, replace=False)) if n > MAX_BUCKET else np.arange(n)
    model = AgglomerativeClustering(n_clusters=None, distance_threshold=threshold, linkage="average")
    labels = np.full(n, -1, dtype=np.int64)
    labels[sample] = model.fit_predict(feats[sample])
    rest = np.flatnonzero(labels < 0)
    if len(rest):
        k = labels[sample].max() + 1
        centres = np.stack([feats[sample][labels[sample] == c].mean(axis=0) for c in range(k)])
        for start in range(0, len(rest), 4096):
            block = rest[start : start + 4096]
            d = ((feats[block, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
            labels[block] = d.argmin(axis=1)
    return labels


def assign_groups(
    widths: np.ndarray, heights: np.ndarray, feats: np.ndarray, threshold: float, seed: int = 0
) -> np.ndarray:
    """Group id per frame: frames of different sizes never share a group; within a size, cluster signatures.

    Ids are numbered by decreasing group size (ties by first frame), so group 0 is the largest boat.
    """
    rng = np.random.default_rng(seed)
    sizes = list(zip(np.asarray(widths).tolist(), np.asarray(heights).tolist(), strict=True))
    raw = np.full(len(sizes), -1, dtype=np.int64)
    next_id = 0
    for size in sorted(set(sizes)):
        idx = np.array([i for i, s in enumerate(sizes) if s == size])
        labels = _cluster(feats[idx], threshold, rng)
        raw[idx] = labels + next_id
        next_id += int(labels.max()) + 1
    counts = Counter(raw.tolist())
    first = {}
    for i, g in enumerate(raw.tolist()):
        first.setdefault(g, i)
    order = sorted(counts, key=lambda g: (-counts[g], first[g]))
    remap = {g: new for new, g in enumerate(order)}
    return np.array([remap[g] for g in raw.tolist()], dtype=np.int64)


def summarise_groups(groups: np.ndarray, splits: np.ndarray, widths, heights) -> dict:
    """Number and sizes of groups, how many image sizes they span, and how the splits share them."""
    groups, splits = np.asarray(groups), np.asarray(splits)
    sizes = Counter(groups.tolist())
    by_size: dict[str, set] = defaultdict(set)
    for g, w, h in zip(
        groups.tolist(), np.asarray(widths).tolist(), np.asarray(heights).tolist(), strict=True
    ):
        by_size[f"{w}x{h}"].add(g)
    split_sets = {s: set(groups[splits == s].tolist()) for s in np.unique(splits)}
    train = split_sets.get("train", set())
    return {
        "n_groups": len(sizes),
        "largest": sorted(sizes.values(), reverse=True)[:30],  # frames in each of the biggest groups
        "median_size": float(np.median(list(sizes.values()))),
        "singletons": sum(1 for c in sizes.values() if c == 1),
        "groups_per_image_size": {k: len(v) for k, v in sorted(by_size.items())},
        "groups_per_split": {s: len(v) for s, v in split_sets.items()},
        "test_groups_seen_in_train": {s: len(v & train) for s, v in split_sets.items() if s != "train"},
    }


def agreement(groups: np.ndarray, true_boats: np.ndarray) -> float:
    """Adjusted Rand index of the estimated groups against the true boats (1 = identical partitions)."""
    return float(adjusted_rand_score(np.asarray(true_boats), np.asarray(groups)))


# ------------------------------------------------------------------------------------------ duplicates


def _as_words(bits: np.ndarray) -> np.ndarray:
    """Packed hash bytes (n, b) as little 64-bit words (n, ceil(b/8)) so XOR + popcount runs word-wide."""
    n, b = bits.shape
    pad = (-b) % 8
    if pad:
        bits = np.hstack([bits, np.zeros((n, pad), dtype=np.uint8)])
    return np.ascontiguousarray(bits).view(np.uint64)


def _hamming_block(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=-1, dtype=np.int32)


def near_pairs(
    dh: np.ndarray,
    ah: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    max_bits: int,
    same_set: bool,
    labels: np.ndarray | None = None,
) -> tuple[int, int, np.ndarray]:
    """Count pairs (r, c) whose dHash and aHash both differ by at most `max_bits`.

    Returns the count, how many of those pairs have different `labels` (label noise or a leak worth a look),
    and a few example pairs. `same_set`: rows and cols are the same set, so only r < c pairs count.
    """
    dw, aw = _as_words(dh), _as_words(ah)
    total, differ, examples = 0, 0, []
    block = max(1, 2_000_000 // max(len(cols), 1))
    for start in range(0, len(rows), block):
        r = rows[start : start + block]
        close = (_hamming_block(dw[r], dw[cols]) <= max_bits) & (_hamming_block(aw[r], aw[cols]) <= max_bits)
        if same_set:
            close &= r[:, None] < cols[None, :]
        total += int(close.sum())
        if labels is not None:
            differ += int((close & (labels[r][:, None] != labels[cols][None, :])).sum())
        if len(examples) < EXAMPLES:
            ri, ci = np.nonzero(close)
            examples.extend(zip(r[ri][:EXAMPLES].tolist(), cols[ci][:EXAMPLES].tolist(), strict=True))
    return total, differ, np.array(examples[:EXAMPLES], dtype=np.int64).reshape(-1, 2)


def bursts(dh: np.ndarray, ah: np.ndarray, splits: np.ndarray, max_bits: int) -> np.ndarray:
    """Burst id per frame: groups of frames every two of which are near duplicates (dHash and aHash both
    within `max_bits`), found within each split only, so a test burst never reaches into train (whose labels
    would then leak into test-time smoothing) nor stage 1 into stage 2.

    Near-duplicate pairs are joined into connected components first, then each component is cut by complete
    linkage at `max_bits`: plain components chain a catch to the next one filmed from the same spot (on the
    demo at 4 bits, a 14-frame component, and only 76% of the training pairs in one burst shared a label; cut
    this way, 97%). Ids are numbered by each burst's first frame, so they are unique across splits and the
    same every run; a frame with no near duplicate is a burst of its own.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    splits = np.asarray(splits)
    n = len(splits)
    dw, aw = _as_words(dh), _as_words(ah)
    pair_r, pair_c = [], []
    for split in sorted(set(splits.tolist())):
        idx = np.flatnonzero(splits == split)
        block = max(1, 2_000_000 // max(len(idx), 1))
        for start in range(0, len(idx), block):
            r = idx[start : start + block]
            close = (_hamming_block(dw[r], dw[idx]) <= max_bits) & (_hamming_block(aw[r], aw[idx]) <= max_bits)
            ri, ci = np.nonzero(close)
            pair_r.append(r[ri])
            pair_c.append(idx[ci])
    rows = np.concatenate(pair_r) if pair_r else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(pair_c) if pair_c else np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    label = comp.astype(np.int64) * n  # room for each component's sub-bursts
    for c, count in zip(*np.unique(comp, return_counts=True), strict=True):
        if count > 2:  # two frames joined by an edge are within max_bits of each other already
            members = np.flatnonzero(comp == c)
            dist = np.maximum(_hamming_block(dw[members], dw[members]), _hamming_block(aw[members], aw[members]))
            condensed = dist[np.triu_indices(len(members), 1)].astype(np.float64)
            label[members] += fcluster(linkage(condensed, "complete"), max_bits, "distance")
    first: dict[int, int] = {}
    for c in label.tolist():
        first.setdefault(c, len(first))
    return np.array([first[c] for c in label.tolist()], dtype=np.int64)


def summarise_bursts(burst: np.ndarray, splits: np.ndarray) -> dict:
    """Per split: how many bursts, how many frames share a burst with another, the biggest bursts."""
    burst, splits = np.asarray(burst), np.asarray(splits)
    out = {}
    for split in sorted(set(splits.tolist())):
        sizes = Counter(burst[splits == split].tolist())
        out[split] = {
            "bursts": len(sizes),
            "frames_in_bursts": int(sum(c for c in sizes.values() if c > 1)),
            "largest": sorted(sizes.values(), reverse=True)[:10],
        }
    return out


def duplicates(
    ids: np.ndarray,
    splits: np.ndarray,
    labels: np.ndarray,
    sha1: np.ndarray,
    dh: np.ndarray,
    ah: np.ndarray,
    max_bits: int,
) -> dict:
    """Exact (same bytes) and near (hashes within `max_bits`) duplicates within train and train-vs-test."""
    ids, splits, labels, sha1 = map(np.asarray, (ids, splits, labels, sha1))
    train = np.flatnonzero(splits == "train")
    test = np.flatnonzero(splits != "train")
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(sha1.tolist()):
        by_sha[h].append(i)
    exact_train, exact_cross, exact_train_labels = [], [], 0
    for members in by_sha.values():
        tr = [i for i in members if splits[i] == "train"]
        te = [i for i in members if splits[i] != "train"]
        exact_train += [(a, b) for k, a in enumerate(tr) for b in tr[k + 1 :]]
        exact_train_labels += sum(labels[a] != labels[b] for k, a in enumerate(tr) for b in tr[k + 1 :])
        exact_cross += [(a, b) for a in tr for b in te]

    def named(pairs) -> list[list[str]]:
        return [[str(ids[a]), str(ids[b])] for a, b in list(pairs)[:EXAMPLES]]

    n_tt, diff_label, ex_tt = near_pairs(dh, ah, train, train, max_bits, same_set=True, labels=labels)
    n_tx, _, ex_tx = near_pairs(dh, ah, train, test, max_bits, same_set=False) if len(test) else (0, 0, [])
    return {
        "exact_within_train": {
            "pairs": len(exact_train),
            "different_label": int(exact_train_labels),
            "examples": named(exact_train),
        },
        "exact_train_test": {"pairs": len(exact_cross), "examples": named(exact_cross)},
        "near_within_train": {
            "pairs": n_tt,
            "different_label": diff_label,
            "examples": named(ex_tt),
            "max_bits": max_bits,
        },
        "near_train_test": {"pairs": n_tx, "examples": named(ex_tx), "max_bits": max_bits},
    }


# ------------------------------------------------------------------------------------------ figure


def plot_groups(
    images: np.ndarray,
    groups: np.ndarray,
    widths,
    heights,
    max_groups: int = 12,
    per_group: int = 6,
    seed: int = 0,
):
    """A grid: one row per group (largest first), a few frames each, from the resized image cache."""
    import matplotlib

    matplotlib.use("Agg")  # figures are files here; never ask for a display
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    counts = Counter(np.asarray(groups).tolist())
    shown = sorted(counts, key=lambda g: -counts[g])[:max_groups]
    fig, axes = plt.subplots(
        len(shown), per_group, figsize=(1.6 * per_group, 1.7 * len(shown)), squeeze=False
    )
    for row, g in enumerate(shown):
        members = np.flatnonzero(groups == g)
        pick = np.sort(rng.choice(members, min(per_group, len(members)), replace=False))
        for col in range(per_group):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(pick):
                ax.imshow(images[pick[col]])
        first = members[0]
        axes[row, 0].set_title(
            f"group {g}: {counts[g]} frames, {widths[first]}x{heights[first]}", fontsize=7, loc="left"
        )
    fig.suptitle("Boat groups (largest first), sample frames", fontsize=9)
    fig.tight_layout()
    return fig
