"""Train the workshop's neural network on Spark and write what the function loads.

    .venv/bin/python functions/pyspark/train.py [--master local[*]] [--out functions/pyspark/src]

A Pipeline with one MultilayerPerceptronClassifier (layers 4-5-4-3, maxIter 100, blockSize 128,
seed 1234) is fit on 60% of Spark's sample_multiclass_classification_data (seed 1234); the
PipelineModel is saved in Spark's own format (`model/`) and its layers and weights, read back
from the fitted model, go to `model.json` for the numpy fast path. Prints the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

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
        model_dir = out / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model.write().save(str(model_dir))
        stage = model.stages[0]
        (out / "model.json").write_text(
            json.dumps({"layers": list(stage.getLayers()), "weights": stage.weights.toArray().tolist()})
            + "\n"
        )
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
