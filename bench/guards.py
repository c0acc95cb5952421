"""What the safety guards cost: echo through the gateway of the tree before them (commit c512509:
open management, no Host/Origin checks, replicas as root, no cgroups, no recycling monitor) and
through this tree (all of them on), side by side in one run, alternating A/B rounds.

    .venv/bin/python bench/guards.py [--rounds 3] [--calls 2000] [--seconds 3] [--concurrency 8]

Both gateways run from the same .venv (PYTHONPATH selects the tree) with echo's own config.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import uvloop

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    ROOT,
    Result,
    cpu_seconds,
    descendants,
    free_port,
    measure,
    parse_args,
    scratch,
)

from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402

BEFORE = "c512509"  # the last commit before the isolation and safety work (issue #12)
PAYLOAD = b"x" * 100


@dataclass
class Row:
    result: Result
    gateway_us: float  # CPU per call
    function_us: float


class Gateway:
    """`python -m openfx.gateway` from `tree`, serving echo."""

    def __init__(self, tree: Path, tmp: Path, label: str) -> None:
        self.label = label
        self.grpc, self.http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        stack = tmp / f"{label}.yaml"
        stack.write_text(
            f"include: [{tree}/functions/echo/config.yaml]\nfunctions:\n  echo:\n    max_inflight: 1000\n"
        )
        # the console (port 31115 by default) on a free port: two gateways run side by side
        env = {**os.environ, "PYTHONPATH": str(tree), "OPENFX_CONSOLE_ADDR": "127.0.0.1:0"}
        env.pop("OPENFX_TOKEN", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openfx.gateway",
                "-f",
                str(stack),
                "--grpc",
                self.grpc,
                "--http",
                self.http,
            ],
            env=env,
            cwd=tree,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / f"{label}.log", "wb"),  # noqa: SIM115 (lives as long as the gateway)
        )
        stub = gpb_grpc.FxGatewayStub(grpc.insecure_channel(self.grpc))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if stub.Invoke(gpb.InvokeServiceRequest(Service="echo", Input=b"x"), timeout=2).Msg == b"x":
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        raise SystemExit(f"{label} gateway did not serve echo; see {tmp / f'{label}.log'}")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def cpu_of(gw: Gateway) -> tuple[float, float]:
    """CPU seconds so far of the gateway process and of its replicas (every descendant)."""
    pid = gw.process.pid
    return cpu_seconds(pid), sum(map(cpu_seconds, descendants(pid)))


async def measured(
    gw: Gateway, name: str, call: Callable[[], Awaitable[object]], args: argparse.Namespace
) -> Row:
    """One path's latency and throughput, and the CPU each side spent per call meanwhile: the cost
    of the guards without the scheduling noise that moves req/s by ±10% between rounds."""
    calls = 0

    async def counted() -> object:
        nonlocal calls
        calls += 1
        return await call()

    before = cpu_of(gw)
    result = await measure(f"{gw.label} {name}", counted, args.calls, args.concurrency, args.seconds)
    after = cpu_of(gw)
    return Row(result, (after[0] - before[0]) / calls * 1e6, (after[1] - before[1]) / calls * 1e6)


async def round_of(gw: Gateway, args: argparse.Namespace) -> tuple[Row, Row]:
    async with grpc.aio.insecure_channel(gw.grpc) as channel:
        stub = gpb_grpc.FxGatewayStub(channel)
        request = gpb.InvokeServiceRequest(Service="echo", Input=PAYLOAD)

        async def via_grpc() -> object:
            return await stub.Invoke(request)

        grpc_row = await measured(gw, "gRPC", via_grpc, args)
    async with aiohttp.ClientSession() as session:
        url = f"http://{gw.http}/function/echo"

        async def via_http() -> object:
            async with session.post(url, data=PAYLOAD) as r:
                return await r.read()

        http_row = await measured(gw, "HTTP", via_http, args)
    return grpc_row, http_row


async def main(args: argparse.Namespace) -> None:
    with scratch("openfx-guards-") as tmp:  # the logs stay when the run fails
        base = tmp / "before"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), BEFORE], check=True
        )
        gateways = []
        try:
            gateways = [Gateway(base, tmp, "before"), Gateway(ROOT, tmp, "after")]
            rows: dict[str, list[Row]] = {}
            for i in range(args.rounds):
                for gw in gateways if i % 2 == 0 else reversed(gateways):
                    for row in await round_of(gw, args):
                        rows.setdefault(row.result.name, []).append(row)
                        print(
                            f"  round {i + 1}: {row.result.name}: p50 {row.result.p50_us:.0f} µs, "
                            f"{row.result.rps_n:,.0f} req/s, CPU per call: gateway {row.gateway_us:.0f} µs, "
                            f"echo {row.function_us:.0f} µs",
                            flush=True,
                        )
        finally:
            for gw in gateways:
                gw.close()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    print_table(rows, args)


def print_table(rows: dict[str, list[Row]], args: argparse.Namespace) -> None:
    def median(path: str, when: str, value: Callable[[Row], float]) -> float:
        return statistics.median(value(r) for r in rows[f"{when} {path}"])

    rounds = f"median of {args.rounds} alternating rounds, c={args.concurrency}"
    print(f"\necho, {len(PAYLOAD)}-byte payload, {rounds}")
    print(
        "| path | p50 µs before / after | ratio | req/s before / after | ratio "
        "| CPU µs per call (gateway + echo) before / after | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for path in ("gRPC", "HTTP"):
        bp, ap = (median(path, w, lambda r: r.result.p50_us) for w in ("before", "after"))
        br, ar = (median(path, w, lambda r: r.result.rps_n) for w in ("before", "after"))
        bc, ac = (median(path, w, lambda r: r.gateway_us + r.function_us) for w in ("before", "after"))
        bg, ag = (median(path, w, lambda r: r.gateway_us) for w in ("before", "after"))
        bf, af = (median(path, w, lambda r: r.function_us) for w in ("before", "after"))
        print(
            f"| {path} | {bp:,.0f} / {ap:,.0f} | {ap / bp:.3f}x | {br:,.0f} / {ar:,.0f} | {ar / br:.3f}x "
            f"| {bg:.0f} + {bf:.0f} = {bc:.0f} / {ag:.0f} + {af:.0f} = {ac:.0f} | {ac / bc:.3f}x |"
        )
    print(f"({os.cpu_count()} cores, Python {sys.version.split()[0]}, running as uid {os.geteuid()})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    uvloop.run(main(parse_args(parser, rounds=1, calls=20, seconds=0.2)))
