"""pyspark (the workshop's neural network): the MLeap bundle written through the mleap package
(its traps refused), loaded and scored by MLeap's own JVM runtime with the same predictions as the
numpy fast path and Spark's transform, reproducible by the training program, refused with one
line when broken; accuracy as the seed computes it, a real Spark standalone cluster (master +
worker on 127.0.0.1), and the gateway paths."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from openfx.errors import InvokeError
from openfx.watcher.loader import load_handler
from tests.conftest import ROOT, RunningGateway
from tests.functions.conftest import Req, call
from tests.functions.mleap_helpers import BROKEN, assert_same_predictions, bad_bundles, load_error
from tests.spark_cluster import standalone_cluster

FN = ROOT / "functions/pyspark"
ACCURACY = "Test set accuracy = 0.9523809523809523"  # Spark 4.1 (the seed's 0.9019... was Spark 2.4.5)
sys.path.insert(0, str(FN / "src"))

from mleap_bundle import BundleError, MleapRuntime, check_model, read_bundle, spark_model, write_bundle  # noqa: E402
from mlp import BUNDLE, Network, spark_session, split  # noqa: E402


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    session = spark_session("local[2]", app="tests")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def runtime() -> Iterator[MleapRuntime]:
    """MLeap's JVM runtime; set-up builds it, and its absence fails (never skips) these tests."""
    with MleapRuntime() as rt:
        yield rt


