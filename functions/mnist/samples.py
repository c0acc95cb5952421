"""Writes the demo's sample inputs (like the seed's samples/6.jpg): one PNG per digit and a csv2
file (label + MNIST's 784 pixels), all from the 1,000 held-out MNIST digits, never from the
training rows; each PNG is one the served model gets right.

    python functions/mnist/samples.py [OUT]  # -> functions/mnist/samples/{0..9}.png, csv2/part-0.csv

Try them: `curl --data-binary @functions/mnist/samples/6.png http://127.0.0.1:31114/function/mnist`,
or upload one on the page; `batch.py --images functions/mnist/samples/csv2 --output /tmp/pred`.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "src")]
from digits import MAX_PIXEL, image_pixels, load_model  # noqa: E402
from train import load_data  # noqa: E402

OUT = HERE / "samples"


def drawing(pixels: np.ndarray, side: int = 280) -> np.ndarray:
    """The 28x28 MNIST digit as a person's upload would look: 280x280, dark ink on white."""
    ink = cv2.resize(pixels.reshape(28, 28).astype(np.uint8), (side, side), interpolation=cv2.INTER_CUBIC)
    return 255 - ink


def main(out: Path = OUT) -> int:
    _, _, x_test, y_test = load_data()
    _, net, _ = load_model()
    (out / "csv2").mkdir(parents=True, exist_ok=True)
    for digit in range(10):
        for index in np.flatnonzero(y_test == digit):
            png = cv2.imencode(".png", drawing(x_test[index]))[1].tobytes()
            if net.predict(image_pixels(png) / MAX_PIXEL)[0] == digit:  # one the model gets right
                (out / f"{digit}.png").write_bytes(png)
                break
    with open(out / "csv2" / "part-0.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(
            [int(label), *row.astype(int)] for label, row in zip(y_test[:100], x_test[:100], strict=True)
        )
    print(f"wrote {out}/0.png .. 9.png and {out}/csv2/part-0.csv (100 rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
