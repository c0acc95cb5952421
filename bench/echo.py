"""Echo through each layer, side by side in one run: (a) the handler in-process, (b) a direct gRPC
call to the watcher, (c) the gateway over gRPC, (d) the HTTP trigger.

    .venv/bin/python bench/echo.py [--calls 3000] [--seconds 4] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import os
import sys

import aiohttp
import grpc
import uvloop

sys.path.insert(0, os.path.dirname(__file__))
from common import Platform, Result, measure, parse_args, print_table  # noqa: E402

from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402
from openfx.pb import fxwatcher_pb2 as wpb  # noqa: E402
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc  # noqa: E402
from openfx.watcher.loader import load_handler  # noqa: E402
from openfx.watcher.runtime import FunctionRuntime  # noqa: E402

PAYLOAD = b"x" * 100


async def main(args: argparse.Namespace) -> None:
    platform = Platform(["echo"])
    try:
        rows: list[Result] = []
        handler = os.path.join(os.path.dirname(__file__), "..", "functions/echo/src/handler.py")
        runtime = FunctionRuntime("echo", load_handler(handler))
        request = wpb.Request(input=PAYLOAD)

        async def inproc() -> object:
            return await runtime.invoke_async(request) if runtime.is_async else runtime.invoke(request)

        rows.append(
            await measure("(a) in-process handler", inproc, args.calls, args.concurrency, args.seconds)
        )

        async with grpc.aio.insecure_channel(platform.watchers["echo"]) as ch:
            watcher = wpb_grpc.FxWatcherStub(ch)

            async def direct() -> object:
                return await watcher.Call(request)

            rows.append(
                await measure(
                    "(b) direct gRPC to watcher", direct, args.calls, args.concurrency, args.seconds
                )
            )

        async with grpc.aio.insecure_channel(platform.grpc) as ch:
            gateway = gpb_grpc.FxGatewayStub(ch)
            invoke = gpb.InvokeServiceRequest(Service="echo", Input=PAYLOAD)

            async def via_gateway() -> object:
                return await gateway.Invoke(invoke)

            rows.append(
                await measure("(c) gateway gRPC", via_gateway, args.calls, args.concurrency, args.seconds)
            )

        async with aiohttp.ClientSession() as session:
            url = f"http://{platform.http}/function/echo"

            async def via_http() -> object:
                async with session.post(url, data=PAYLOAD) as r:
                    return await r.read()

            rows.append(
                await measure("(d) HTTP trigger", via_http, args.calls, args.concurrency, args.seconds)
            )
        print_table(
            f"echo, {len(PAYLOAD)}-byte payload", rows, "(b) direct gRPC to watcher", args.concurrency
        )
    finally:
        platform.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    uvloop.run(main(parse_args(parser, calls=20, seconds=0.2)))
