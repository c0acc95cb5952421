"""The workshop functions on realistic inputs: the handler called in-process vs through the gateway (gRPC).

    .venv/bin/python bench/functions.py [--calls 300] [--seconds 3] [--concurrency 4]

Inputs: a tweet-sized text, a 960x640 JPEG (q80, default operation = face detection), a
100 KB page from a local HTTP server, a 100-byte sensor reading.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import sys
import threading

import cv2
import grpc
import numpy as np
import uvloop

sys.path.insert(0, os.path.dirname(__file__))
from common import ROOT, Platform, measure, parse_args  # noqa: E402

from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402
from openfx.pb import fxwatcher_pb2 as wpb  # noqa: E402
from openfx.watcher.loader import load_handler  # noqa: E402
from openfx.watcher.runtime import FunctionRuntime  # noqa: E402

TWEET = b"Just tried the new ramen place downtown and honestly it was amazing, best broth I've had in years!"
READING = b'{"name": "battery sensor", "capacity": 40, "time": "2019-01-21T19:07:28Z"}'
PAGE = (
    "<html><body>"
    + "".join(
        f'<p><a class="issue" href="/{i}">Headline number {i} about things</a></p>' for i in range(1500)
    )
    + "</body></html>"
).encode()[:100_000]


def frame() -> bytes:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:640, 0:960]
    img = np.stack([(x * 255 / 960), (y * 255 / 640), ((x + y) % 256)], axis=-1).astype(np.uint8)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    cv2.circle(img, (480, 320), 120, (255, 255, 255), -1)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()


class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = PAGE if self.path == "/page.html" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


async def main(args: argparse.Namespace) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/page.html"
    os.environ["CRAWLER_ALLOW_PRIVATE"] = "1"  # the in-process crawler and the gateway's (inherited env)
    cases = {
        "sentiment-analysis": TWEET,
        "imgprocessing": frame(),
        "crawler": json.dumps({"url": url, "selector": "a.issue"}).encode(),
        "unmarshalling": READING,
    }
    platform = Platform(list(cases), environment={"crawler": {"CRAWLER_ALLOW_PRIVATE": "1"}})
    print(f"| function | input | path | p50 ms | p99 ms | req/s c=1 | req/s c={args.concurrency} |")
    print("|---|---|---|---|---|---|---|")
    try:
        async with grpc.aio.insecure_channel(
            platform.grpc,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        ) as ch:
            gateway = gpb_grpc.FxGatewayStub(ch)
            for name, payload in cases.items():
                runtime = FunctionRuntime(name, load_handler(ROOT / "functions" / name / "src/handler.py"))
                request = wpb.Request(input=payload)

                async def inproc(runtime=runtime, request=request) -> object:
                    if runtime.is_async:
                        return await runtime.invoke_async(request)
                    return runtime.invoke(request)

                invoke = gpb.InvokeServiceRequest(Service=name, Input=payload)

                async def via_gateway(invoke=invoke) -> object:
                    return await gateway.Invoke(invoke)

                for label, fn, conc in (
                    ("in-process", inproc, 1),
                    ("gateway gRPC", via_gateway, args.concurrency),
                ):
                    r = await measure(label, fn, args.calls, conc, args.seconds)
                    ms = f"{r.p50_us / 1000:.2f} | {r.p99_us / 1000:.2f}"
                    row = f"| {name} | {len(payload):,} B | {label} | {ms} | {r.rps_1:,.0f} | {r.rps_n:,.0f}"
                    print(row + " |", flush=True)
    finally:
        platform.close()
        server.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    uvloop.run(main(parse_args(parser, calls=5, seconds=0.2)))
