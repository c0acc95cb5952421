"""Digit recognition: distributed training time per partition count (1, 2, 4 trainers on Spark
local[*], one run each, side by side), then inference through the gateway: a PNG upload and a
JSON pixel array over gRPC, the HTTP trigger, and an Invokes stream of images.

    .venv/bin/python bench/mnist.py [--calls 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import requests
from rich.progress import track

sys.path.insert(0, os.path.dirname(__file__))
from common import Platform, parse_args, percentiles  # noqa: E402

from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402

FN = Path(__file__).resolve().parent.parent / "functions/mnist"
sys.path[:0] = [str(FN), str(FN / "src")]
from train import load_data  # noqa: E402


def train_rows(partitions: list[int]) -> list[tuple[int, dict]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in track(partitions, description="training on Spark local[*]"):
            report = Path(tmp) / f"{n}.json"
            subprocess.run(
                [sys.executable, str(FN / "train.py"), "--partitions", str(n), "--output", ""]
                + ["--report", str(report)],
                check=True,
                capture_output=True,
            )
            rows.append((n, json.loads(report.read_text())))
    return rows


def timed(call, payloads: list[bytes], n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for i in range(n):
        s = time.perf_counter()
        call(payloads[i % len(payloads)])
        out.append(time.perf_counter() - s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--partitions", default="1,2,4")
    args = parse_args(ap, calls=3, partitions="2")
    trained = train_rows([int(p) for p in args.partitions.split(",")])

    import cv2
    import numpy as np

    _, _, x_test, _ = load_data()
    pngs = []
    for r in x_test[:50]:
        ink = cv2.resize((r.reshape(8, 8) / 16 * 255).astype(np.uint8), (200, 200), interpolation=0)
        pngs.append(cv2.imencode(".png", 255 - np.pad(ink, 50))[1].tobytes())
    pixels = [json.dumps(r.tolist()).encode() for r in x_test[:50]]

    platform = Platform(["mnist"])
    try:
        stub = gpb_grpc.FxGatewayStub(grpc.insecure_channel(platform.grpc))

        def grpc_call(data: bytes) -> None:
            stub.Invoke(gpb.InvokeServiceRequest(Service="mnist", Input=data), timeout=30)

        session = requests.Session()

        def http_call(data: bytes) -> None:
            session.post(f"http://{platform.http}/function/mnist", data=data, timeout=30).raise_for_status()

        timed(grpc_call, pngs, 50)
        paths = [
            ("gRPC Invoke, PNG 300x300", timed(grpc_call, pngs, args.calls)),
            ("gRPC Invoke, JSON 64 pixels", timed(grpc_call, pixels, args.calls)),
            ("HTTP trigger, PNG 300x300", timed(http_call, pngs, args.calls)),
        ]
        stream_started = time.perf_counter()
        requests_ = (gpb.InvokeServiceRequest(Service="mnist", Input=pngs[i % 50]) for i in range(args.calls))
        answered = sum(1 for _ in stub.Invokes(requests_, timeout=120))
        stream_s = time.perf_counter() - stream_started
    finally:
        platform.close()

    print(
        "\n| trainers (partitions) | rows each | distributed training s | averaged accuracy |"
        " best single trainer | MLlib MLP (all rows) s | MLlib accuracy |"
    )
    print("|---|---|---|---|---|---|---|")
    base = trained[0][1]["distributed_train_s"]
    for n, r in trained:
        rows = "/".join(str(p["rows"]) for p in r["partitions"])
        best = max(p["accuracy"] for p in r["partitions"])
        print(
            f"| {n} | {rows} | {r['distributed_train_s']:.2f} ({r['distributed_train_s'] / base:.2f}x) "
            f"| {r['averaged_accuracy']:.4f} | {best:.4f} "
            f"| {r['mllib_train_s']:.2f} | {r['mllib_accuracy']:.4f} |"
        )
    print("\n| inference path (through the gateway) | calls | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, lat in paths:
        p50, p99 = percentiles(lat)
        print(f"| {name} | {len(lat)} | {p50 / 1000:.2f} | {p99 / 1000:.2f} |")
    print(f"| Invokes stream, PNG 300x300 | {answered} | {stream_s / answered * 1000:.2f} (mean) | |")


if __name__ == "__main__":
    main()
