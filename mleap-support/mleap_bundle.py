"""MLeap bundles of Spark's MultilayerPerceptronClassifier: written by the `mleap` package, read
back with zipfile + json, scored by numpy in the functions and by MLeap's own JVM runtime.

One source for both functions: `mleap-support/mleap_bundle.py`, linked into
`functions/pyspark/src/` and `functions/mnist/src/` (a build context copies the file itself), so
each deployable unit carries it while the code exists once.

- `write_bundle` (training time; needs `pip install mleap`): a one-step `pipeline` whose node is a
  `multi_layer_perceptron_classifier` with `layers` (list of long) and `weights` (double tensor),
  ports features -> raw_prediction, probability, prediction, zipped as MLeap's JVM reads it.
  The package has no MLP op and silently drops int lists, writes an int array as a "double"
  tensor of ints and writes NaN, all of which MLeap's JVM refuses, so the serializer's output is
  checked (`check_model`) before it is written and the zip is read back and compared after.
- `read_bundle` (run time; numpy only): the bundle checked field by field, every problem one line
  `BundleError("<file>: <problem>")`, so a function with a bad bundle refuses to start.
- `MleapRuntime`: a JVM of its own running `MleapServer.java` (MLeap 0.16, Scala 2.12; Spark 4's
  JVM is Scala 2.13, so they cannot share one), started once and kept, scoring rows over a pipe.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OP = "multi_layer_perceptron_classifier"
INPUTS = [{"name": "features", "port": "features"}]
OUTPUTS = [
    {"name": "rawPrediction", "port": "raw_prediction"},
    {"name": "probability", "port": "probability"},
    {"name": "prediction", "port": "prediction"},
]
MLEAP_HOME = Path(os.environ.get("MLEAP_HOME", Path(__file__).resolve().parent / "build"))
MAX_BUNDLE_BYTES = 64 * 1024 * 1024


class BundleError(ValueError):
    """A bundle that cannot be served or written, with the file and the problem in one line."""


def n_weights(layers: list[int]) -> int:
    """How many weights Spark's MLP has: per layer an n_out x n_in matrix, then n_out biases."""
    return sum(i * o + o for i, o in zip(layers[:-1], layers[1:], strict=True))


@dataclass(frozen=True)
class MLPBundle:
    path: Path
    name: str
    node: str
    layers: list[int]
    weights: np.ndarray  # float64, Spark's flat layout

    @property
    def n_features(self) -> int:
        return self.layers[0]


# ---- checking (shared by the writer and the reader) ------------------------------------------


def check_model(model: Any) -> tuple[list[int], list[float]]:
    """(layers, weights) of an MLP node's model.json, or ValueError naming what MLeap's JVM would
    refuse: another op, layers missing or not a list of long, weights not a finite double tensor
    of the size the layers need."""
    if not isinstance(model, dict) or model.get("op") != OP:
        op = model.get("op") if isinstance(model, dict) else None
        raise ValueError(f"op is {op!r}, not {OP!r}")
    attributes = model.get("attributes") or {}
    layers_attr = attributes.get("layers")
    if not isinstance(layers_attr, dict) or "long" not in layers_attr:
        raise ValueError("no 'layers' list of long (the mleap package silently drops int lists)")
    layers = layers_attr["long"]
    if (
        layers_attr.get("type") != "list"
        or not isinstance(layers, list)
        or len(layers) < 2
        or not all(type(n) is int and n > 0 for n in layers)
    ):
        raise ValueError(f"'layers' must be a list of at least 2 positive longs, not {layers!r}")
    weights_attr = attributes.get("weights")
    tensor = isinstance(weights_attr, dict) and weights_attr.get("type") == "tensor"
    if not tensor or "double" not in weights_attr:
        raise ValueError("no 'weights' double tensor")
    weights = weights_attr["double"]
    if not isinstance(weights, list) or not all(type(w) is float for w in weights):
        bad = weights if not isinstance(weights, list) else next(w for w in weights if type(w) is not float)
        raise ValueError(f"'weights' holds {bad!r}, not a double (an int array is written as ints)")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError("'weights' holds NaN or infinity (not valid JSON for MLeap's JVM)")
    dims = [d.get("size") for d in (weights_attr.get("shape") or {}).get("dimensions", [])]
    if dims != [len(weights)]:
        raise ValueError(f"'weights' shape {dims} does not match its {len(weights)} values")
    if len(weights) != n_weights(layers):
        raise ValueError(f"{len(weights)} weights for layers {layers}; expected {n_weights(layers)}")
    return layers, weights


