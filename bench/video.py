"""Video through imgprocessing, side by side in one run: 960x640 frames, JPEG q80, the default operation.

(a) the pipeline in-process (encode -> process -> decode), sequential and as a 2-thread pipeline
    (encoder thread || process+decode thread, 4 frames queued): the limit of one process here;
(b) streamed directly to a watcher (`FxWatcher.Calls`), W frames in flight;
(c) streamed through the gateway (`FxGateway.Invokes`), W frames in flight.

    .venv/bin/python bench/video.py [--frames 600] [--window 4] [--op faces]
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator

import cv2
import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "clients"))
from client import synthetic  # noqa: E402
from common import ROOT, Platform, parse_args, percentiles  # noqa: E402

from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402
from openfx.pb import fxwatcher_pb2 as wpb  # noqa: E402
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc  # noqa: E402
from openfx.watcher.loader import load_handler  # noqa: E402
from openfx.watcher.runtime import FunctionRuntime  # noqa: E402

Q = [cv2.IMWRITE_JPEG_QUALITY, 80]
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def encode(frame: np.ndarray, prefix: bytes) -> bytes:
    return prefix + cv2.imencode(".jpg", frame, Q)[1].tobytes()


def decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def inproc_sequential(
    frames: list[np.ndarray], handler: Callable, prefix: bytes
) -> tuple[float, list[float]]:
    lat = []
    t0 = time.perf_counter()
    for frame in frames:
        s = time.perf_counter()
        decode(handler(wpb.Request(input=encode(frame, prefix))))
        lat.append(time.perf_counter() - s)
    return len(frames) / (time.perf_counter() - t0), lat


def inproc_two_threads(
    frames: list[np.ndarray], handler: Callable, prefix: bytes
) -> tuple[float, list[float]]:
    q: queue.Queue = queue.Queue(maxsize=4)
    lat = []

    def producer() -> None:
        for frame in frames:
            s = time.perf_counter()
            q.put((s, encode(frame, prefix)))
        q.put(None)

    t0 = time.perf_counter()
    threading.Thread(target=producer, daemon=True).start()
    while (item := q.get()) is not None:
        s, data = item
        decode(handler(wpb.Request(input=data)))
        lat.append(time.perf_counter() - s)
    return len(frames) / (time.perf_counter() - t0), lat


def streamed(
    call: Callable, make: Callable, frames: list[np.ndarray], window: int, prefix: bytes
) -> tuple[float, list[float]]:
    slots = threading.Semaphore(window)
    sent: list[float] = []

    def requests() -> Iterator:
        for frame in frames:
            slots.acquire()
            data = encode(frame, prefix)
            sent.append(time.perf_counter())
            yield make(data)

    lat = []
    t0 = time.perf_counter()
    for i, reply in enumerate(call(requests())):
        decode(reply)
        lat.append(time.perf_counter() - sent[i])
        slots.release()
    return len(frames) / (time.perf_counter() - t0), lat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--op", default="", help="operation prefix (default: the function's default)")
    args = parse_args(parser, frames=8)
    prefix = f"op={args.op}\n".encode() if args.op else b""
    frames = list(synthetic(960, 640, args.frames))
    sizes = [len(encode(f, b"")) for f in frames[:30]]
    platform = Platform(["imgprocessing"])
    rows = []
    try:
        runtime = FunctionRuntime(
            "imgprocessing", load_handler(ROOT / "functions/imgprocessing/src/handler.py")
        )

        def handler(request: wpb.Request) -> bytes:  # the body, whatever the handler's return shape
            return runtime.invoke(request).Output

        warm = frames[: min(30, len(frames))]
        inproc_sequential(warm, handler, prefix)
        rows.append(("(a) in-process, sequential", *inproc_sequential(frames, handler, prefix)))
        rows.append(("(a) in-process, 2-thread pipeline", *inproc_two_threads(frames, handler, prefix)))

        watcher = wpb_grpc.FxWatcherStub(
            grpc.insecure_channel(platform.watchers["imgprocessing"], options=OPTIONS)
        )

        def direct(it):  # noqa: ANN001, ANN202
            return (r.Output for r in watcher.Calls(it))

        streamed(direct, lambda d: wpb.Request(input=d), warm, args.window, prefix)
        rows.append(
            (
                f"(b) stream to watcher, W={args.window}",
                *streamed(direct, lambda d: wpb.Request(input=d), frames, args.window, prefix),
            )
        )

        gateway = gpb_grpc.FxGatewayStub(grpc.insecure_channel(platform.grpc, options=OPTIONS))

        def via_gateway(it):  # noqa: ANN001, ANN202
            return (m.Output for m in gateway.Invokes(it))

        def make(d: bytes) -> gpb.InvokeServiceRequest:
            return gpb.InvokeServiceRequest(Service="imgprocessing", Input=d)

        streamed(via_gateway, make, warm, args.window, prefix)
        rows.append(
            (
                f"(c) stream through gateway, W={args.window}",
                *streamed(via_gateway, make, frames, args.window, prefix),
            )
        )
        rows.append(("(c) stream through gateway, W=1", *streamed(via_gateway, make, frames, 1, prefix)))
    finally:
        platform.close()
    ref = rows[1][1]
    print(
        f"\n960x640 JPEG q80 ({sum(sizes) // len(sizes):,} B mean), op={args.op or 'default (faces)'}, "
        f"{args.frames} frames"
    )
    print("| path | frames/s | p50 ms | p99 ms | frames/s vs (a) 2-thread |")
    print("|---|---|---|---|---|")
    for name, fps, lat in rows:
        p50, p99 = percentiles(lat)
        print(f"| {name} | {fps:.1f} | {p50 / 1000:.1f} | {p99 / 1000:.1f} | {fps / ref:.2f}x |")


if __name__ == "__main__":
    main()
