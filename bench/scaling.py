"""Serverless scaling in the embedded platform: cold start from zero vs warm calls, per function,
and a burst showing the replicas follow the load (README "Scaling").

    .venv/bin/python bench/scaling.py [--starts 5] [--functions echo,sentiment-analysis,...]

Cold start: the function is pinned to 0 replicas and released to the autoscaler (it stays at
zero), then one call is timed from the request to the answer: the activator starts a replica and
the call waits for its readiness (the handler's __init__). Warm: the p50 of calls right after.
Burst: a function taking 50 ms a call (concurrency_target 2, max_replicas 4, stable_window 4s)
under 1, 8, then 1 callers; desired and ready replicas sampled every 0.2 s, plotted to
bench/scaling-burst.png when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from common import ROOT, free_port, parse_args  # noqa: E402

from openfx.function_def import SCALE_AUTO  # noqa: E402
from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402

INPUTS = {
    "echo": b"hello",
    "sentiment-analysis": b"Have a nice day",
    "unmarshalling": b'{"name": "battery sensor", "capacity": 40, "time": "2019-01-21T19:07:28Z"}',
    "pyspark": b"[[-0.22, 0.83, -0.86, -0.92]]",
    "mnist": (ROOT / "functions/mnist/samples/0.png").read_bytes()
    if (ROOT / "functions/mnist/samples/0.png").exists()
    else b"",
    "imgprocessing": b"",
}
SLOW = ROOT / "tests/fixtures/functions/slow/src"


def start(functions: list[str], tmp: Path) -> tuple[object, gpb_grpc.FxGatewayStub]:
    import subprocess

    lines = ["include:"] + [f"  - {ROOT}/functions/{fn}/config.yaml" for fn in functions]
    lines += ["functions:"]
    for fn in functions:
        lines += [f"  {fn}:", "    scale_to_zero_after: 10m", "    max_inflight: 1000"]
    lines += [
        "  burst:",
        f"    handler: {{dir: {SLOW}}}",
        "    environment: {SLOW_SECONDS: '0.05'}",
        "    concurrency_target: 2",
        "    max_replicas: 4",
        "    stable_window: 4s",
        "    max_inflight: 1000",
    ]
    stack = tmp / "stack.yaml"
    stack.write_text("\n".join(lines) + "\n")
    address = f"127.0.0.1:{free_port()}"
    log = open(tmp / "gateway.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "openfx.gateway", "-f", str(stack), "--grpc", address, "--open-management"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    stub = gpb_grpc.FxGatewayStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            fns = stub.List(gpb.Empty(), timeout=2).Functions
            if len(fns) == len(functions) + 1 and all(f.AvailableReplicas >= f.Replicas for f in fns):
                return proc, stub
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"platform did not become ready; see {tmp / 'gateway.log'}")


def counts(stub: gpb_grpc.FxGatewayStub, name: str) -> tuple[int, int]:
    fn = stub.GetMeta(gpb.FunctionRequest(FunctionName=name), timeout=5)
    return fn.Replicas, fn.AvailableReplicas


def call(stub: gpb_grpc.FxGatewayStub, name: str, data: bytes) -> None:
    try:
        stub.Invoke(gpb.InvokeServiceRequest(Service=name, Input=data), timeout=300)
    except grpc.RpcError as exc:  # a bad-input answer still proves a ready replica
        if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL):
            raise


def to_zero(stub: gpb_grpc.FxGatewayStub, name: str) -> None:
    stub.ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName=name, Replicas=0), timeout=60)
    stub.ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName=name, Replicas=SCALE_AUTO), timeout=60)
    while counts(stub, name) != (0, 0):
        time.sleep(0.05)


def cold_and_warm(stub: gpb_grpc.FxGatewayStub, name: str, starts: int, warm: int) -> tuple[float, float]:
    cold: list[float] = []
    hot: list[float] = []
    data = INPUTS.get(name, b"")
    for _ in range(starts):
        to_zero(stub, name)
        t0 = time.perf_counter()
        call(stub, name, data)
        cold.append(time.perf_counter() - t0)
        for _ in range(warm):
            t0 = time.perf_counter()
            call(stub, name, data)
            hot.append(time.perf_counter() - t0)
    return sorted(cold)[len(cold) // 2], sorted(hot)[len(hot) // 2]


def burst(stub: gpb_grpc.FxGatewayStub, phases: list[tuple[int, float]]) -> list[tuple[float, int, int, int]]:
    """(t, callers, desired, ready) every 0.2 s while the phases run."""
    callers = [0]
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            if i < callers[0]:
                call(stub, "burst", b"x")
            else:
                time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(max(c for c, _ in phases))]
    for t in threads:
        t.start()
    samples = []
    t0 = time.monotonic()
    try:
        for n, seconds in phases:
            callers[0] = n
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                desired, ready = counts(stub, "burst")
                samples.append((time.monotonic() - t0, n, desired, ready))
                time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return samples


def plot(samples: list[tuple[float, int, int, int]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [s[0] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.step(t, [s[1] for s in samples], where="post", label="callers", color="0.6")
    ax.step(t, [s[2] for s in samples], where="post", label="desired replicas")
    ax.step(t, [s[3] for s in samples], where="post", label="ready replicas", linestyle="--")
    ax.set_xlabel("seconds")
    ax.set_title("burst: 50 ms calls, concurrency_target 2, max_replicas 4, stable_window 4s")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5, help="cold starts per function (p50)")
    parser.add_argument("--warm", type=int, default=20, help="warm calls after each start")
    parser.add_argument("--functions", default="echo,unmarshalling,sentiment-analysis,mnist,pyspark")
    parser.add_argument("--phase", type=float, default=8.0, help="seconds of each burst phase")
    parser.add_argument("--png", default=str(ROOT / "bench" / "scaling-burst.png"))
    args = parse_args(parser, starts=1, warm=2, functions="echo", phase=1.0, png="")
    functions = [f for f in args.functions.split(",") if f]
    tmp = Path(tempfile.mkdtemp(prefix="openfx-bench-"))
    proc, stub = start(functions, tmp)
    try:
        print(f"\nCold start from zero vs warm, p50 over {args.starts} starts")
        print("| function | cold start to first answer ms | warm p50 ms |")
        print("|---|---|---|")
        for name in functions:
            cold, warm = cold_and_warm(stub, name, args.starts, args.warm)
            print(f"| {name} | {cold * 1e3:,.0f} | {warm * 1e3:,.1f} |")
        samples = burst(stub, [(1, args.phase), (8, args.phase), (1, args.phase * 1.5), (0, args.phase)])
        print("\nBurst: callers, desired and ready replicas over time (every second)")
        print("| t s | callers | desired | ready |")
        print("|---|---|---|---|")
        for t, n, desired, ready in samples[::5]:
            print(f"| {t:.1f} | {n} | {desired} | {ready} |")
        if args.png and plot(samples, Path(args.png)):
            print(f"(plot: {args.png})")
        print(f"({os.cpu_count()} cores, Python {sys.version.split()[0]})")
    finally:
        proc.terminate()  # type: ignore[attr-defined]
        proc.wait(60)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
