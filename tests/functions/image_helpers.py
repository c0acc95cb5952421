"""Pictures with a known answer for the imgprocessing tests (its unit tests and the console's
browser test): a face OpenCV's own cascade finds, and the green box the handler draws."""

from __future__ import annotations

import cv2
import numpy as np


def drawn_face(size: int = 300) -> np.ndarray:
    """A face drawn with OpenCV (nothing downloaded): light oval, dark brows and eyes, a bright nose
    bridge, nostrils and mouth, blurred; OpenCV's own frontal-face cascade finds it (checked at
    several sizes, PNG and JPEG). A (2*size)-square BGR image, the face centred."""
    img = np.full((size * 2, size * 2), 60, np.uint8)
    k = size / 200

    def at(x: float, y: float) -> tuple[int, int]:
        return int(size + x * k), int(size + y * k)

    def axes(a: float, b: float) -> tuple[int, int]:
        return int(a * k), int(b * k)

    cv2.ellipse(img, at(0, 0), axes(80, 105), 0, 0, 360, 200, -1)  # face
    for dx in (-35, 35):
        cv2.ellipse(img, at(dx, -45), axes(24, 7), 0, 0, 360, 90, -1)  # brows
        cv2.ellipse(img, at(dx, -22), axes(20, 11), 0, 0, 360, 40, -1)  # eyes
    cv2.ellipse(img, at(0, 15), axes(10, 28), 0, 0, 360, 215, -1)  # nose bridge
    cv2.ellipse(img, at(0, 38), axes(16, 6), 0, 0, 360, 120, -1)  # nostrils
    cv2.ellipse(img, at(0, 65), axes(32, 9), 0, 0, 360, 70, -1)  # mouth
    return cv2.cvtColor(cv2.GaussianBlur(img, (0, 0), 4 * k), cv2.COLOR_GRAY2BGR)


def green_box(out: np.ndarray) -> tuple[int, int, int, int] | None:
    """The bounding box of the pure-green pixels the handler draws, or None."""
    green = (out[..., 1] > 200) & (out[..., 0] < 80) & (out[..., 2] < 80)
    if green.sum() < 100:
        return None
    ys, xs = np.nonzero(green)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
