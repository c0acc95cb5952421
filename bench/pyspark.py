"""The neural network through the gateway: one row via the numpy fast path, via Spark's transform,
and the seed's design (data + model loaded per call), side by side; plus the function's cold start
(process start to ready, and to Spark ready).

    .venv/bin/python bench/pyspark.py [--calls 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from common import Platform, percentiles  # noqa: E402

from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402

ROW = b"[[-0.22, 0.83, -0.86, -0.92]]"


def timed(stub: gpb_grpc.FxGatewayStub, payload: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        s = time.perf_counter()
        stub.Invoke(gpb.InvokeServiceRequest(Service="pyspark", Input=payload), timeout=120)
        out.append(time.perf_counter() - s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    started = time.perf_counter()
    platform = Platform(["pyspark"])
    ready = time.perf_counter() - started
    stub = gpb_grpc.FxGatewayStub(grpc.insecure_channel(platform.grpc))
    try:
        while True:
            try:
                stub.Invoke(gpb.InvokeServiceRequest(Service="pyspark", Input=b""), timeout=120)
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.2)
        spark_ready = time.perf_counter() - started
        timed(stub, ROW, 50)
        rows = [
            ("fast path (numpy)", timed(stub, ROW, args.calls)),
            (
                "Spark transform",
                timed(
                    stub,
                    b'{"rows": [[-0.22, 0.83, -0.86, -0.92]], "engine": "spark"}',
                    max(10, args.calls // 10),
                ),
            ),
            (
                "seed design (load data + model per call)",
                timed(stub, b'{"rows": [[0,0,0,0]], "engine": "seed"}', max(5, args.calls // 30)),
            ),
        ]
    finally:
        platform.close()
    fast = percentiles(rows[0][1])[0]
    print(f"\ncold start: rows served {ready:.1f} s after launch, Spark ready {spark_ready:.1f} s")
    print("| path (through the gateway, 1 row) | calls | p50 ms | p99 ms | p50 vs fast path |")
    print("|---|---|---|---|---|")
    for name, lat in rows:
        p50, p99 = percentiles(lat)
        print(f"| {name} | {len(lat)} | {p50 / 1000:.2f} | {p99 / 1000:.2f} | {p50 / fast:.0f}x |")


if __name__ == "__main__":
    main()
