"""The digit model's pieces shared by training (Spark executors), batch inference and the function.

The network is the one Spark MLlib's MultilayerPerceptronClassifier builds: affine layers with
sigmoid activations and a softmax on top, weights in MLlib's flat layout (per layer a
column-major n_out x n_in matrix, then n_out biases). The per-partition trainers use the same
layout, so an averaged model, MLlib's model and the function all share one forward pass.

Pixels are MNIST's: 28x28 gray levels 0..255, light ink on black, the digit size-normalised
into 20x20 and centred by mass. `image_pixels` turns any PNG/JPEG of a digit into that form.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

SIDE = 28  # MNIST: 28x28 gray pixels 0..255, light ink on black
BOX = 20  # MNIST's digits were scaled into a 20x20 box, then centred by mass in 28x28
N_PIXELS = SIDE * SIDE
N_SMALL = 64  # the 8x8 UCI digits (refused, with a message saying what to send)
N_CLASSES = 10
MAX_PIXEL = 255.0
LEARNING_RATE = 0.1  # the trainers' SGD (momentum 0.9, mini-batches of 16)
MODELS = Path(__file__).resolve().parent / "models"  # <name>.zip MLeap bundles + index.json
MAX_IMAGE_PIXELS = int(os.environ.get("MNIST_MAX_PIXELS", str(40_000_000)))
# imdecode refuses images over this many pixels (decompression bombs); read when cv2 is imported
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
WORKING_SIDE = 512  # larger uploads are shrunk first: a 20x20 box needs no more


def layer_shapes(layers: list[int]) -> list[tuple[int, int]]:
    return list(zip(layers[:-1], layers[1:], strict=True))


def n_weights(layers: list[int]) -> int:
    return sum(i * o + o for i, o in layer_shapes(layers))


class Network:
    """An MLlib-layout multilayer perceptron: forward pass, and mini-batch SGD for the trainers."""

    def __init__(self, layers: list[int], weights: Iterable[float]) -> None:
        flat = np.asarray(list(weights) if not isinstance(weights, np.ndarray) else weights, np.float64)
        if len(flat) != n_weights(layers):
            raise ValueError(f"{len(flat)} weights for layers {layers}; expected {n_weights(layers)}")
        self.layers = list(layers)
        self.W: list[np.ndarray] = []
        self.b: list[np.ndarray] = []
        offset = 0
        for n_in, n_out in layer_shapes(layers):
            self.W.append(flat[offset : offset + n_in * n_out].reshape(n_in, n_out).T.copy())
            offset += n_in * n_out
            self.b.append(flat[offset : offset + n_out].copy())
            offset += n_out

    @classmethod
    def initial(cls, layers: list[int], seed: int) -> Network:
        """Small random weights; every trainer starts from the same ones, so averaging is meaningful."""
        rng = np.random.default_rng(seed)
        parts = []
        for n_in, n_out in layer_shapes(layers):
            scale = np.sqrt(6.0 / (n_in + n_out))
            parts += [rng.uniform(-scale, scale, n_in * n_out), np.zeros(n_out)]
        return cls(layers, np.concatenate(parts))

    def flat(self) -> np.ndarray:
        return np.concatenate([p for W, b in zip(self.W, self.b, strict=True) for p in (W.T.ravel(), b)])

    def _activations(self, rows: np.ndarray) -> list[np.ndarray]:
        out = [rows]
        with np.errstate(over="ignore"):  # exp overflow gives 0.0, as in the JVM
            for i, (W, b) in enumerate(zip(self.W, self.b, strict=True)):
                z = out[-1] @ W.T + b
                out.append(z if i == len(self.W) - 1 else 1.0 / (1.0 + np.exp(-z)))
        return out

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities for rows of shape (n, n_inputs) (features scaled to 0..1)."""
        z = self._activations(np.atleast_2d(rows))[-1]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return self.probabilities(rows).argmax(axis=1)

    def accuracy(self, rows: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(rows) == labels).mean()) if len(labels) else 0.0

    def fit(
        self, rows: np.ndarray, labels: np.ndarray, epochs: int, lr: float, batch: int, seed: int
    ) -> Network:
        """Mini-batch SGD with momentum on softmax cross-entropy; trains in place."""
        rng = np.random.default_rng(seed)
        onehot = np.eye(self.layers[-1])[labels.astype(int)]
        velocity = [(np.zeros_like(W), np.zeros_like(b)) for W, b in zip(self.W, self.b, strict=True)]
        for _ in range(epochs):
            order = rng.permutation(len(rows))
            for start in range(0, len(rows), batch):
                idx = order[start : start + batch]
                acts = self._activations(rows[idx])
                z = acts[-1]
                e = np.exp(z - z.max(axis=1, keepdims=True))
                delta = (e / e.sum(axis=1, keepdims=True) - onehot[idx]) / len(idx)
                for layer in range(len(self.W) - 1, -1, -1):
                    grad_W, grad_b = delta.T @ acts[layer], delta.sum(axis=0)
                    if layer:
                        a = acts[layer]
                        delta = (delta @ self.W[layer]) * a * (1.0 - a)
                    vW, vb = velocity[layer]
                    vW *= 0.9
                    vW -= lr * grad_W
                    vb *= 0.9
                    vb -= lr * grad_b
                    self.W[layer] += vW
                    self.b[layer] += vb
        return self


