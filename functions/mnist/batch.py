"""Batch and streaming inference over a folder of csv2 files, on Spark (the seed's inference mode).

    python functions/mnist/batch.py --images stream_data --output predictions [--watch]

Every CSV file in --images holds rows in the seeds' csv2 layout: `label,p0,...,p783` (MNIST's
28x28 pixels 0..255; train.py --data DIR writes such files). Spark reads them with its
file-stream source; each micro-batch is scored by the model in src/models/ (MLeap bundles) on
the executors and written to `<output>/batch-<n>/` as CSV `label,prediction,probability`; each
batch's accuracy on its labelled rows is printed and appended to `<output>/accuracy.csv`
(`batch,rows,labelled,accuracy`). Without --watch the files present now are processed and the
job ends (a summary is printed); with --watch it keeps scoring files as they are copied in,
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "src"))
from digits import MAX_PIXEL, MODELS, N_PIXELS, load_model  # noqa: E402
from train import spark_session  # noqa: E402


def schema(pixels: int):  # type: ignore[no-untyped-def]
    from pyspark.sql.types import DoubleType, IntegerType, StructField, StructType

    fields = [StructField("label", IntegerType())]
    fields += [StructField(f"p{i}", DoubleType()) for i in range(pixels)]
    return StructType(fields)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of csv2 files")
    parser.add_argument("--output", required=True, help="predictions go to <output>/batch-<n>/")
    parser.add_argument("--model", default=str(MODELS), help="the bundles folder train.py wrote")
    parser.add_argument("--model-name", default="", help="averaged or mllib (default: the file's choice)")
    parser.add_argument("--master", default=os.environ.get("SPARK_MASTER", "local[*]"))
    parser.add_argument("--watch", action="store_true", help="keep scoring new files until Ctrl-C")
    args = parser.parse_args(argv)
    if not Path(args.images).is_dir():
        parser.error(f"--images {args.images}: no such folder")
    try:
        name, net, _ = load_model(Path(args.model), args.model_name)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"--model {args.model}: {exc}")
    layers, weights = net.layers, net.flat().tolist()

    spark = spark_session(args.master)
    model = spark.sparkContext.broadcast((layers, weights))
    totals = {"rows": 0, "labelled": 0, "correct": 0, "malformed": 0}

    columns = [f"p{i}" for i in range(N_PIXELS)]

    def score(rows):  # type: ignore[no-untyped-def]
        import numpy as np
        from digits import Network, as_pixels

        rows = list(rows)
        if not rows:
            return
        network = Network(*model.value)
        pixels = np.stack([as_pixels([row[c] for c in columns]) for row in rows]) / MAX_PIXEL
        probabilities = network.probabilities(pixels)
        for row, p in zip(rows, probabilities, strict=True):
            yield row["label"], int(p.argmax()), float(p.max())

    def write_batch(frame, batch_id: int) -> None:  # type: ignore[no-untyped-def]
        complete = frame.dropna()
        totals["malformed"] += frame.count() - complete.count()
        scored = complete.rdd.mapPartitions(score).toDF(["label", "prediction", "probability"]).cache()
        count = scored.count()
        if count == 0:
            return
        scored.write.mode("overwrite").csv(str(Path(args.output) / f"batch-{batch_id}"))
        labelled = scored.filter("label >= 0")
        n_labelled, correct = labelled.count(), labelled.filter("label = prediction").count()
        totals["rows"] += count
        totals["labelled"] += n_labelled
        totals["correct"] += correct
        accuracy = correct / n_labelled if n_labelled else float("nan")
        with open(Path(args.output) / "accuracy.csv", "a") as fh:  # batch,rows,labelled,accuracy
            fh.write(f"{batch_id},{count},{n_labelled},{accuracy:.4f}\n")
        print(f"batch {batch_id}: {count} rows scored, accuracy {accuracy:.4f}", flush=True)

    stream = spark.readStream.schema(schema(N_PIXELS)).option("mode", "PERMISSIVE").csv(args.images)
    writer = stream.writeStream.foreachBatch(write_batch).option(
        "checkpointLocation", str(Path(args.output) / "_checkpoint")
    )
    query = (writer if args.watch else writer.trigger(availableNow=True)).start()
    try:
        query.awaitTermination()
    except KeyboardInterrupt:
        query.stop()
    finally:
        spark.stop()
    accuracy = totals["correct"] / totals["labelled"] if totals["labelled"] else float("nan")
    print(
        f"scored {totals['rows']} rows with the {name} model, {totals['malformed']} malformed rows "
        f"skipped; accuracy on labelled rows = {accuracy:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