# ---- reading ----------------------------------------------------------------------------------


def read_bundle(path: str | Path) -> MLPBundle:
    """The one MLP of a pipeline bundle (a zip, or its unzipped directory), checked."""
    path = Path(path)
    try:
        files = _bundle_files(path)
        bundle = _json(files, "bundle.json")
        if bundle.get("format") != "json":
            raise ValueError(f"bundle.json format is {bundle.get('format')!r}; only 'json' is served")
        root = _json(files, "root/model.json")
        if root.get("op") != "pipeline":
            raise ValueError(f"root op is {root.get('op')!r}, not 'pipeline'")
        nodes = ((root.get("attributes") or {}).get("nodes") or {}).get("string")
        if not isinstance(nodes, list) or len(nodes) != 1 or not isinstance(nodes[0], str):
            raise ValueError(f"the pipeline must hold exactly one node, not {nodes!r}")
        layers, weights = check_model(_json(files, f"root/{nodes[0]}.node/model.json"))
        shape = _json(files, f"root/{nodes[0]}.node/node.json").get("shape") or {}
        ports = {p.get("port") for p in shape.get("inputs", []) + shape.get("outputs", [])}
        if not {"features", "prediction", "probability"} <= ports:
            raise ValueError(f"node {nodes[0]} lacks the features/probability/prediction ports")
    except ValueError as exc:
        raise BundleError(f"{path}: {exc}") from None
    return MLPBundle(path, str(bundle.get("name", "")), nodes[0], layers, np.asarray(weights, np.float64))


def _bundle_files(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        found = [f for f in path.rglob("*.json") if f.stat().st_size < MAX_BUNDLE_BYTES]
        return {str(f.relative_to(path)): f.read_bytes() for f in found}
    if not path.is_file():
        raise ValueError("no such bundle (train the model first)")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if i.filename.endswith(".json")]
            if sum(i.file_size for i in infos) > MAX_BUNDLE_BYTES:
                raise ValueError(f"bundle over {MAX_BUNDLE_BYTES} bytes unpacked")
            return {i.filename: archive.read(i) for i in infos}
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ValueError(f"not a readable zip ({exc})") from None


def _json(files: dict[str, bytes], name: str) -> dict[str, Any]:
    if name not in files:
        raise ValueError(f"no {name} (not an MLeap bundle)")
    try:
        doc = json.loads(files[name], parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{name} is not a JSON object")
    return doc


def _no_constant(name: str) -> float:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


# ---- writing (training time) ------------------------------------------------------------------


def write_bundle(path: str | Path, layers: list[int], weights: Any, name: str) -> MLPBundle:
    """Write `path` (a .zip) with the mleap package's serializers; the result is read back and
    must equal what was given, bit for bit, or nothing is written."""
    from mleap.bundle.serialize import MLeapSerializer
    from mleap.sklearn import pipeline as _  # noqa: F401  (gives sklearn's Pipeline its bundle methods)
    from sklearn.pipeline import Pipeline

    class MLPStep(MLeapSerializer):
        """The node MLeap's MultiLayerPerceptronClassifierOp reads (the package has no MLP op)."""

        op = OP
        serializable = True

        def __init__(self) -> None:
            super().__init__()
            self.name = f"MultilayerPerceptronClassifier_{name}"

        def serialize_to_bundle(self, folder: str, model_name: str) -> None:
            self.serialize(self, folder, model_name, [("weights", weights)], INPUTS, OUTPUTS)

        def get_mleap_model(self, transformer: Any, attributes_to_serialize: Any = None) -> dict[str, Any]:
            model = super().get_mleap_model(transformer, attributes_to_serialize)
            # the package writes no list of long; MLeap's op reads layers as one
            model["attributes"]["layers"] = {"type": "list", "long": [int(n) for n in layers]}
            try:
                check_model(model)
            except ValueError as exc:
                raise BundleError(f"{path}: refusing to write: {exc}") from None
            return model

    path = Path(path)
    pipeline = Pipeline([("mlp", MLPStep())])
    pipeline.name = f"PipelineModel_{name}"
    with tempfile.TemporaryDirectory() as tmp:
        pipeline.serialize_to_bundle(tmp, pipeline.name, init=True)
        written = read_bundle(Path(tmp) / f"{pipeline.name}.zip")
        if written.layers != list(layers) or not np.array_equal(
            written.weights, np.asarray(weights, np.float64)
        ):
            raise BundleError(f"{path}: the bundle read back differs from the model given")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(tmp) / f"{pipeline.name}.zip", path)
    return read_bundle(path)


