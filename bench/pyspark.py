"""The neural network through the gateway, all in one run: one row scored by the numpy fast path,
by MLeap's JVM runtime (warm, the function's own helper JVM), by Spark's transform and by the
seed's design (data split + bundle load + evaluation per call); the MLeap bundle's load time in
Python (zipfile + json + checks) and in MLeap's JVM; and the function's cold start.

    .venv/bin/python bench/pyspark.py [--calls 300] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "functions" / "pyspark" / "src"))
from common import Platform, parse_args, percentiles  # noqa: E402
from mleap_bundle import MleapRuntime, read_bundle  # noqa: E402
from mlp import BUNDLE, Network  # noqa: E402

from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402

ROW = "[[-0.22, 0.83, -0.86, -0.92]]"


def timed(stub: gpb_grpc.FxGatewayStub, payload: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        s = time.perf_counter()
        stub.Invoke(gpb.InvokeServiceRequest(Service="pyspark", Input=payload), timeout=120)
        out.append(time.perf_counter() - s)
    return out


def engine(name: str) -> bytes:
    return f'{{"rows": {ROW}, "engine": "{name}"}}'.encode()


def bundle_loads(n: int) -> list[tuple[str, float]]:
    """Seconds to read the bundle: Python (median of n), MLeap's JVM (cold, then warm median)."""
    python = []
    for _ in range(n):
        s = time.perf_counter()
        bundle = read_bundle(BUNDLE)
        Network(bundle.layers, bundle.weights)
        python.append(time.perf_counter() - s)
    s = time.perf_counter()
    with MleapRuntime() as runtime:
        jvm_start = time.perf_counter() - s
        jvm_cold = runtime.load(BUNDLE)
        jvm_warm = statistics.median(runtime.load(BUNDLE) for _ in range(n))
    return [
        ("Python: zipfile + json + checks + numpy", statistics.median(python)),
        ("MLeap JVM: helper start (java, MLeap classpath)", jvm_start),
        ("MLeap JVM: first load (BundleBuilder.load)", jvm_cold),
        ("MLeap JVM: load again (warm)", jvm_warm),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    args = parse_args(ap, calls=3)
    loads = bundle_loads(3 if args.smoke else 20)
    started = time.perf_counter()
    platform = Platform(["pyspark"])
    ready = time.perf_counter() - started
    stub = gpb_grpc.FxGatewayStub(grpc.insecure_channel(platform.grpc))
    try:
        deadline = time.monotonic() + (90 if args.smoke else 300)  # both JVMs: ~20-45 s here
        while True:
            try:
                request = gpb.InvokeServiceRequest(Service="pyspark", Input=b"")
                accuracy = stub.Invoke(request, timeout=max(1.0, deadline - time.monotonic())).Msg
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    print(platform.log_tail(), file=sys.stderr)
                    why = f"{exc.code().name}: {exc.details()}"
                    raise SystemExit(f"no accuracy line from pyspark: {why}") from None
                time.sleep(0.2)
        jvm_ready = time.perf_counter() - started
        for name in ("numpy", "mleap", "spark"):
            timed(stub, engine(name), 3 if args.smoke else 30)  # warm-up
        few = max(3, args.calls // 10)
        rows = [
            ("numpy fast path", timed(stub, engine("numpy"), args.calls)),
            ("MLeap JVM runtime (warm helper)", timed(stub, engine("mleap"), args.calls)),
            ("Spark transform", timed(stub, engine("spark"), few)),
            ("seed design (split + bundle load + evaluate per call)", timed(stub, engine("seed"), few)),
        ]
    finally:
        platform.close()
    fast = percentiles(rows[0][1])[0]
    print(f"\n{accuracy.decode()}")
    print(f"cold start: rows served {ready:.1f} s after launch, MLeap JVM + Spark ready {jvm_ready:.1f} s")
    print("| path (through the gateway, 1 row) | calls | p50 ms | p99 ms | p50 vs numpy |")
    print("|---|---|---|---|---|")
    for name, lat in rows:
        p50, p99 = percentiles(lat)
        print(f"| {name} | {len(lat)} | {p50 / 1000:.2f} | {p99 / 1000:.2f} | {p50 / fast:.1f}x |")
    print("\n| bundle load (src/model.zip) | ms |")
    print("|---|---|")
    for name, seconds in loads:
        print(f"| {name} | {seconds * 1000:.2f} |")


if __name__ == "__main__":
    main()