def spark_predict(spark, model, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    from pyspark.ml.linalg import Vectors

    df = spark.createDataFrame([(Vectors.dense(r.tolist()),) for r in rows], ["features"])
    out = model.transform(df).select("probability", "prediction").collect()
    return np.array([r.probability.toArray() for r in out]), np.array([r.prediction for r in out])


def test_mleap_runtime_equals_numpy_and_spark_transform(spark, runtime: MleapRuntime) -> None:  # type: ignore[no-untyped-def]
    bundle = read_bundle(BUNDLE)
    assert bundle.layers == [4, 5, 4, 3] and bundle.weights.shape == (64,)
    assert runtime.load(BUNDLE) > 0 and runtime.n_features == 4  # MLeap itself loads the committed bundle
    net = Network.load()
    model = spark_model(spark, bundle)
    _, test = split(spark)
    test_rows = np.array([r.features.toArray() for r in test.select("features").collect()])
    assert len(test_rows) == 63
    rng = np.random.default_rng(7)
    for rows in (test_rows, rng.uniform(-1, 1, (1000, 4)), rng.uniform(-3, 3, (1000, 4))):
        mleap = runtime.score(rows)
        _, fast_probability, fast_prediction = net.predict(rows)
        assert_same_predictions(mleap, (fast_probability, fast_prediction))
        assert_same_predictions(mleap, spark_predict(spark, model, rows))


def test_export_refuses_the_mleap_package_traps(tmp_path: Path) -> None:
    """The package drops an int list, writes an int array as a 'double' tensor of ints and writes
    NaN; MLeap's JVM refuses all three, so the export must fail instead of writing them."""
    from mleap.bundle.serialize import MLeapSerializer

    class Step:
        op = "multi_layer_perceptron_classifier"

    weights = read_bundle(BUNDLE).weights
    raw = MLeapSerializer().get_mleap_model(Step(), [("layers", [4, 5, 4, 3]), ("weights", weights)])
    assert "layers" not in raw["attributes"]  # the trap is real: the int list vanished
    with pytest.raises(ValueError, match="silently drops int lists"):
        check_model(raw)
    target = tmp_path / "model.zip"
    with pytest.raises(BundleError, match="not a double"):
        write_bundle(target, [4, 5, 4, 3], np.arange(64), "ints")
    nan = weights.copy()
    nan[3] = np.nan
    with pytest.raises(BundleError, match="NaN"):
        write_bundle(target, [4, 5, 4, 3], nan, "nan")
    with pytest.raises(BundleError, match="64 weights for layers"):
        write_bundle(target, [4, 5, 3], weights, "sizes")
    assert not target.exists()
    written = write_bundle(target, [4, 5, 4, 3], weights, "ok")
    assert written.layers == [4, 5, 4, 3] and np.array_equal(written.weights, weights)


# a valid MLP bundle of another model: its sizes agree with each other, not with this data
FOREIGN_MLP = (ROOT / "functions/mnist/src/models/averaged.zip", "do not map 4 features to 3 classes")


@pytest.mark.parametrize("case", [*BROKEN, "foreign MLP"])
def test_broken_bundle_stops_the_function_with_one_line(case: str, tmp_path: Path) -> None:
    bad, problem = {**bad_bundles(BUNDLE, tmp_path / "bad"), "foreign MLP": FOREIGN_MLP}[case]
    message = load_error(FN / "src", "model.zip", bad, tmp_path)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("Handler.__init__ failed: BundleError: <bundle>: ") and problem in message


def test_handler_accuracy_and_rows(spark) -> None:  # type: ignore[no-untyped-def]
    handler = load_handler(FN / "src/handler.py")
    one = json.loads(handler(Req(b'{"features": [-0.22, 0.83, -0.86, -0.92]}')))
    assert (
        one["predictions"][0]["prediction"] == 1
        and abs(sum(one["predictions"][0]["probability"]) - 1) < 1e-12
    )
    deadline = time.monotonic() + 120
    while handler.accuracy is None and handler.spark_error is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert handler(Req(b"")) == ACCURACY
    assert handler(Req(b"\n")) == ACCURACY  # what `echo "" | openfx-cli fn call pyspark` sends
    rows = [[0.1, 0.2, -0.3, 0.4], [-0.5, 0.5, -0.5, 0.5]]
    fast = json.loads(handler(Req(json.dumps({"rows": rows}).encode())))
    slow = json.loads(handler(Req(json.dumps({"rows": rows, "engine": "spark"}).encode())))
    jvm = json.loads(handler(Req(json.dumps({"rows": rows, "engine": "mleap"}).encode())))
    assert [p["prediction"] for p in fast["predictions"]] == [p["prediction"] for p in slow["predictions"]]
    assert [p["prediction"] for p in fast["predictions"]] == [p["prediction"] for p in jvm["predictions"]]
    assert handler(Req(b'{"rows": [[0,0,0,0]], "engine": "seed"}')) == ACCURACY


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "input must be empty or JSON"),
        (b'{"features": [1, 2, 3]}', "row 0: expected a list of 4 numbers"),
        (b'{"rows": [[1, 2, 3, "x"]]}', "'x' is not a number"),
        (b'{"rows": [[1, 2, 3, true]]}', "True is not a number"),
        (b'{"rows": []}', "non-empty list"),
        (b'{"other": 1}', '"features"'),
        (b"[[1e999, 0, 0, 0]]", "finite"),
        (b'{"features": [1, 2, 3, 4], "engine": "gpu"}', "engine must be numpy, mleap, spark, seed"),
        (b"\xff", "utf-8"),
    ],
)
def test_bad_input_is_value_error(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fast_handler()(Req(data))


def fast_handler():  # type: ignore[no-untyped-def]
    """The handler without its Spark start (input validation and the fast path need none)."""
    handler_cls = _handler_module().Handler
    handler = handler_cls.__new__(handler_cls)
    handler.bundle = read_bundle(BUNDLE)
    handler.network = Network(handler.bundle.layers, handler.bundle.weights)
    handler.runtime = handler.spark = handler.model = handler.accuracy = handler.spark_error = None
    handler.engines_done = threading.Event()  # never set: the JVMs are "still starting"
    return handler


def _handler_module():  # type: ignore[no-untyped-def]
    """A fresh copy of the handler's module, whose names a test may replace."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pyspark_handler_under_test", FN / "src/handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_accuracy_line_comes_from_mleaps_runtime(spark) -> None:  # type: ignore[no-untyped-def]
    """numpy or Spark's transform would print the same 0.952..., so the line alone proves nothing:
    a runtime that records the rows it scores and moves every predicted class on by one must be
    given exactly Spark's 63 test rows and change the line to what the moved classes score."""
    module = _handler_module()
    asked: list[np.ndarray] = []

    class MovedRuntime(module.MleapRuntime):
        def score(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            asked.append(np.array(rows))
            probability, prediction = super().score(rows)
            return probability, (prediction + 1) % 3

    module.MleapRuntime = MovedRuntime
    handler = module.Handler()  # its Spark is the fixture's session (getOrCreate)
    try:
        assert handler.engines_done.wait(180) and handler.spark_error is None, handler.spark_error
        test = split(spark)[1].select("features", "label").collect()
        features = np.array([r.features.toArray() for r in test])
        labels = np.array([r.label for r in test])
        assert len(asked) == 1 and np.array_equal(asked[0], features)
        moved = (Network.load().predict(features)[2] + 1) % 3
        expected = f"Test set accuracy = {int(np.sum(moved == labels)) / len(labels)}"
        assert handler(Req(b"")) == expected != ACCURACY
    finally:
        if handler.runtime is not None:
            handler.runtime.close()


def test_spark_not_ready_is_unavailable() -> None:
    handler = fast_handler()  # as while Spark starts
    with pytest.raises(InvokeError) as err:
        handler(Req(b""))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "still starting" in err.value.message
    assert json.loads(handler(Req(b"[[0, 0, 0, 0]]")))["predictions"]  # rows need no Spark


def test_a_call_needing_spark_waits_for_its_start_within_its_time() -> None:
    """From zero, the replica is ready before its JVMs: the accuracy call waits for them for as long
    as its deadline allows (info.Timeout less a second) instead of UNAVAILABLE at once."""
    handler = fast_handler()
    waited: list[float | None] = []

    class JvmsComeUp(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:  # the start finishing while the call waits
            waited.append(timeout)
            handler.spark, handler.accuracy = object(), 0.95
            self.set()
            return super().wait(timeout)

    handler.engines_done = JvmsComeUp()
    request = Req(b"")
    request.info.Timeout = "30s"
    assert handler(request) == "Test set accuracy = 0.95"
    assert waited == [29.0]


def test_committed_bundle_is_reproducible(tmp_path: Path, runtime: MleapRuntime) -> None:
    out = subprocess.run(
        [sys.executable, str(FN / "train.py"), "--master", "local[2]", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == ACCURACY
    fresh, committed = read_bundle(tmp_path / "model.zip"), read_bundle(BUNDLE)
    assert fresh.layers == committed.layers == [4, 5, 4, 3]
    assert np.abs(fresh.weights - committed.weights).max() <= 1e-12
    runtime.load(tmp_path / "model.zip")  # MLeap reads the fresh bundle as it reads the committed one
    rows = np.random.default_rng(3).uniform(-1, 1, (200, 4))
    _, probability, prediction = Network.load().predict(rows)
    assert_same_predictions(runtime.score(rows), (probability, prediction))


def test_on_a_spark_standalone_cluster(tmp_path: Path) -> None:
    """A real standalone master and worker started from the pyspark installation, on 127.0.0.1."""
    script = (
        "import sys, time, json; sys.path.insert(0, {!r})\n"
        "from openfx.watcher.loader import load_handler\n"
        "h = load_handler({!r})\n"
        "deadline = time.time() + 240\n"
        "while h.accuracy is None and h.spark_error is None and time.time() < deadline: time.sleep(0.5)\n"
        "print(h.spark.sparkContext.master if h.spark else h.spark_error)\n"
        "class R: input = b''\n"
        "print(h(R()))\n"
    ).format(str(ROOT), str(FN / "src/handler.py"))
    with standalone_cluster(tmp_path) as (master, env):
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=300,
            env={**env, "SPARK_MASTER": master},
        )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == master and lines[-1] == ACCURACY


def test_through_gateway(stack_gateway: RunningGateway) -> None:
    reply = json.loads(call(stack_gateway, "pyspark", b"[[-0.22, 0.83, -0.86, -0.92]]"))
    assert reply["predictions"][0]["prediction"] == 1
    deadline = time.monotonic() + 180
    while True:
        try:
            assert call(stack_gateway, "pyspark", b"\n") == ACCURACY.encode()
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc.details()
            time.sleep(1)
    import requests

    r = requests.post(f"{stack_gateway.http_url}/function/pyspark", data=b'{"features": [1, 2]}', timeout=30)
    assert r.status_code == 400 and "expected a list of 4 numbers" in r.text
