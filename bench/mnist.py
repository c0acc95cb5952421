"""Digit recognition on MNIST: distributed training time and accuracy per partition count (1, 2, 4
trainers on Spark local[*], one run each, side by side, MLlib's MLP alongside), then inference
through the gateway: a PNG upload and MNIST's 784 JSON pixels over gRPC, the HTTP trigger, and
an Invokes stream of PNGs (one message in flight, so each message's latency is measured).

    .venv/bin/python bench/mnist.py [--calls 300] [--partitions 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
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


def train_rows(partitions: list[int], extra: list[str]) -> list[tuple[int, dict]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in track(partitions, description="training on Spark local[*]"):
            report = Path(tmp) / f"{n}.json"
            subprocess.run(
                [sys.executable, str(FN / "train.py"), "--partitions", str(n), "--output", ""]
                + ["--report", str(report), *extra],
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


def stream_latencies(stub, payloads: list[bytes], n: int) -> list[float]:  # type: ignore[no-untyped-def]
    """One Invokes stream; each message is sent when the previous answer came back."""
    outbox: queue.Queue = queue.Queue()

    def requests_():  # type: ignore[no-untyped-def]
        while (item := outbox.get()) is not None:
            yield item

    replies = stub.Invokes(requests_(), timeout=300)
    out = []
    for i in range(n):
        s = time.perf_counter()
        outbox.put(gpb.InvokeServiceRequest(Service="mnist", Input=payloads[i % len(payloads)]))
        next(replies)
        out.append(time.perf_counter() - s)
    outbox.put(None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--partitions", default="1,2,4")
    ap.add_argument("--train-args", default="", help="extra train.py arguments")
    args = parse_args(
        ap,
        calls=3,
        partitions="2",
        train_args="--rounds 1 --mllib-iter 3 --mllib-augment 0 --hidden 16 --mllib-hidden 16",
    )
    trained = train_rows([int(p) for p in args.partitions.split(",")], args.train_args.split())

    import cv2
    import numpy as np

    _, _, x_test, _ = load_data()
    pngs = []
    for r in x_test[:50]:
        ink = cv2.resize(r.reshape(28, 28).astype(np.uint8), (300, 300), interpolation=cv2.INTER_LINEAR)
        pngs.append(cv2.imencode(".png", 255 - ink)[1].tobytes())
    pixels = [json.dumps(r.astype(int).tolist()).encode() for r in x_test[:50]]

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
            ("gRPC Invoke, JSON 784 pixels", timed(grpc_call, pixels, args.calls)),
            ("HTTP trigger, PNG 300x300", timed(http_call, pngs, args.calls)),
            ("HTTP trigger, JSON 784 pixels", timed(http_call, pixels, args.calls)),
            ("Invokes stream, PNG 300x300", stream_latencies(stub, pngs, args.calls)),
        ]
    finally:
        platform.close()

    r0 = trained[0][1]
    print(
        f"\nlayers: trainers {'-'.join(map(str, r0['layers']))} ({r0['rounds']} averaging rounds of "
        f"{r0['epochs']} epochs), MLlib {'-'.join(map(str, r0['mllib_layers']))}; "
        f"{r0['test_rows']} held-out digits"
    )
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


if __name__ == "__main__":
    main()
