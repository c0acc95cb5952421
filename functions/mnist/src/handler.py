"""Handwritten-digit recognition on MNIST: the seeds' aggregated model, served.

Input (one request), MNIST's own forms first:
- a PNG or JPEG of a digit (any size, dark-on-light or light-on-dark, a 28x28 MNIST image or a
  photo), preprocessed as MNIST was made: the ink size-normalised into a 20x20 box and centred by
  mass in 28x28, light on black;
- JSON: MNIST's 784 pixels 0..255 (flat or 28 rows of 28) or `{"pixels": [...]}`, used as they
  are; rows of any other gray image are preprocessed like an upload; a list of `{"pixels": ...}`
  objects is a batch;
- CSV lines in the seeds' csv2 layout: `label,784 pixels` or the 784 pixels alone;
- nothing, through the HTTP trigger: the demo web page (upload or draw a digit).
The 8x8 UCI digits (64 values) are refused with a message saying what to send.
Output: JSON `{"digit": d, "probabilities": [p0..p9]}` (a list for batches; csv2 input gets CSV
lines `label,prediction,probability`).

MNIST_MODEL chooses the model in src/models/ (`averaged`: the per-partition models averaged, or
`mllib`: Spark MLlib's MultilayerPerceptron on all data); default: index.json's `serve` entry.
The model is its MLeap bundle (`<name>.zip`), read once at start; a missing or broken bundle stops
the function with one line naming the file and the problem.
MNIST_MAX_PIXELS (40 MP) bounds a decoded upload (decompression bombs are refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from digits import MAX_PIXEL, as_pixels, csv2_row, image_pixels, load_model

PAGE = Path(__file__).resolve().parent / "web" / "index.html"
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


class Handler:
    def __init__(self) -> None:
        self.model_name, self.net, meta = load_model(name=os.environ.get("MNIST_MODEL", ""))
        self.page = PAGE.read_bytes().replace(
            b"{{MODEL}}", f"{self.model_name} (test accuracy {meta['accuracy']:.4f})".encode()
        )

    def __call__(self, req: Any) -> bytes | tuple[bytes, str]:
        data: bytes = req.input
        if not data.strip():
            if req.info.Trigger.Name == "http":
                return self.page, "text/html; charset=utf-8"
            raise ValueError("empty input: send a PNG/JPEG of a digit, JSON pixels or csv2 lines")
        if data.startswith(MAGIC):
            return self._answer([image_pixels(data)], batch=False)
        text = data.decode("utf-8").strip()
        if text[0] in "[{":
            return self._json(text)
        return self._csv(text)

    def _answer(self, pixels: list[np.ndarray], batch: bool) -> tuple[bytes, str]:
        results = [self._result(p) for p in self.net.probabilities(np.stack(pixels) / MAX_PIXEL)]
        return json.dumps(results if batch else results[0]).encode() + b"\n", "application/json"

    @staticmethod
    def _result(probabilities: np.ndarray) -> dict[str, object]:
        rounded = [round(float(p), 6) for p in probabilities]
        return {"digit": int(probabilities.argmax()), "probabilities": rounded}

    def _json(self, text: str) -> tuple[bytes, str]:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        batch = _is_batch(doc)
        return self._answer([as_pixels(_pixels_of(item)) for item in (doc if batch else [doc])], batch)

    def _csv(self, text: str) -> tuple[bytes, str]:
        """csv2 rows in, `label,prediction,probability` rows out (label -1 when rows carry none)."""
        labels, rows = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                values = [float(v) for v in line.split(",")]
            except ValueError:
                raise ValueError(f"line {number}: not csv2 numbers (label,pixels...)") from None
            try:
                label, pixels = csv2_row(values)
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
            labels.append(label)
            rows.append(pixels)
        probabilities = self.net.probabilities(np.stack(rows) / MAX_PIXEL)
        out = [f"{label},{p.argmax()},{p.max():.6f}" for label, p in zip(labels, probabilities, strict=True)]
        return ("\n".join(out) + "\n").encode(), "text/csv"


def _is_batch(doc: object) -> bool:
    """A batch is a list of `{"pixels": ...}` objects; a bare array is always one image."""
    return isinstance(doc, list) and bool(doc) and isinstance(doc[0], dict)


def _pixels_of(item: object) -> object:
    if isinstance(item, dict):
        if "pixels" not in item:
            raise ValueError('JSON object without "pixels"')
        return item["pixels"]
    return item
