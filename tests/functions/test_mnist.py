"""mnist (handwritten digits, real MNIST): the served models' MLeap bundles scored alike by MLeap's
own JVM runtime, numpy and Spark, reproduced by the training program, refused with one line when
broken; the served model's accuracy on the 1,000 held-out MNIST digits, every input form agreeing
with the pixels it encodes, digits printed in Debian's fonts recognised through the gateway, bad
input, the training program on local Spark and on a real standalone
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

from digits import MAX_PIXEL, MODELS, load_model  # noqa: E402
from mleap_bundle import MleapRuntime, read_bundle, spark_model  # noqa: E402
from train import load_data  # noqa: E402

X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = load_data()


def digit_image(pixels: np.ndarray, size: int, dark_on_light: bool = True, ext: str = ".png") -> bytes:
    """An MNIST digit as a person's upload would be: scaled up, with a margin, either polarity."""
    ink = pixels.reshape(28, 28).astype(np.uint8)
    image = np.pad(cv2.resize(ink, (size, size), interpolation=cv2.INTER_LINEAR), size // 4)
    if dark_on_light:
        image = 255 - image
    return cv2.imencode(ext, image)[1].tobytes()


FONTS = [
    "dejavu/DejaVuSans.ttf",
    "dejavu/DejaVuSerif.ttf",
    "dejavu/DejaVuSansMono.ttf",
    "liberation/LiberationSans-Regular.ttf",
    "liberation/LiberationSerif-Regular.ttf",
    "liberation/LiberationMono-Regular.ttf",
]
FONT_SIZES = (24, 64, 160)  # pixels per em: small, medium, large
FONT_RECOGNITION = 0.81  # measured with the committed averaged model: 292 of 360 (0.811)


def font_digits() -> list[tuple[int, bytes]]:
    """Every digit printed in six fonts Debian ships, three sizes, both polarities, placed off
    the centre of a canvas three times the font size: (digit, PNG) x 360."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(0)
    out = []
    for font in FONTS:
        path = Path("/usr/share/fonts/truetype") / font
        assert path.exists(), f"{path} missing: scripts/setup installs fonts-dejavu-core and fonts-liberation"
        for size in FONT_SIZES:
            face = ImageFont.truetype(str(path), size)
            for dark in (True, False):
                for digit in range(10):
                    side = 3 * size
                    image = Image.new("L", (side, side), 255 if dark else 0)
                    dx, dy = rng.integers(-size // 2, size // 2 + 1, 2)
                    xy = (side // 2 + int(dx), side // 2 + int(dy))
                    ImageDraw.Draw(image).text(
                        xy, str(digit), fill=0 if dark else 255, font=face, anchor="mm"
                    )
                    out.append((digit, cv2.imencode(".png", np.asarray(image))[1].tobytes()))
    return out


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
        assert accuracy >= {"averaged": 0.93, "mllib": 0.94}[name], (name, accuracy)
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
                assert runtime.load(bundle.path) > 0 and runtime.n_features == 784  # MLeap loads it
                mleap = runtime.score(rows)
                net = load_model(name=name)[1]
                assert_same_predictions(mleap, (net.probabilities(rows), net.predict(rows)))
                assert_same_predictions(mleap, spark_predict(spark, spark_model(spark, bundle), rows))
                assert np.mean(mleap[1] == Y_TEST) > 0.93
    finally:
        spark.stop()


# a valid MLP bundle of another model (pyspark's 4-5-4-3): sizes agreeing only with each other
FOREIGN_MLP = (ROOT / "functions/pyspark/src/model.zip", "do not map 784 pixels to 10 digits")


@pytest.mark.parametrize("case", [*BROKEN, "foreign MLP"])
def test_broken_bundle_stops_the_function_with_one_line(case: str, tmp_path: Path) -> None:
    cases = {**bad_bundles(MODELS / "averaged.zip", tmp_path / "bad"), "foreign MLP": FOREIGN_MLP}
    bad, problem = cases[case]
    message = load_error(FN / "src", "models/averaged.zip", bad, tmp_path)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("Handler.__init__ failed: BundleError: <bundle>: ") and problem in message


def test_json_csv_and_images_agree_with_the_pixels(handler) -> None:  # type: ignore[no-untyped-def]
    rows = X_TEST[:80]
    expected = [predict(handler, json.dumps(r.tolist()).encode())["digit"] for r in rows]
    _, net, _ = load_model()
    assert expected == list(net.predict(rows / MAX_PIXEL))  # MNIST's 784 values are used as they are
    assert np.mean(np.array(expected) == Y_TEST[:80]) > 0.9
    nested = predict(handler, json.dumps(rows[0].reshape(28, 28).tolist()).encode())
    assert nested["digit"] == expected[0] and abs(sum(nested["probabilities"]) - 1) < 1e-4
    batch = predict(handler, json.dumps([{"pixels": r.tolist()} for r in rows]).encode())
    assert [b["digit"] for b in batch] == expected

    # csv2 rows: label + 784 pixels, or the pixels alone (label -1)
    lines = [
        ",".join([str(label), *map(str, r.astype(int))]) for label, r in zip(Y_TEST[:80], rows, strict=True)
    ]
    body, content_type = handler(Req(("\n".join(lines[:79]) + "\n" + lines[79].split(",", 1)[1]).encode()))
    assert content_type == "text/csv"
    answered = [line.split(",") for line in body.decode().splitlines()]
    assert [int(a[0]) for a in answered] == [*Y_TEST[:79], -1]
    assert [int(a[1]) for a in answered] == expected

    # the same digits as uploads (scaled up, either polarity): MNIST's preprocessing of the image
    # gives back (nearly) the digit it was made from
    agree = 0
    for i, r in enumerate(rows):
        png = digit_image(r, 28 * (1 + i % 8), dark_on_light=i % 2 == 0)
        agree += predict(handler, png)["digit"] == expected[i]
    assert agree >= 0.9 * len(rows), agree


def test_printed_digits_in_debian_fonts_through_the_gateway(stack_gateway: RunningGateway) -> None:
    """Digits the model never saw (printed, not handwritten), sent as PNGs a new user would try:
    six DejaVu/Liberation fonts x three sizes x both polarities x off-centre = 360 uploads."""
    digits = font_digits()
    stream = stack_gateway.stub().Invokes(
        iter([gpb.InvokeServiceRequest(Service="mnist", Input=png) for _, png in digits]), timeout=120
    )
    answers = [json.loads(m.Output)["digit"] for m in stream]
    rate = float(np.mean([a == d for a, (d, _) in zip(answers, digits, strict=True)]))
    assert rate >= FONT_RECOGNITION, rate


def test_uci_8x8_input_is_refused_with_one_line(handler) -> None:  # type: ignore[no-untyped-def]
    for data in (json.dumps([0] * 64).encode(), ("3," + ",".join(["0"] * 64)).encode()):
        with pytest.raises(ValueError, match="64 values are the 8x8 UCI digits") as err:
            handler(Req(data))
        assert "\n" not in str(err.value) and "784" in str(err.value)


def test_any_size_either_polarity_png_or_jpeg(handler) -> None:  # type: ignore[no-untyped-def]
    r = X_TEST[3]
    want = predict(handler, json.dumps(r.tolist()).encode())["digit"]
    assert want == Y_TEST[3]
    for size in (28, 64, 400, 2400):  # 2400 + margins = 3600x3600, shrunk before any float copy
        for dark in (True, False):
            for ext in (".png", ".jpg"):
                assert predict(handler, digit_image(r, size, dark, ext))["digit"] == want, (size, dark, ext)
    # black ink on a transparent background, as drawing apps export it
    ink = cv2.resize(r.reshape(28, 28).astype(np.uint8), (112, 112), interpolation=cv2.INTER_LINEAR)
    rgba = np.zeros((112, 112, 4), np.uint8)
    rgba[..., 3] = ink
    assert predict(handler, cv2.imencode(".png", rgba)[1].tobytes())["digit"] == want
    # the 28x28 MNIST image itself as a PNG, and off-centre in a larger canvas
    assert (
        predict(handler, cv2.imencode(".png", r.reshape(28, 28).astype(np.uint8))[1].tobytes())["digit"]
        == want
    )
    canvas = np.zeros((100, 100), np.uint8)
    canvas[5:33, 60:88] = r.reshape(28, 28)
    assert predict(handler, cv2.imencode(".png", canvas)[1].tobytes())["digit"] == want


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"{", "invalid JSON"),
        (b"[1, 2, 3]", "3 pixels"),
        (json.dumps([300] * 784).encode(), "0..255"),
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


@pytest.mark.timeout(300)  # the full training: ~70 s on 2 busy cores
def test_training_program_reproduces_the_committed_bundles(tmp_path: Path) -> None:
    models, report = tmp_path / "models", tmp_path / "report.json"
    stdout = run(
        [str(FN / "train.py"), "--master", "local[2]", "--output", str(models), "--report", str(report)]
    )
    for row in ("partition 3", "averaged (4 models)", "MLlib MLP (all rows)"):
        assert row in stdout
    result = json.loads(report.read_text())
    assert [p["rows"] for p in result["partitions"]] == [1000] * 4 and result["test_rows"] == 1000
    assert result["rounds"] == len(result["round_accuracies"]) == 10
    assert result["averaged_accuracy"] >= 0.93 and result["mllib_accuracy"] >= 0.94
    # the numpy forward pass scores MLlib's weights exactly as Spark's own transform did
    assert result["mllib_accuracy"] == pytest.approx(result["mllib_spark_accuracy"], abs=1e-12)
    assert json.loads((models / "index.json").read_text()) == json.loads((MODELS / "index.json").read_text())
    for name in ("averaged", "mllib"):
        fresh, committed = read_bundle(models / f"{name}.zip"), read_bundle(MODELS / f"{name}.zip")
        layers = {"averaged": [784, 64, 10], "mllib": [784, 128, 64, 10]}[name]
        assert fresh.layers == committed.layers == layers
        assert np.abs(fresh.weights - committed.weights).max() <= 1e-12, name
    # what the README and bench/README print is what this training prints
    assert [line.rstrip() for line in stdout.splitlines()[: len(README_EXAMPLE)]] == README_EXAMPLE
    cells = [f"{result['averaged_accuracy']:.4f}", f"{max(p['accuracy'] for p in result['partitions']):.4f}"]
    mllib = f"{result['mllib_accuracy']:.4f}"
    readme, bench = table_rows("README.md"), table_rows("bench/README.md")
    assert [r[2:4] for r in readme if r[0] == "4"] == [r[3:5] for r in bench if r[0] == "4"] == [cells]
    # MLlib's model is the same for every partition count, so is its README column (bench/README
    # keeps the earlier MLlib's columns as measured, labelled so)
    assert {r[4] for r in readme} == {mllib}


def readme_example() -> list[str]:
    """The README's `train.py --partitions 4` output, up to its elided timings."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("$ .venv/bin/python functions/mnist/train.py --partitions 4") :]
    lines = [line.removeprefix("  ").rstrip() for line in block.splitlines()[1:]]
    return lines[: next(i for i, line in enumerate(lines) if line.startswith("timings:"))]


README_EXAMPLE = readme_example()


def table_rows(doc: str) -> list[list[str]]:
    """The cells of the mnist accuracy table's rows (partition counts 1, 2, 4) in `doc`."""
    rows = []
    for line in (ROOT / doc).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] in ("1", "2", "4") and cells[1].replace("/", "").isdigit():
            rows.append(cells)
    assert [r[0] for r in rows] == ["1", "2", "4"], doc
    return rows


