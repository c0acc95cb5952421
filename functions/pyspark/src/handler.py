"""The workshop's neural network as a function, served from its MLeap bundle (src/model.zip).

- At start the bundle is read once (zipfile + json, checked: a missing, truncated or foreign
  zip, another op, wrong sizes or an MLP not mapping 4 features to 3 classes stop the function
  with one line naming the file and the problem). Rows are answered from it at once by a numpy forward pass.
- Meanwhile, in the background, MLeap's own JVM runtime (a JVM of its own, only MLeap's jars)
  loads the same bundle and Spark starts (`SPARK_MASTER`: `local[*]` by default,
  `spark://host:7077`, `k8s://...`). Then the seed's accuracy is computed once: Spark reads the
  libsvm data and splits it with seed 1234, MLeap's runtime scores the test rows, and Spark's
  MulticlassClassificationEvaluator gives `Test set accuracy = <value>`. A call that needs the JVMs
  while they start waits for them within its own time (a cold start from zero: README "Scaling"),
  and is UNAVAILABLE only if they are still starting when that runs out, or failed.
- JSON input: `{"features": [f1, f2, f3, f4]}`, `{"rows": [[...], ...]}` or `[[...], ...]` ->
  `{"predictions": [{"prediction": k, "probability": [...]}, ...]}`. `"engine"` picks who
  scores: `numpy` (default), `mleap` (MLeap's JVM runtime), `spark` (Spark's `transform` of an
  MLlib model holding the bundle's weights), `seed` (what the workshop's handler did per call:
  read and split the data, load the bundle, score, evaluate; answers the accuracy line).
"""

import json
import logging
import threading

import grpc
import numpy as np
from mleap_bundle import MleapRuntime, spark_model
from mlp import BUNDLE, Network, load_bundle, spark_session, split

from openfx import hops
from openfx.errors import InvokeError

log = logging.getLogger("openfx.watcher")
MAX_ROWS = 100_000
ENGINES = ("numpy", "mleap", "spark", "seed")


class Handler:
    def __init__(self):
        self.bundle = load_bundle(BUNDLE)  # BundleError here is the watcher's one-line load error
        self.network = Network(self.bundle.layers, self.bundle.weights)  # the fast path is ready now
        self.runtime = None  # MLeap's JVM runtime, kept for the replica's life
        self.spark = None
        self.model = None
        self.accuracy = None
        self.spark_error = None
        self.engines_done = threading.Event()  # set once the JVMs are up, or failed
        threading.Thread(target=self._start_engines, name="engines-start", daemon=True).start()

    def _start_engines(self):
        try:
            runtime = MleapRuntime()
            runtime.load(self.bundle.path)
            self.runtime = runtime
            spark = spark_session()
            accuracy = self._evaluate(spark)
            self.model = spark_model(spark, self.bundle)
            self.spark, self.accuracy = spark, accuracy  # ready together
            log.info("spark ready (%s); test set accuracy %s", spark.sparkContext.master, self.accuracy)
        except Exception as exc:  # reported to callers of the JVM paths, never fatal for the rows path
            self.spark_error = f"{type(exc).__name__}: {exc}"
            log.error("spark/MLeap failed to start: %s", self.spark_error)
        finally:
            self.engines_done.set()

    def _evaluate(self, spark):
        """The seed's accuracy: Spark's data and split, MLeap's predictions, Spark's evaluator."""
        from pyspark.ml.evaluation import MulticlassClassificationEvaluator

        _, test = split(spark)
        rows = test.select("features", "label").collect()
        _, prediction = self.runtime.score(np.array([r.features.toArray() for r in rows]))
        pairs = [(float(p), float(r.label)) for p, r in zip(prediction, rows, strict=True)]
        scored = spark.createDataFrame(pairs, ["prediction", "label"])
        return MulticlassClassificationEvaluator(metricName="accuracy").evaluate(scored)

    def _require_spark(self, req):
        """Spark and MLeap's runtime, waiting for them while they start for as long as the call may
        (its Timeout, the time left of its deadline, less a second to answer in)."""
        if self.spark is None and self.spark_error is None:
            self.engines_done.wait(max((hops.parse_timeout(req.info.Timeout) or 0.0) - 1.0, 0.0))
        if self.spark is None:
            why = f"failed: {self.spark_error}" if self.spark_error else "is still starting"
            raise InvokeError(
                grpc.StatusCode.UNAVAILABLE, f"Spark {why}; rows are scored without it meanwhile"
            )

    def __call__(self, req):
        text = req.input.decode("utf-8", "strict").strip() if req.input else ""
        if not text:
            self._require_spark(req)
            return f"Test set accuracy = {self.accuracy}"
        request = _parse(text)
        rows = _rows(request, self.network.n_features)
        engine = request.get("engine", "numpy") if isinstance(request, dict) else "numpy"
        if engine not in ENGINES:
            raise ValueError(f"engine must be {', '.join(ENGINES)}, not {engine!r}")
        if engine == "numpy":
            _, probability, prediction = self.network.predict(rows)
        else:
            self._require_spark(req)
            if engine == "seed":
                self.runtime.load(self.bundle.path)  # as the seed deserialized its bundle per call
                return f"Test set accuracy = {self._evaluate(self.spark)}"
            probability, prediction = (
                self.runtime.score(rows) if engine == "mleap" else self._spark_predict(rows)
            )
        return json.dumps(
            {
                "predictions": [
                    {"prediction": int(p), "probability": [float(x) for x in probs]}
                    for p, probs in zip(prediction, probability, strict=True)
                ]
            }
        )

    def _spark_predict(self, rows):
        from pyspark.ml.linalg import Vectors

        df = self.spark.createDataFrame([(Vectors.dense(r.tolist()),) for r in rows], ["features"])
        out = self.model.transform(df).select("probability", "prediction").collect()
        return np.array([r.probability.toArray() for r in out]), np.array([r.prediction for r in out])


def _parse(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"input must be empty or JSON: {exc.msg} at column {exc.colno}") from None


def _rows(request, n_features):
    if request == {} or (isinstance(request, dict) and set(request) == {"engine"}):
        raise ValueError('give "features" (one row) or "rows" (a list of rows)')
    if isinstance(request, dict):
        if "features" in request:
            rows = [request["features"]]
        elif "rows" in request:
            rows = request["rows"]
        else:
            raise ValueError('JSON input needs "features" (one row) or "rows" (a list of rows)')
    else:
        rows = request
    if not isinstance(rows, list) or not rows:
        raise ValueError("rows must be a non-empty list of feature lists")
    if len(rows) > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} rows per call")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != n_features:
            raise ValueError(f"row {i}: expected a list of {n_features} numbers")
        for value in row:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"row {i}: {value!r} is not a number")
    array = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError("features must be finite numbers")
    return array
