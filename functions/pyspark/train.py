"""Train the workshop's neural network on Spark and write it as the MLeap bundle the function serves.

    .venv/bin/python functions/pyspark/train.py [--master local[*]] [--out functions/pyspark/src]

A Pipeline with one MultilayerPerceptronClassifier (layers 4-5-4-3, maxIter 100, blockSize 128,
seed 1234) is fit on 60% of Spark's sample_multiclass_classification_data (seed 1234). The fitted
PipelineModel is written as an MLeap bundle, `model.zip` (as the seed's `jar:file:/tmp/model.zip`),
by the mleap package's serializers (mleap-support/mleap_bundle.py); its layers and weights are
read from the fitted model. Prints the test accuracy Spark's evaluator gives the fitted model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from mleap_bundle import write_bundle  # noqa: E402
from mlp import LAYERS, SEED, spark_session, split  # noqa: E402


def train(out: Path, master: str | None = None) -> float:
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator

    spark = spark_session(master, app="NeuralNetTraining")
    try:
        train_df, test_df = split(spark)
        mlp = MultilayerPerceptronClassifier(maxIter=100, layers=LAYERS, blockSize=128, seed=SEED)
        model = Pipeline(stages=[mlp]).fit(train_df)
        accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(
            model.transform(test_df).select("prediction", "label")
        )
        stage = model.stages[0]
        write_bundle(out / "model.zip", list(stage.getLayers()), stage.weights.toArray(), "pyspark")
        return accuracy
    finally:
        spark.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--master", default=None, help="Spark master (default $SPARK_MASTER or local[*])")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "src"))
    args = ap.parse_args()
    accuracy = train(Path(args.out), args.master)
    print(f"Test set accuracy = {accuracy}")


if __name__ == "__main__":
    main()
