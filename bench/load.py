"""Load: 64 concurrent clients for 60 s against echo and sentiment-analysis through the gateway,
over gRPC and HTTP; then the same above a function's in-flight limit (only RESOURCE_EXHAUSTED /
429 allowed there).

    .venv/bin/python bench/load.py [--clients 64] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time

import aiohttp
import grpc
import uvloop

sys.path.insert(0, os.path.dirname(__file__))
from common import Platform, parse_args, percentiles  # noqa: E402

from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402

PAYLOADS = {"echo": b"x" * 100, "sentiment-analysis": b"What a wonderful, sunny and happy day it is today!"}


async def run(platform: Platform, function: str, path: str, clients: int, seconds: float) -> dict:
    lat: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    stop_at = time.perf_counter() + seconds
    payload = PAYLOADS[function]
    if path == "gRPC":
        channel = grpc.aio.insecure_channel(platform.grpc)
        stub = gpb_grpc.FxGatewayStub(channel)
        request = gpb.InvokeServiceRequest(Service=function, Input=payload)

        async def one() -> str:
            try:
                await stub.Invoke(request, timeout=30)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
    else:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients))
        url = f"http://{platform.http}/function/{function}"

        async def one() -> str:
            async with session.post(url, data=payload) as r:
                await r.read()
                return str(r.status)

    async def client() -> None:
        while time.perf_counter() < stop_at:
            s = time.perf_counter()
            code = await one()
            lat.append(time.perf_counter() - s)
            codes[code] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    if path == "gRPC":
        await channel.close()
    else:
        await session.close()
    p50, p99 = percentiles(lat)
    return {
        "rps": len(lat) / elapsed,
        "p50": p50 / 1000,
        "p99": p99 / 1000,
        "max": max(lat) * 1000,
        "codes": codes,
    }


async def main(args: argparse.Namespace) -> None:
    rows = []
    platform = Platform(list(PAYLOADS))
    try:
        for function in PAYLOADS if not args.limited_only else ():
            for path in ("gRPC", "HTTP"):
                r = await run(platform, function, path, args.clients, args.seconds)
                rows.append((function, path, f"{args.clients} clients, limit 1000", r))
                print(rows[-1], flush=True)
    finally:
        platform.close()
    limited = Platform(["echo"], max_inflight=16)
    try:
        for path in ("gRPC", "HTTP"):
            r = await run(limited, "echo", path, args.clients, min(args.seconds, 20))
            rows.append(("echo", path, f"{args.clients} clients, max_inflight 16", r))
            print(rows[-1], flush=True)
    finally:
        limited.close()
    print("\n| function | path | load | req/s | p50 ms | p99 ms | max ms | answers |")
    print("|---|---|---|---|---|---|---|---|")
    for function, path, load, r in rows:
        answers = ", ".join(f"{k}: {v:,}" for k, v in r["codes"].most_common())
        ms = f"{r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.0f}"
        print(f"| {function} | {path} | {load} | {r['rps']:,.0f} | {ms} | {answers} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--limited-only", action="store_true", help="only the run above the in-flight limit")
    uvloop.run(main(parse_args(ap, clients=4, seconds=1.0)))
