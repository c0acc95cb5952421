"""Distributed training of the digit model on Spark: the seed's splitter -> trainers -> aggregator.

    python functions/mnist/train.py [--master local[*] | spark://host:7077] [--partitions 4]

Splitter: the training rows go to N Spark partitions. Trainers: one Spark task per partition
trains its own network (same starting weights, mini-batch SGD) on its rows only. Aggregator:
the driver averages the N models' weights, weighted by their row counts. For comparison, Spark
MLlib's MultilayerPerceptronClassifier is trained on all rows. Every model is scored on the same
held-out rows and the accuracies are printed side by side; the averaged and MLlib models are
written as MLeap bundles (src/models/averaged.zip, mllib.zip, by the mleap package's serializers)
with src/models/index.json saying which one the `mnist` function serves.

Data: scikit-learn's copy of the UCI handwritten digits (1,797 8x8 images from 43 writers),
installed with the package, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "src"))
from digits import MAX_PIXEL, N_CLASSES, N_PIXELS, Network, average, save_models, train_partition  # noqa: E402

SEED = 1234
SEED_AGGREGATED_ACCURACY = 0.8728  # the seed's averaged Keras model on MNIST (for reference)


def load_data(test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train pixels, train labels, test pixels, test labels), split per class with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=test_fraction, random_state=SEED, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test


def spark_session(master: str):  # type: ignore[no-untyped-def]
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # loopback unless told otherwise
    spark = (
        SparkSession.builder.master(master)
        .appName("mnist-train")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")  # rich draws the progress
        .config("spark.driver.host", os.environ.get("SPARK_DRIVER_HOST", "127.0.0.1"))
        .config("spark.driver.bindAddress", os.environ.get("SPARK_DRIVER_BIND", "127.0.0.1"))
        .config("spark.executorEnv.PYSPARK_PYTHON", os.environ["PYSPARK_PYTHON"])
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    spark.sparkContext.addPyFile(str(HERE / "src" / "digits.py"))  # the trainers run on executors
    return spark


def train_distributed(spark, x, y, layers: list[int], partitions: int, epochs: int):  # type: ignore[no-untyped-def]
    """[(rows, weights)] per partition, trained in parallel in Spark tasks."""
    start = Network.initial(layers, SEED).flat().tolist()
    rows = [(int(label), [float(v) for v in pixels]) for label, pixels in zip(y, x, strict=True)]

    def trainer(index: int, part):  # type: ignore[no-untyped-def]
        for count, weights in train_partition(part, layers, start, epochs, SEED + index):
            yield index, count, weights

    rdd = spark.sparkContext.parallelize(rows, partitions)  # the splitter: contiguous shards
    trained = sorted(rdd.mapPartitionsWithIndex(trainer).collect())
    return [(count, np.asarray(weights)) for _, count, weights in trained]


def train_mllib(spark, x, y, x_test, y_test, layers: list[int], max_iter: int):  # type: ignore[no-untyped-def]
    """MLlib's MultilayerPerceptronClassifier on all training rows: (weights, Spark-computed accuracy)."""
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.linalg import Vectors

    def frame(pixels, labels):  # type: ignore[no-untyped-def]
        data = [(float(label), Vectors.dense(p / MAX_PIXEL)) for p, label in zip(pixels, labels, strict=True)]
        return spark.createDataFrame(data, ["label", "features"])

    mlp = MultilayerPerceptronClassifier(layers=layers, maxIter=max_iter, blockSize=128, seed=SEED)
    model = mlp.fit(frame(x, y))
    predictions = model.transform(frame(x_test, y_test))
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(predictions)
    return model, np.asarray(model.weights.toArray()), accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--master", default=os.environ.get("SPARK_MASTER", "local[*]"))
    parser.add_argument("--partitions", type=int, default=4, help="trainers (one model per partition)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs each trainer runs over its rows")
    parser.add_argument("--hidden", type=int, default=32, help="hidden layer size")
    parser.add_argument("--mllib-iter", type=int, default=200, help="MLlib's maxIter")
    parser.add_argument(
        "--output", default=str(HERE / "src" / "models"), help="bundles folder; '' to not write"
    )
    parser.add_argument("--spark-model", default="", help="also save MLlib's model (Spark format) here")
    parser.add_argument("--report", default="", help="write accuracies and timings as JSON here")
    args = parser.parse_args(argv)
    if args.partitions < 1 or args.epochs < 1 or args.hidden < 1:
        parser.error("--partitions, --epochs and --hidden must be at least 1")

    console = Console(stderr=True)
    layers = [N_PIXELS, args.hidden, N_CLASSES]
    timings: dict[str, float] = {}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("loading the UCI digits", total=None)
        x, y, x_test, y_test = load_data()
        bar.update(task, description=f"starting Spark ({args.master})")
        began = time.perf_counter()
        spark = spark_session(args.master)
        timings["spark_start_s"] = time.perf_counter() - began
        try:
            bar.update(task, description=f"training {args.partitions} models, one per partition")
            began = time.perf_counter()
            models = train_distributed(spark, x, y, layers, args.partitions, args.epochs)
            timings["distributed_train_s"] = time.perf_counter() - began
            bar.update(task, description="training MLlib's MultilayerPerceptronClassifier on all rows")
            began = time.perf_counter()
            mllib_model, mllib_weights, mllib_spark_accuracy = train_mllib(
                spark, x, y, x_test, y_test, layers, args.mllib_iter
            )
            timings["mllib_train_s"] = time.perf_counter() - began
            if args.spark_model:
                mllib_model.write().overwrite().save(args.spark_model)
        finally:
            spark.stop()

    test = x_test / MAX_PIXEL
    averaged = Network(layers, average(models))
    mllib = Network(layers, mllib_weights)
    rows = [
        (f"partition {i}", count, Network(layers, w).accuracy(test, y_test))
        for i, (count, w) in enumerate(models)
    ]
    total = sum(count for count, _ in models)
    rows.append((f"averaged ({len(models)} models)", total, averaged.accuracy(test, y_test)))
    rows.append(("MLlib MLP (all rows)", len(y), mllib.accuracy(test, y_test)))

    table = Table(title=f"Accuracy on {len(y_test)} held-out digits")
    for column in ("model", "train rows", "test accuracy"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, count, accuracy in rows:
        table.add_row(name, str(count), f"{accuracy:.4f}")
    Console().print(table)
    print(f"Spark's own evaluation of the MLlib model: accuracy = {mllib_spark_accuracy:.4f}")
    print(f"(the seed's aggregated model reached {SEED_AGGREGATED_ACCURACY} on MNIST)")
    print(
        f"timings: Spark start {timings['spark_start_s']:.1f}s, {len(models)} trainers "
        f"{timings['distributed_train_s']:.2f}s, MLlib {timings['mllib_train_s']:.2f}s"
    )

    if args.output:
        meta = {"partitions": len(models), "epochs": args.epochs}
        save_models(
            Path(args.output),
            {
                "averaged": (layers, averaged.flat(), {**meta, "accuracy": rows[-2][2]}),
                "mllib": (layers, mllib_weights, {**meta, "accuracy": rows[-1][2]}),
            },
            serve="averaged",
        )
        print(f"models written to {os.path.relpath(args.output)} (serving: averaged)")
    if args.report:
        report = {
            "master": args.master,
            "partitions": [{"rows": c, "accuracy": a} for _, c, a in rows[:-2]],
            "averaged_accuracy": rows[-2][2],
            "mllib_accuracy": rows[-1][2],
            "mllib_spark_accuracy": mllib_spark_accuracy,
            "test_rows": len(y_test),
            **timings,
        }
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
