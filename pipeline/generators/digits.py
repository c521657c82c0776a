"""The MNIST case's offline source: scikit-learn's bundled 8×8 handwritten digits, shaped like MNIST.

1,797 real scans ship inside scikit-learn, so no download is needed; each is scaled up and centred in the
models' input the way MNIST centres its 20×20 digits in 28×28.
"""

from __future__ import annotations

import numpy as np


def demo_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits as (N, S, S, 1) floats in [0, 1], the digit filling the central 20/28."""
    import cv2
    from sklearn.datasets import load_digits

    digits = load_digits()
    box = max(1, round(image_size * 20 / 28))
    pad = (image_size - box) // 2
    images = np.zeros((len(digits.images), image_size, image_size, 1), dtype=np.float32)
    for i, img in enumerate(digits.images):
        # Cubic interpolation rounds the 8×8 blocks into strokes; it overshoots a little, hence the clip.
        big = cv2.resize((img / 16.0).astype(np.float32), (box, box), interpolation=cv2.INTER_CUBIC)
        images[i, pad : pad + box, pad : pad + box, 0] = np.clip(big, 0.0, 1.0)
    return images, digits.target.astype(np.int64)