def average(models: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """The aggregator: weights averaged, each model weighted by the rows it was trained on."""
    total = sum(count for count, _ in models)
    return sum(count / total * weights for count, weights in models)  # type: ignore[return-value]


def load_shard(index: int, lines: Iterator[str]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """A partition of csv2 lines -> one (index, labels, features 0..1) shard (runs in a Spark task;
    the result is cached, so every averaging round trains on parsed arrays)."""
    rows = [parse_csv2(line) for line in lines if line.strip()]
    if rows:
        labels = np.array([label for label, _ in rows], dtype=np.int64)
        yield index, labels, np.array([p for _, p in rows], dtype=np.float64) / MAX_PIXEL


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of 28x28 digits (0..1), each moved by a small random affine map: rotation up to 18
    degrees, shear up to 0.45, scale 0.85..1.15, shift up to 2 pixels. Handwriting slants and
    wanders; the trainers see a fresh variant of every digit each round, so upright printed or
    off-centre digits are read too."""
    import cv2

    out = np.empty_like(images)
    for i, image in enumerate(images):
        angle, shear, scale = rng.uniform(-18, 18), rng.uniform(-0.45, 0.45), 1 + rng.uniform(-0.15, 0.15)
        m = cv2.getRotationMatrix2D((13.5, 13.5), angle, scale)
        m[0, 1] += shear
        m[0, 2] -= shear * 13.5
        m[:, 2] += rng.uniform(-2.25, 2.25, 2)
        out[i] = cv2.warpAffine(image.reshape(SIDE, SIDE), m, (SIDE, SIDE), flags=cv2.INTER_LINEAR).ravel()
    return out


def train_partition(
    shards: Iterator[tuple[int, np.ndarray, np.ndarray]],
    layers: list[int],
    start: np.ndarray,
    epochs: int,
    seed: int,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """One trainer for one averaging round (a Spark task): starts from the driver's current weights,
    runs `epochs` of SGD over its partition's rows only (augmented afresh); (partition, row count,
    weights) out."""
    for index, labels, features in shards:
        rng = np.random.default_rng(seed + index)
        net = Network(layers, start).fit(
            augment(features, rng), labels, epochs, lr=LEARNING_RATE, batch=16, seed=seed + index
        )
        yield index, len(labels), net.flat()


# ---- the served model file -------------------------------------------------------------------


def save_models(
    folder: Path, models: dict[str, tuple[list[int], np.ndarray, dict[str, object]]], serve: str
) -> None:
    """Each model as an MLeap bundle `<name>.zip` (the weights live there only), and `index.json`:
    which one to serve and what training said about each (accuracy, rows, partitions)."""
    from mleap_bundle import write_bundle  # here, not at the top: Spark executors import this module

    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"serve": serve, "models": {}}
    for name, (layers, weights, meta) in models.items():
        write_bundle(folder / f"{name}.zip", layers, weights, f"mnist_{name}")
        index["models"][name] = {"bundle": f"{name}.zip", **meta}  # type: ignore[index]
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")


def load_model(folder: Path = MODELS, name: str = "") -> tuple[str, Network, dict[str, object]]:
    """(name, network, metadata) of the model to serve: `name`, else the index's `serve` choice.
    A broken bundle raises BundleError, one line naming the file and the problem."""
    from mleap_bundle import BundleError, read_bundle

    index = json.loads((folder / "index.json").read_text())
    name = name or index["serve"]
    if name not in index["models"]:
        raise ValueError(
            f"{folder / 'index.json'} has no model {name!r}; it has {', '.join(index['models'])}"
        )
    meta = index["models"][name]
    bundle = read_bundle(folder / meta["bundle"])
    if bundle.layers[0] != N_PIXELS or bundle.layers[-1] != N_CLASSES:
        raise BundleError(
            f"{bundle.path}: layers {bundle.layers} do not map {N_PIXELS} pixels to {N_CLASSES} digits"
        )
    return name, Network(bundle.layers, bundle.weights), meta


# ---- images -> pixels ------------------------------------------------------------------------


def image_pixels(data: bytes) -> np.ndarray:
    """A PNG/JPEG of one digit, any size, dark-on-light or light-on-dark, as MNIST's 784 pixels."""
    import cv2

    # a bad upload is answered with INVALID_ARGUMENT; libpng need not log it too
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        raise ValueError(f"image over the limit of {MAX_IMAGE_PIXELS} pixels (MNIST_MAX_PIXELS)") from None
    if image is None:
        raise ValueError("not a PNG or JPEG image (or a truncated one)")
    h, w = image.shape[:2]
    if max(h, w) > WORKING_SIDE:  # before the float copy: a phone photo would need ~300 MB
        f = WORKING_SIDE / max(h, w)
        image = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    gray = _gray(image.astype(np.float64) / (65535.0 if image.dtype == np.uint16 else 255.0))
    return mnist_pixels(gray)


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    color = image[..., :3].mean(axis=2)
    if image.shape[2] == 4:  # transparent background: composite onto white
        alpha = image[..., 3]
        return color * alpha + (1.0 - alpha)
    return color


def mnist_pixels(gray: np.ndarray) -> np.ndarray:
    """Gray levels 0..1 of any size -> 784 pixels 0..255 made the way MNIST's were: light ink on
    black (polarity decided by the border), the ink's bounding box scaled (aspect kept, anti-aliased)
    into a 20x20 box, placed in 28x28 with its centre of mass at the centre."""
    import cv2

    if gray.shape[0] < 4 or gray.shape[1] < 4:
        raise ValueError(f"image of {gray.shape[1]}x{gray.shape[0]} pixels is too small for a digit")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = background - gray if background > 0.5 else gray - background
    ink = np.clip(ink, 0.0, None)
    peak = float(ink.max())
    if peak < 0.15:
        raise ValueError("no digit found: the image has no contrast")
    ink /= peak
    ink[ink < 0.1] = 0.0  # paper texture, JPEG noise
    ys, xs = np.nonzero(ink)
    box = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = box.shape
    scale = BOX / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.clip(cv2.resize(box, (new_w, new_h), interpolation=cv2.INTER_AREA), 0.0, 1.0)
    mass = resized.sum()
    cy = (resized.sum(axis=1) @ np.arange(new_h)) / mass
    cx = (resized.sum(axis=0) @ np.arange(new_w)) / mass
    top = int(np.clip(round(SIDE / 2 - 0.5 - cy), 0, SIDE - new_h))
    left = int(np.clip(round(SIDE / 2 - 0.5 - cx), 0, SIDE - new_w))
    canvas = np.zeros((SIDE, SIDE))
    canvas[top : top + new_h, left : left + new_w] = resized
    return np.round(canvas.ravel() * MAX_PIXEL)


UCI_REFUSED = (
    "64 values are the 8x8 UCI digits, which this model does not read: "
    "send MNIST's 784 pixels (28x28, 0..255), or an image"
)


def as_pixels(values: object) -> np.ndarray:
    """A JSON array of pixels: MNIST's 784 values 0..255 (flat or 28 rows of 28), used as they are;
    any other gray image (rows, or flat when square; 0..255 or 0..1) is preprocessed like an upload."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("pixels must be an array of numbers (flat or rows)") from None
    if not np.all(np.isfinite(array)) or array.size == 0:
        raise ValueError("pixels must be finite numbers")
    if array.size == N_SMALL:
        raise ValueError(UCI_REFUSED)
    if array.size == N_PIXELS and array.ndim in (1, 2) and array.shape[-1] in (SIDE, N_PIXELS):
        if array.min() < 0 or array.max() > MAX_PIXEL:
            raise ValueError("MNIST pixels are 0..255")
        return array.ravel()
    side = int(round(array.size**0.5))
    if array.ndim == 2:
        gray = array
    elif array.ndim == 1 and side * side == array.size:
        gray = array.reshape(side, side)
    else:
        raise ValueError(
            f"{array.size} pixels: send 784 (28x28, 0..255), rows of an image, or a flat square one"
        )
    return mnist_pixels(gray / 255.0 if gray.max() > 1.0 else gray)


def csv2_row(values: list[float]) -> tuple[int, np.ndarray]:
    """One csv2 row (the seeds' layout): `label,784 pixels` or the 784 pixels alone.
    Label -1 when the row has none."""
    n = len(values)
    if n in (N_SMALL, N_SMALL + 1):
        raise ValueError(UCI_REFUSED)
    if n == N_PIXELS:
        return -1, as_pixels(values)
    if n == N_PIXELS + 1:
        return int(values[0]), as_pixels(values[1:])
    raise ValueError(f"{n} values: a csv2 row is a label + {N_PIXELS} pixels (28x28 MNIST, 0..255)")


def parse_csv2(line: str) -> tuple[int, list[float]]:
    """A line of the csv2 files train.py writes: (label, 784 pixels). Runs in Spark tasks."""
    values = line.split(",")
    return int(values[0]), [float(v) for v in values[1:]]
