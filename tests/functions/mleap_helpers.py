"""Shared by the pyspark and mnist tests: broken bundles of every kind, the watcher's load error
they give, and one assertion for "the same predictions" across numpy, MLeap's JVM and Spark."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from tests.conftest import ROOT

BROKEN = ["missing", "truncated", "foreign", "other op", "wrong layers", "wrong weights"]


def assert_same_predictions(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    """(probability, prediction) pairs: equal classes, probabilities within 1e-9."""
    (prob_a, pred_a), (prob_b, pred_b) = a, b
    assert prob_a.shape == prob_b.shape and len(pred_a) == len(pred_b) == len(prob_a)
    assert np.array_equal(np.asarray(pred_a, float), np.asarray(pred_b, float))
    assert np.abs(prob_a - prob_b).max() < 1e-9


def _rewrite(good: Path, out: Path, change) -> Path:  # type: ignore[no-untyped-def]
    """A copy of `good` whose MLP node model.json went through `change` (a test-only edit)."""
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(".node/model.json"):
                model = json.loads(data)
                change(model)
                data = json.dumps(model).encode()
            dst.writestr(info.filename, data)
    return out


def bad_bundles(good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (broken bundle, the problem its load error must name)."""
    tmp.mkdir(parents=True, exist_ok=True)
    truncated = tmp / "truncated.zip"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("README.txt", "not a model")

    def other_op(m: dict) -> None:
        m["op"] = "linear_regression"

    def wrong_layers(m: dict) -> None:
        m["attributes"]["layers"]["long"][1] += 1

    def wrong_weights(m: dict) -> None:
        w = m["attributes"]["weights"]
        w["double"] = w["double"][:-1]
        w["shape"]["dimensions"][0]["size"] -= 1

    return {
        "missing": (tmp / "missing.zip", "no such bundle"),
        "truncated": (truncated, "not a readable zip"),
        "foreign": (foreign, "no bundle.json (not an MLeap bundle)"),
        "other op": (_rewrite(good, tmp / "op.zip", other_op), "op is 'linear_regression'"),
        "wrong layers": (_rewrite(good, tmp / "layers.zip", wrong_layers), "weights for layers"),
        "wrong weights": (_rewrite(good, tmp / "weights.zip", wrong_weights), "weights for layers"),
    }


def load_error(src: Path, bundle: str, bad: Path, tmp: Path) -> str:
    """The watcher's load error for the function in `src` with `bad` in place of its `bundle`
    (a fresh process: the function's modules are loaded as the watcher loads them)."""
    copy = tmp / "src"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / bundle).unlink()
    if bad.exists():
        shutil.copy(bad, copy / bundle)
    script = (
        "import sys\n"
        "from openfx.watcher.loader import HandlerLoadError, load_handler\n"
        "try:\n    load_handler(sys.argv[1])\nexcept HandlerLoadError as exc:\n    print(exc)\n"
        "else:\n    print('loaded')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(copy / "handler.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.rstrip("\n").replace(str(copy / bundle), "<bundle>")