@pytest.mark.timeout(300)
def test_mllib_model_does_not_depend_on_the_partition_count(tmp_path: Path) -> None:
    """MLlib trains on all rows: cutting them into 1 or 3 files for the trainers must not change
    its rows, their augmented copies, or its weights (a small net, a few iterations)."""
    from train import spark_session, train_mllib, write_csv2

    spark = spark_session("local[2]")
    try:
        weights = []
        for partitions in (1, 3):
            folder = tmp_path / str(partitions)
            write_csv2(spark, folder, partitions)
            assert len(list((folder / "train").glob("part-*"))) == partitions
            weights.append(train_mllib(spark, folder, [784, 16, 10], 3, 1)[1])
    finally:
        spark.stop()
    assert np.array_equal(weights[0], weights[1])


@pytest.mark.timeout(300)  # a cluster start, Spark start and training: ~90 s on 2 busy cores
def test_training_on_a_standalone_cluster_with_two_workers(tmp_path: Path) -> None:
    """A real Spark master and two workers on 127.0.0.1; four trainers spread over them."""
    report = tmp_path / "report.json"
    with standalone_cluster(tmp_path, workers=2) as (master, env):
        args = [str(FN / "train.py"), "--master", master, "--partitions", "4", "--rounds", "3"]
        args += ["--mllib-iter", "3", "--mllib-hidden", "16", "--mllib-augment", "0"]
        args += ["--data", str(tmp_path / "mnist")]
        run([*args, "--output", "", "--report", str(report)], env=env)
        written = sorted(p.name for p in (tmp_path / "mnist/csv2/train").glob("part-*"))
        executors = list((tmp_path / "work").glob("app-*/*"))
    result = json.loads(report.read_text())
    assert result["master"] == master and len(result["partitions"]) == 4
    assert sum(p["rows"] for p in result["partitions"]) == len(Y_TRAIN)
    assert result["averaged_accuracy"] > 0.85 and result["rounds"] == 3
    assert written == [f"part-0000{i}" for i in range(4)]  # seed 000's csv2 layout, a file per trainer
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
    assert accuracy > 0.9
    summary = "scored 120 rows with the averaged model, 1 malformed rows skipped"
    assert f"{summary}; accuracy on labelled rows = {accuracy:.4f}" in stdout
    batches = [line.split(",") for line in (output / "accuracy.csv").read_text().splitlines()]
    assert sum(int(b[1]) for b in batches) == 120
    for batch, rows, labelled, batch_accuracy in batches:
        # the files Spark's file source gave this batch (its own log), scored here by numpy
        log = (output / "_checkpoint/sources/0" / batch).read_text().splitlines()[1:]
        parts = sorted(Path(json.loads(line)["path"]).name for line in log)
        numbers = [int(p.removeprefix("part-").removesuffix(".csv")) for p in parts if p != "broken.csv"]
        index = np.concatenate([np.arange(40) + 40 * n for n in numbers])
        correct = int(np.sum(expected[index] == Y_TEST[index]))
        assert (int(rows), int(labelled)) == (len(index), len(index)), (batch, parts)
        assert batch_accuracy == f"{correct / len(index):.4f}", (batch, parts)
        assert f"batch {batch}: {rows} rows scored, accuracy {batch_accuracy}" in stdout


def test_through_the_gateway(stack_gateway: RunningGateway) -> None:
    pixels = X_TEST[:30]
    images = [digit_image(r, 40 + 4 * i, dark_on_light=i % 2 == 0) for i, r in enumerate(pixels)]
    unary = [json.loads(call(stack_gateway, "mnist", img))["digit"] for img in images]
    assert np.mean(np.array(unary) == Y_TEST[:30]) > 0.85
    as_json = [
        json.loads(call(stack_gateway, "mnist", json.dumps(r.tolist()).encode()))["digit"] for r in pixels
    ]
    assert np.mean(np.array(as_json) == Y_TEST[:30]) > 0.9

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
