"""The workshop's neural network as a function, without the per-call waste.

- Empty input: `Test set accuracy = <value>`, computed like the seed (the saved PipelineModel
  loaded into Spark, the workshop's split, Spark's evaluator) but once, when Spark is up.
- JSON input: `{"features": [f1, f2, f3, f4]}`, `{"rows": [[...], ...]}` or `[[...], ...]` ->
  `{"predictions": [{"prediction": k, "probability": [...]}, ...]}` from the numpy forward pass
  of the model's weights (microseconds; no Spark job), available as soon as the process is.
- `"engine": "spark"` scores the rows with Spark's `transform` instead; `"engine": "seed"`
  does what the workshop's handler did on every call (load data and model, transform, evaluate).

SPARK_MASTER picks the cluster (`local[*]` by default, `spark://host:7077`, `k8s://...`).
"""

import json
import logging
import threading

import grpc
import numpy as np
from mlp import MODEL_DIR, Network, spark_session, split

from openfx.errors import InvokeError

log = logging.getLogger("openfx.watcher")
MAX_ROWS = 100_000


class Handler:
    def __init__(self):
        self.network = Network.load()  # the fast path is ready now
        self.spark = None
        self.model = None
        self.accuracy = None
        self.spark_error = None
        threading.Thread(target=self._start_spark, name="spark-start", daemon=True).start()

    def _start_spark(self):
        try:
            from pyspark.ml import PipelineModel
            from pyspark.ml.evaluation import MulticlassClassificationEvaluator

            spark = spark_session()
            model = PipelineModel.load(str(MODEL_DIR))
            _, test = split(spark)
            evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
            self.accuracy = evaluator.evaluate(model.transform(test).select("prediction", "label"))
            self.spark, self.model = spark, model
            log.info("spark ready (%s); test set accuracy %s", spark.sparkContext.master, self.accuracy)
        except Exception as exc:  # reported to callers of the Spark paths, never fatal for the rows path
            self.spark_error = f"{type(exc).__name__}: {exc}"
            log.error("spark failed to start: %s", self.spark_error)

    def _require_spark(self):
        if self.spark is None:
            why = f"failed: {self.spark_error}" if self.spark_error else "is still starting"
            raise InvokeError(
                grpc.StatusCode.UNAVAILABLE, f"Spark {why}; rows are scored without it meanwhile"
            )

    def __call__(self, req):
        text = req.input.decode("utf-8", "strict").strip() if req.input else ""
        if not text:
            self._require_spark()
            return f"Test set accuracy = {self.accuracy}"
        request = _parse(text)
        rows = _rows(request, self.network.n_features)
        engine = request.get("engine", "numpy") if isinstance(request, dict) else "numpy"
        if engine == "numpy":
            _, probability, prediction = self.network.predict(rows)
        elif engine in ("spark", "seed"):
            self._require_spark()
            if engine == "seed":
                return self._seed_design()
            probability, prediction = self._spark_predict(rows)
        else:
            raise ValueError(f"engine must be numpy, spark or seed, not {engine!r}")
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

    def _seed_design(self):
        """What the workshop's handler did per call: read the data, load the model, evaluate."""
        from pyspark.ml import PipelineModel
        from pyspark.ml.evaluation import MulticlassClassificationEvaluator

        _, test = split(self.spark)
        model = PipelineModel.load(str(MODEL_DIR))
        evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
        return "Test set accuracy = " + str(
            evaluator.evaluate(model.transform(test).select("prediction", "label"))
        )


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
