"""Soak: a steady rate through the gateway for 10 minutes with the function's process killed
(SIGKILL) every minute. Reports every call's outcome (nothing may hang: each call has a
deadline and each answer is counted) and the gateway's memory at start and end.

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import uvloop

sys.path.insert(0, os.path.dirname(__file__))
from common import Platform, parse_args  # noqa: E402

from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def watcher_pid(gateway_pid: int, function: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != gateway_pid:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"FUNCTION_NAME={function}".encode() in env:
            return int(entry.name)
    return None


async def main(args: argparse.Namespace) -> None:
    platform = Platform(["echo"])
    gateway = platform.procs[0]
    codes: collections.Counter[str] = collections.Counter()
    kills = 0
    try:
        channel = grpc.aio.insecure_channel(platform.grpc)
        stub = gpb_grpc.FxGatewayStub(channel)
        request = gpb.InvokeServiceRequest(Service="echo", Input=b"x" * 100)
        for _ in range(500):
            await stub.Invoke(request)
        rss_start = rss_kib(gateway.pid)
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            try:
                await stub.Invoke(request, timeout=5)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

        started = time.perf_counter()
        total = int(args.minutes * 60 * args.rate)
        next_kill = started + 60
        for i in range(total):
            now = time.perf_counter()
            if now >= next_kill:
                pid = watcher_pid(gateway.pid, "echo")
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                next_kill += 60
            delay = started + i / args.rate - now
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            if i % (args.rate * 30) == 0 and i:
                print(f"{(now - started) / 60:.1f} min: {dict(codes)}", flush=True)
        await asyncio.gather(*pending)
        rss_end = rss_kib(gateway.pid)
        await channel.close()
    finally:
        platform.close()
    answered = sum(codes.values())
    head = (
        "| minutes | rate/s | calls | answered | OK | UNAVAILABLE | other | kills | gateway RSS start → end |"
    )
    print()
    print(head)
    print("|---|---|---|---|---|---|---|---|---|")
    other = {k: v for k, v in codes.items() if k not in ("OK", "UNAVAILABLE")}
    counts = f"{total:,} | {answered:,} | {codes['OK']:,} | {codes['UNAVAILABLE']:,} | {other or 0}"
    memory = f"{rss_start / 1024:.1f} → {rss_end / 1024:.1f} MiB"
    print(f"| {args.minutes:g} | {args.rate:g} | {counts} | {kills} | {memory} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=int, default=200)
    uvloop.run(main(parse_args(ap, minutes=0.05, rate=20)))
