"""The neural network's pieces shared by the training program and the function: the Spark
session, the workshop's data and split, and a numpy forward pass of the MLeap bundle's weights.

Spark's MultilayerPerceptron (ml.ann) stacks affine layers with sigmoid activations and a
softmax on top. Its weight vector holds, layer after layer, a column-major n_out x n_in
matrix then n_out biases. Scoring one row this way takes microseconds where a Spark
`transform` of one row takes ~200 ms (bench/pyspark.py); tests check both agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from mleap_bundle import BundleError, MLPBundle, read_bundle

HERE = Path(__file__).resolve().parent
DATA = HERE / "sample_multiclass_classification_data.txt"
BUNDLE = HERE / "model.zip"  # the trained PipelineModel as an MLeap bundle: the one model file
LAYERS = [4, 5, 4, 3]
SEED = 1234


def load_bundle(path: Path = BUNDLE) -> MLPBundle:
    """The bundle the function serves, refused (BundleError, one line naming the file) unless its
    MLP maps the data's 4 features to its 3 classes: a network whose sizes agree only with each
    other (mnist's 784-64-10, or 4-5-3 trained on something else) would start and then fail, or
    answer for classes the data does not have."""
    bundle = read_bundle(path)
    if bundle.layers[0] != LAYERS[0] or bundle.layers[-1] != LAYERS[-1]:
        raise BundleError(
            f"{bundle.path}: layers {bundle.layers} do not map {LAYERS[0]} features to {LAYERS[-1]} classes"
        )
    return bundle


def spark_session(master: str | None = None, app: str = "NeuralNet"):  # type: ignore[no-untyped-def]
    from pyspark.sql import SparkSession

    master = master or os.environ.get("SPARK_MASTER", "local[*]")
    builder = (
        SparkSession.builder.master(master)
        .appName(app)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.host", os.environ.get("SPARK_DRIVER_HOST", "127.0.0.1"))
        .config("spark.driver.bindAddress", os.environ.get("SPARK_DRIVER_BIND", "127.0.0.1"))
    )
    return builder.getOrCreate()


def split(spark):  # type: ignore[no-untyped-def]
    """The workshop's data and split: libsvm, randomSplit([0.6, 0.4], seed 1234)."""
    data = spark.read.format("libsvm").load(str(DATA))
    train, test = data.randomSplit([0.6, 0.4], SEED)
    return train, test


class Network:
    """Numpy forward pass of Spark's MLP weights."""

    def __init__(self, layers: list[int], weights: list[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        expected = sum(i * o + o for i, o in zip(layers[:-1], layers[1:], strict=True))
        if len(w) != expected:
            raise ValueError(f"{len(w)} weights for layers {layers}; expected {expected}")
        self.layers = list(layers)
        self.W: list[np.ndarray] = []
        self.b: list[np.ndarray] = []
        offset = 0
        for n_in, n_out in zip(layers[:-1], layers[1:], strict=True):
            self.W.append(w[offset : offset + n_in * n_out].reshape(n_in, n_out).T)
            offset += n_in * n_out
            self.b.append(w[offset : offset + n_out])
            offset += n_out

    @classmethod
    def load(cls, path: Path = BUNDLE) -> Network:
        """The bundle's MLP (BundleError, one line naming the file, when it cannot be served)."""
        bundle = load_bundle(path)
        return cls(bundle.layers, bundle.weights)

    @property
    def n_features(self) -> int:
        return self.layers[0]

    def predict(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rawPrediction, probability, prediction) for rows of shape (n, n_features)."""
        a = rows
        with np.errstate(over="ignore"):  # exp overflow gives 0.0, as in the JVM
            for i, (W, b) in enumerate(zip(self.W, self.b, strict=True)):
                z = a @ W.T + b
                a = z if i == len(self.W) - 1 else 1.0 / (1.0 + np.exp(-z))
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return a, e / e.sum(axis=1, keepdims=True), a.argmax(axis=1).astype(np.float64)
