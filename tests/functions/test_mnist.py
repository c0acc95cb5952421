"""mnist (handwritten digits): the served models' MLeap bundles scored alike by MLeap's own JVM
runtime, numpy and Spark, reproduced by the training program, refused with one line when broken;
the served model's accuracy, every input form agreeing with the
pixels it encodes, bad input, the training program on local Spark and on a real standalone
cluster (master + two workers on 127.0.0.1), Spark batch scoring of csv2 folders, and the
gateway paths (gRPC, Invokes stream, HTTP trigger with its page, openfx-cli)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import requests

from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.watcher.loader import load_handler
from tests.conftest import ROOT, RunningGateway
from tests.functions.conftest import Req, call
from tests.functions.mleap_helpers import BROKEN, assert_same_predictions, bad_bundles, load_error
from tests.spark_cluster import standalone_cluster

FN = ROOT / "functions/mnist"
sys.path.insert(0, str(FN))
sys.path.insert(0, str(FN / "src"))

from digits import MAX_PIXEL, MODELS, image_pixels, load_model  # noqa: E402
from mleap_bundle import MleapRuntime, read_bundle, spark_model  # noqa: E402
from train import load_data  # noqa: E402

X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = load_data()


def digit_image(pixels: np.ndarray, size: int, dark_on_light: bool = True, ext: str = ".png") -> bytes:
    """A test digit drawn as a person's upload would be: scaled up, with a margin, either polarity."""
    ink = (pixels.reshape(8, 8) / MAX_PIXEL * 255).astype(np.uint8)
    image = cv2.resize(ink, (size, size), interpolation=cv2.INTER_NEAREST)
    image = np.pad(image, size // 4)
    if dark_on_light:
        image = 255 - image
    return cv2.imencode(ext, image)[1].tobytes()


def mnist_like(pixels: np.ndarray) -> np.ndarray:
    """The digit as MNIST stores one: 28x28, light on dark, 0..255, the digit in the middle 20x20."""
    ink = (pixels.reshape(8, 8) / MAX_PIXEL * 255).astype(np.uint8)
    return np.pad(cv2.resize(ink, (20, 20), interpolation=cv2.INTER_AREA), 4)


def predict(handler, data: bytes) -> dict:  # type: ignore[no-untyped-def]
    body, content_type = handler(Req(data))
    assert content_type == "application/json"
    return json.loads(body)


@pytest.fixture(scope="module")
def handler():  # type: ignore[no-untyped-def]
    return load_handler(FN / "src/handler.py")


def test_served_models_score_the_held_out_digits() -> None:
    for name in ("averaged", "mllib"):
        _, net, meta = load_model(name=name)
        accuracy = net.accuracy(X_TEST / MAX_PIXEL, Y_TEST)
        assert accuracy > 0.93, name
        assert accuracy == meta["accuracy"], name  # the bundle holds the trained weights exactly


def test_mleap_runtime_equals_numpy_and_spark_on_the_held_out_digits() -> None:
    from train import spark_session

    from tests.functions.test_pyspark import spark_predict

    rows = X_TEST / MAX_PIXEL
    spark = spark_session("local[2]")
    try:
        with MleapRuntime() as runtime:
            for name in ("averaged", "mllib"):
                bundle = read_bundle(MODELS / f"{name}.zip")
                assert runtime.load(bundle.path) > 0 and runtime.n_features == 64  # MLeap loads it
                mleap = runtime.score(rows)
                net = load_model(name=name)[1]
                assert_same_predictions(mleap, (net.probabilities(rows), net.predict(rows)))
                assert_same_predictions(mleap, spark_predict(spark, spark_model(spark, bundle), rows))
                assert np.mean(mleap[1] == Y_TEST) > 0.93
    finally:
        spark.stop()


@pytest.mark.parametrize("case", BROKEN)
def test_broken_bundle_stops_the_function_with_one_line(case: str, tmp_path: Path) -> None:
    bad, problem = bad_bundles(MODELS / "averaged.zip", tmp_path / "bad")[case]
    message = load_error(FN / "src", "models/averaged.zip", bad, tmp_path)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("Handler.__init__ failed: BundleError: <bundle>: ") and problem in message


def test_json_csv_and_images_agree_with_the_pixels(handler) -> None:  # type: ignore[no-untyped-def]
    rows = X_TEST[:80]
    expected = [predict(handler, json.dumps(r.tolist()).encode())["digit"] for r in rows]
    assert np.mean(np.array(expected) == Y_TEST[:80]) > 0.9
    nested = predict(handler, json.dumps(rows[0].reshape(8, 8).tolist()).encode())
    assert nested["digit"] == expected[0] and abs(sum(nested["probabilities"]) - 1) < 1e-4
    batch = predict(handler, json.dumps([{"pixels": r.tolist()} for r in rows]).encode())
    assert [b["digit"] for b in batch] == expected

    lines = "\n".join(
        ",".join([str(label), *map(str, r.astype(int))]) for label, r in zip(Y_TEST[:80], rows, strict=True)
    )
    body, content_type = handler(Req(lines.encode()))
    assert content_type == "text/csv"
    answered = [line.split(",") for line in body.decode().splitlines()]
    assert [int(a[0]) for a in answered] == list(Y_TEST[:80])
    assert [int(a[1]) for a in answered] == expected

    # MNIST's csv2 rows: label + 784 pixels (or the pixels alone)
    mnist_rows = [
        ",".join(map(str, [label, *mnist_like(r).ravel()])) for label, r in zip(Y_TEST, rows, strict=False)
    ]
    body, _ = handler(Req(("\n".join(mnist_rows[:40]) + "\n" + mnist_rows[40].split(",", 1)[1]).encode()))
    answered = [line.split(",") for line in body.decode().splitlines()]
    assert [int(a[0]) for a in answered] == [*Y_TEST[:40], -1]
    # resampling 8x8 -> 28x28 -> 8x8 blurs strokes: most, not all, answers survive it
    assert np.mean([int(a[1]) for a in answered] == np.array(expected[:41])) >= 0.75

    exact = agree = 0
    for i, r in enumerate(rows):
        png = digit_image(r, 8 * (3 + i % 20))
        exact += np.array_equal(image_pixels(png), r)
        agree += predict(handler, png)["digit"] == expected[i]
    assert exact >= 0.7 * len(rows) and agree >= 0.9 * len(rows), (exact, agree)


def test_any_size_either_polarity_png_or_jpeg(handler) -> None:  # type: ignore[no-untyped-def]
    r = X_TEST[3]
    want = predict(handler, json.dumps(r.tolist()).encode())["digit"]
    for size in (16, 64, 400, 2400):  # 2400 + margins = 3600x3600, shrunk before any float copy
        for dark in (True, False):
            for ext in (".png", ".jpg"):
                assert predict(handler, digit_image(r, size, dark, ext))["digit"] == want, (size, dark, ext)
    # black ink on a transparent background, as drawing apps export it
    ink = cv2.resize((r.reshape(8, 8) / MAX_PIXEL * 255).astype(np.uint8), (96, 96), interpolation=0)
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[..., 3] = np.pad(ink, 0)
    assert predict(handler, cv2.imencode(".png", rgba)[1].tobytes())["digit"] == want
    # a 28x28 MNIST-style array (light on dark, 0..255) goes through the image path
    assert predict(handler, json.dumps(mnist_like(r).tolist()).encode())["digit"] == want


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"{", "invalid JSON"),
        (b"[1, 2, 3]", "3 pixels"),
        (b'{"x": 1}', '"pixels"'),
        (b"[[1, 2], [3]]", "array of numbers"),
        (b"[NaN]", "finite"),
        (b"abc", "not csv2"),
        (b"1,2,3\n", "3 values"),
        (b"\x89PNG\r\n\x1a\ntruncated", "not a PNG or JPEG"),
        (b"\xff\xfe", "utf-8"),
    ],
)
def test_bad_input_is_value_error(handler, data: bytes, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        handler(Req(data))


def test_blank_and_tiny_images_are_refused(handler) -> None:  # type: ignore[no-untyped-def]
    blank = cv2.imencode(".png", np.full((50, 50), 255, np.uint8))[1].tobytes()
    with pytest.raises(ValueError, match="no digit found"):
        handler(Req(blank))
    with pytest.raises(ValueError, match="too small"):
        handler(Req(cv2.imencode(".png", np.zeros((2, 2), np.uint8))[1].tobytes()))


def test_the_page_is_the_http_trigger_answer_to_nothing(handler) -> None:  # type: ignore[no-untyped-def]
    request = wpb.Request(input=b"", info=wpb.Info(Trigger=wpb.Trigger(Name="http")))
    body, content_type = handler(request)
    assert content_type.startswith("text/html") and b"<canvas" in body and b"{{MODEL}}" not in body


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> str:
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_training_program_reproduces_the_committed_bundles(tmp_path: Path) -> None:
    models, report = tmp_path / "models", tmp_path / "report.json"
    stdout = run(
        [str(FN / "train.py"), "--master", "local[2]", "--output", str(models), "--report", str(report)]
    )
    for row in ("partition 3", "averaged (4 models)", "MLlib MLP (all rows)"):
        assert row in stdout
    result = json.loads(report.read_text())
    assert sorted(p["rows"] for p in result["partitions"]) == [359, 359, 359, 360]
    assert result["averaged_accuracy"] > 0.9 and result["mllib_accuracy"] > 0.9
    # the numpy forward pass scores MLlib's weights exactly as Spark's own transform did
    assert result["mllib_accuracy"] == pytest.approx(result["mllib_spark_accuracy"], abs=1e-12)
    assert json.loads((models / "index.json").read_text()) == json.loads((MODELS / "index.json").read_text())
    for name in ("averaged", "mllib"):
        fresh, committed = read_bundle(models / f"{name}.zip"), read_bundle(MODELS / f"{name}.zip")
        assert fresh.layers == committed.layers == [64, 32, 10]
        assert np.abs(fresh.weights - committed.weights).max() <= 1e-12, name


def test_training_on_a_standalone_cluster_with_two_workers(tmp_path: Path) -> None:
    """A real Spark master and two workers on 127.0.0.1; four trainers spread over them."""
    report = tmp_path / "report.json"
    with standalone_cluster(tmp_path, workers=2) as (master, env):
        args = [str(FN / "train.py"), "--master", master, "--partitions", "4", "--epochs", "10"]
        run([*args, "--mllib-iter", "50", "--output", "", "--report", str(report)], env=env)
        executors = list((tmp_path / "work").glob("app-*/*"))
    result = json.loads(report.read_text())
    assert result["master"] == master and len(result["partitions"]) == 4
    assert sum(p["rows"] for p in result["partitions"]) == len(Y_TRAIN)
    assert result["averaged_accuracy"] > 0.9
    assert len(executors) == 2  # one executor on each worker ran the job


def test_batch_scoring_of_a_csv2_folder(tmp_path: Path) -> None:
    images, output = tmp_path / "stream_data", tmp_path / "predictions"
    images.mkdir()
    for part in range(3):
        with open(images / f"part-{part}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            for i in range(part * 40, part * 40 + 40):
                writer.writerow([Y_TEST[i], *X_TEST[i].astype(int)])
    (images / "broken.csv").write_text("7,1,2,not-a-number\n")
    stdout = run([str(FN / "batch.py"), "--images", str(images), "--output", str(output)])
    predicted = {}
    for part in output.glob("batch-*/part-*.csv"):
        for label, prediction, probability in csv.reader(part.open()):
            predicted.setdefault(int(label), []).append((int(prediction), float(probability)))
    _, net, _ = load_model()
    expected = net.predict(X_TEST[:120] / MAX_PIXEL)
    assert sum(len(v) for v in predicted.values()) == 120
    for label in set(Y_TEST[:120]):
        want = sorted(int(p) for p in expected[Y_TEST[:120] == label])
        assert sorted(p for p, _ in predicted[label]) == want
    accuracy = float(np.mean(expected == Y_TEST[:120]))
    summary = "scored 120 rows with the averaged model, 1 malformed rows skipped"
    assert f"{summary}; accuracy on labelled rows = {accuracy:.4f}" in stdout

    # the seed's own csv2 files are MNIST: label + 784 pixels
    mnist_images = tmp_path / "mnist_csv2"
    mnist_images.mkdir()
    with open(mnist_images / "part-0.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([Y_TEST[i], *mnist_like(X_TEST[i]).ravel()] for i in range(60))
    args = ["--images", str(mnist_images), "--output", str(tmp_path / "mnist_out"), "--pixels", "784"]
    stdout = run([str(FN / "batch.py"), *args])
    rows = [
        r for part in (tmp_path / "mnist_out").glob("batch-*/part-*.csv") for r in csv.reader(part.open())
    ]
    assert len(rows) == 60 and "scored 60 rows with the averaged model, 0 malformed rows skipped" in stdout
    assert np.mean([int(label) == int(prediction) for label, prediction, _ in rows]) >= 0.7


def test_through_the_gateway(stack_gateway: RunningGateway) -> None:
    pixels = X_TEST[:30]
    images = [digit_image(r, 40 + 4 * i, dark_on_light=i % 2 == 0) for i, r in enumerate(pixels)]
    unary = [json.loads(call(stack_gateway, "mnist", img))["digit"] for img in images]
    assert np.mean(np.array(unary) == Y_TEST[:30]) > 0.85

    stream = stack_gateway.stub().Invokes(
        iter([gpb.InvokeServiceRequest(Service="mnist", Input=img) for img in images]), timeout=60
    )
    assert [json.loads(m.Output)["digit"] for m in stream] == unary

    page = requests.get(f"{stack_gateway.http_url}/function/mnist", timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "Handwritten digit recognition" in page.text
    posted = requests.post(f"{stack_gateway.http_url}/function/mnist", data=images[0], timeout=30)
    assert posted.headers["Content-Type"].startswith("application/json")
    assert posted.json()["digit"] == unary[0]
    bad = requests.post(f"{stack_gateway.http_url}/function/mnist", data=b"[1,2,3]", timeout=30)
    assert bad.status_code == 400 and "3 pixels" in bad.text
    bomb = cv2.imencode(".png", np.zeros((7000, 7000), np.uint8))[1].tobytes()  # 49 MP in ~50 KB
    bad = requests.post(f"{stack_gateway.http_url}/function/mnist", data=bomb, timeout=30)
    assert bad.status_code == 400 and "over the limit of 40000000 pixels" in bad.text
    with pytest.raises(grpc.RpcError) as err:
        call(stack_gateway, "mnist", b"")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    line = ",".join([str(Y_TEST[0]), *map(str, X_TEST[0].astype(int))]) + "\n"
    cli = Path(sys.executable).parent / "openfx-cli"
    out = subprocess.run(
        [str(cli), "fn", "call", "mnist", "-g", stack_gateway.grpc_address],
        input=line.encode(),
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.decode().startswith(f"{Y_TEST[0]},{unary[0]},")


def test_shipped_samples_are_reproducible_and_recognised(handler, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from samples import main as write_samples

    assert write_samples(tmp_path) == 0
    shipped = FN / "samples"
    for digit in range(10):
        png = (shipped / f"{digit}.png").read_bytes()
        assert png == (tmp_path / f"{digit}.png").read_bytes()
        assert predict(handler, png)["digit"] == digit
    rows = (shipped / "csv2/part-0.csv").read_bytes()
    assert rows == (tmp_path / "csv2/part-0.csv").read_bytes()
    body, _ = handler(Req(rows))
    answers = [line.split(",") for line in body.decode().splitlines()]
    assert len(answers) == 100 and np.mean([a[0] == a[1] for a in answers]) > 0.9
