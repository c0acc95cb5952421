"""How long a function is without a working replica after the gateway recycles one: (1) a memory
breach (a handler allocating over `limits.memory: 128Mi`) until a fresh replica answers, and
(2) a call held past its 1 s timeout until the recycled replica answers.

    .venv/bin/python bench/isolation.py [--rounds 5]

Memory is enforced by the replica's cgroup when the gateway can write one (root), else by the RSS
watchdog; the table says which. Timeout recycling waits the grace (OPENFX_TIMEOUT_GRACE, 2 s)."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from common import ROOT, free_port, parse_args, scratch  # noqa: E402

from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "functions"
STACK = f"""
include:
  - {ROOT}/functions/echo/config.yaml
functions:
  hog:
    handler: {{dir: {FIXTURES}/hog/src}}
    limits: {{memory: 128Mi}}
  hold:
    handler: {{dir: {FIXTURES}/hold/src}}
    timeout: 1s
"""


def invoke(stub: gpb_grpc.FxGatewayStub, name: str, data: str, timeout: float = 30) -> bytes:
    return stub.Invoke(gpb.InvokeServiceRequest(Service=name, Input=data.encode()), timeout=timeout).Msg


def until_new_pid(stub: gpb_grpc.FxGatewayStub, name: str, old: bytes, limit: float = 60) -> float:
    """Poll until a replica other than `old` answers; the time that took."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        try:
            if invoke(stub, name, "pid", timeout=5) != old:
                return time.perf_counter() - started
        except grpc.RpcError:
            pass
        time.sleep(0.01)
    raise SystemExit(f"{name} never came back")


def memory_round(stub: gpb_grpc.FxGatewayStub) -> tuple[float, float]:
    old = invoke(stub, "hog", "pid")
    started = time.perf_counter()
    try:
        invoke(stub, "hog", "400")
        raise SystemExit("hog held 400 MiB under a 128Mi limit")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
    refused = time.perf_counter() - started
    return refused, refused + until_new_pid(stub, "hog", old)


def timeout_round(stub: gpb_grpc.FxGatewayStub, folder: Path, i: int) -> tuple[float, float]:
    old = invoke(stub, "hold", "pid")
    try:
        invoke(stub, "hold", f"hold {folder}/{i}")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
    back = until_new_pid(stub, "hold", old)
    return back, back


def measure(args: argparse.Namespace, tmp: Path) -> tuple[str, list, list]:
    """Start a gateway on the bench's stack in `tmp` and time the recycles."""
    (tmp / "stack.yaml").write_text(STACK)
    grpc_address = f"127.0.0.1:{free_port()}"
    with open(tmp / "gateway.log", "wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "openfx.gateway", "-f", str(tmp / "stack.yaml"), "--grpc", grpc_address]
            + ["--http", f"127.0.0.1:{free_port()}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        stub = gpb_grpc.FxGatewayStub(grpc.insecure_channel(grpc_address))
        deadline = time.monotonic() + 120
        while True:
            try:
                fns = stub.List(gpb.Empty(), timeout=1).Functions
                if len(fns) == 3 and all(f.AvailableReplicas for f in fns):
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise SystemExit(f"gateway not ready; see {tmp / 'gateway.log'}")
            time.sleep(0.2)
        how = stub.GetMeta(gpb.FunctionRequest(FunctionName="hog"), timeout=5).Annotations[
            "openfx.limits.memory"
        ]
        memory = [memory_round(stub) for _ in range(args.rounds)]
        timeouts = [timeout_round(stub, tmp, i) for i in range(args.rounds)]
    finally:
        gateway.terminate()
        gateway.wait(60)
    return how, memory, timeouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parse_args(parser, rounds=1)
    with scratch(mode=0o1777) as tmp:  # the hold handler (maybe the function user) writes markers
        how, memory, timeouts = measure(args, tmp)

    def cells(samples: list[float]) -> str:
        ms = sorted(s * 1000 for s in samples)
        return f"{statistics.median(ms):,.0f} | {ms[0]:,.0f} | {ms[-1]:,.0f}"

    print(f"\nRecycling ({args.rounds} rounds each; hog limits.memory {how}; hold timeout 1s, grace 2s)\n")
    rows = [
        ("call over the memory limit sent", "caller gets RESOURCE_EXHAUSTED", [m[0] for m in memory]),
        ("call over the memory limit sent", "a fresh replica answers", [m[1] for m in memory]),
        ("caller gets DEADLINE_EXCEEDED (1 s)", "the recycled replica answers", [t[0] for t in timeouts]),
    ]
    print("| from | to | median ms | min ms | max ms |")
    print("|---|---|---|---|---|")
    for start, end, samples in rows:
        print(f"| {start} | {end} | {cells(samples)} |")
    print(
        f"(one run, {os.cpu_count()} cores, Python {sys.version.split()[0]}, gateway as uid {os.geteuid()})"
    )


if __name__ == "__main__":
    main()