def spark_model(spark: Any, bundle: MLPBundle) -> Any:
    """Spark's own MultilayerPerceptronClassificationModel with the bundle's weights, for comparing
    Spark's `transform` with MLeap's: fitting with maxIter=0 from initialWeights keeps them as given
    (checked here), so no second, Spark-format copy of the model is kept."""
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.linalg import Vectors

    # fit needs the JVM thread's active session, which a Python thread other than the one that
    # created the session lacks (py4j pins each Python thread to a JVM thread of its own)
    spark._jvm.org.apache.spark.sql.SparkSession.setActiveSession(spark._jsparkSession)
    one_row = spark.createDataFrame([(0.0, Vectors.dense([0.0] * bundle.n_features))], ["label", "features"])
    mlp = MultilayerPerceptronClassifier(
        layers=bundle.layers, maxIter=0, initialWeights=Vectors.dense(bundle.weights.tolist())
    )
    model = mlp.fit(one_row)
    if not np.array_equal(model.weights.toArray(), bundle.weights):
        raise BundleError(f"{bundle.path}: Spark changed the weights while building its model")
    return model


# ---- MLeap's JVM runtime ----------------------------------------------------------------------


class MleapRuntime:
    """MLeap's JVM runtime (`MleapServer`) in a helper process: started once, kept, one request at
    a time over stdin/stdout. Classpath: only MLeap's jars (MLEAP_HOME/jars) and the helper."""

    def __init__(self, home: Path = MLEAP_HOME, java: str = "java") -> None:
        jars, classes = home / "jars", home / "classes" / "openfx" / "mleap" / "MleapServer.class"
        if not classes.is_file() or not any(jars.glob("mleap-runtime_*.jar")):
            raise RuntimeError(f"MLeap's runtime is not built in {home} (run scripts/fetch-mleap)")
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [java, "-XX:+UseSerialGC", "-cp", f"{home / 'classes'}:{jars}/*", "openfx.mleap.MleapServer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if self._readline() != "READY":
            raise RuntimeError("MLeap's runtime did not start")
        self.n_features = 0

    def _readline(self) -> str:
        assert self._proc.stdout is not None
        return self._proc.stdout.readline().strip()

    def _ask(self, line: str) -> list[str]:
        assert self._proc.stdin is not None
        with self._lock:
            if self._proc.poll() is not None:
                raise RuntimeError(f"MLeap's runtime exited ({self._proc.returncode})")
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
            answer = self._readline()
        if not answer.startswith("OK"):
            raise RuntimeError(f"MLeap's runtime: {answer.removeprefix('ERR ') or 'no answer'}")
        return answer.split()[1:]

    def load(self, bundle: str | Path) -> float:
        """Load a bundle (replacing the last one); the JVM's own load time in seconds."""
        if not Path(bundle).exists():
            raise RuntimeError(f"{bundle}: no such bundle")
        nanos, size = self._ask(f"LOAD {Path(bundle).resolve()}")
        self.n_features = int(size)
        return int(nanos) / 1e9

    def score(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probability, prediction) for rows of shape (n, n_features), by MLeap's transform."""
        rows = np.atleast_2d(np.asarray(rows, np.float64))
        values = " ".join(repr(float(v)) for v in rows.ravel())
        out = self._ask(f"SCORE {len(rows)} {values}")
        k = int(out[0])
        table = np.asarray(out[1:], dtype=np.float64).reshape(len(rows), k + 1)
        return table[:, 1:], table[:, 0]

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> MleapRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
