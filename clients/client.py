"""Stream video frames through a function (the workshop's "User Client", done right).

    python clients/client.py imgprocessing --image test.mp4            # a video file
    python clients/client.py imgprocessing --image 0                   # camera 0
    python clients/client.py imgprocessing --image synthetic --frames 300 --output out.mp4

Frames are JPEG-encoded and streamed over `Invokes`; at most --window frames are in flight
(pipelined, not lock-step), so a slow function slows the client instead of growing queues.
Processed frames go to a window when a display exists, else to --output (or nowhere).
Prints a live progress line, then frames/s and end-to-end latency p50/p99.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # our one-line errors, not OpenCV's warnings

import cv2  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402

from openfx.client_channel import gateway_channel  # noqa: E402
from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402


class ClientError(Exception):
    """One line for the user; exit code 1."""


def synthetic(width: int, height: int, count: int) -> Iterator[np.ndarray]:
    """Moving gradient + shapes + noise, for machines without a camera or a video file.

    30 distinct frames are drawn once and cycled (with the frame number stamped on each), so the
    source costs next to nothing and the measurement is of the stream, not of the generator.
    """
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width]
    base = []
    for i in range(30):
        shift = (i * 8) % width
        img = np.stack([(x + shift) % 256, (y + i) % 256, ((x + y + 3 * i) // 3) % 256], axis=-1).astype(
            np.float32
        )
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        left = 50 + (i * 5) % max(1, width - 200)
        cv2.rectangle(img, (left, 80), (left + 100, 220), (255, 255, 255), -1)
        cv2.circle(img, (width // 2, height // 2), 60 + i, (0, 0, 0), 6)
        base.append(img)
    for i in range(count):
        img = base[i % len(base)].copy()
        cv2.putText(img, f"frame {i}", (20, height - 30), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255, 255, 255), 2)
        yield img


def open_source(spec: str, width: int, height: int, frames: int) -> Iterator[np.ndarray]:
    if spec == "synthetic":
        return synthetic(width, height, frames or 300)
    source: int | str = int(spec) if spec.isdigit() else spec
    if isinstance(source, str) and not Path(source).exists():
        raise ClientError(f"video file not found: {source}")
    cap = cv2.VideoCapture(source)
    if isinstance(source, int):
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    if not cap.isOpened():
        what = f"camera {source} (missing or busy?)" if isinstance(source, int) else f"video {source}"
        raise ClientError(f"cannot open {what}")

    def read() -> Iterator[np.ndarray]:
        sent = 0
        try:
            while not frames or sent < frames:
                ok, frame = cap.read()
                if not ok:
                    return
                if frame.shape[1] != width or frame.shape[0] != height:
                    frame = cv2.resize(frame, (width, height))
                sent += 1
                yield frame
        finally:
            cap.release()

    return read()


class Stream:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.window = threading.Semaphore(args.window)
        self.sent_at: collections.deque[float] = collections.deque()
        self.latencies: list[float] = []
        self.sent = 0
        self.received = 0
        self.stopped = threading.Event()
        self.prefix = f"op={args.op}\n".encode() if args.op else b""

    def requests(self, frames: Iterator[np.ndarray]) -> Iterator[gpb.InvokeServiceRequest]:
        params = [cv2.IMWRITE_JPEG_QUALITY, self.args.quality]
        for frame in frames:
            while not self.window.acquire(timeout=0.5):  # a bounded window of frames in flight
                if self.stopped.is_set():
                    return
            if self.stopped.is_set():
                return
            ok, jpeg = cv2.imencode(".jpg", frame, params)
            if not ok:
                raise ClientError("JPEG encoding failed")
            self.sent_at.append(time.perf_counter())
            self.sent += 1
            yield gpb.InvokeServiceRequest(Service=self.args.function, Input=self.prefix + jpeg.tobytes())

    def run(self, stub: gpb_grpc.FxGatewayStub, frames: Iterator[np.ndarray], sink: Sink) -> None:
        started = time.perf_counter()
        last_report = started
        replies = stub.Invokes(self.requests(frames))
        try:
            for reply in replies:
                now = time.perf_counter()
                self.latencies.append(now - self.sent_at.popleft())
                self.window.release()
                self.received += 1
                image = cv2.imdecode(np.frombuffer(reply.Output, np.uint8), cv2.IMREAD_COLOR)
                if image is None:
                    raise ClientError(f"frame {self.received}: the function's reply is not an image")
                if not sink.write(image):
                    break
                if self.args.progress and now - last_report > 0.5:
                    fps = self.received / (now - started)
                    print(
                        f"\r{self.received} frames, {fps:.1f} frames/s", end="", file=sys.stderr, flush=True
                    )
                    last_report = now
        finally:
            self.stopped.set()
            replies.cancel()
        self.elapsed = time.perf_counter() - started

    def report(self) -> str:
        if not self.latencies:
            return "no frames"
        lat = sorted(self.latencies)
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        fps = self.received / self.elapsed if self.elapsed else 0.0
        return (
            f"{self.received} frames in {self.elapsed:.2f}s: {fps:.1f} frames/s, "
            f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )


class Sink:
    """A window when a display exists (and --show), a video file with --output, or nothing."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.show = args.show if args.show is not None else bool(os.environ.get("DISPLAY"))
        self.output = args.output
        self.writer: cv2.VideoWriter | None = None
        self.fps = args.fps

    def write(self, image: np.ndarray) -> bool:
        if self.output:
            if self.writer is None:
                h, w = image.shape[:2]
                self.writer = cv2.VideoWriter(self.output, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
                if not self.writer.isOpened():
                    raise ClientError(f"cannot write video file {self.output}")
            self.writer.write(image)
        if self.show:
            cv2.imshow("OpenFx Image processing", image)
            if cv2.waitKey(1) & 0xFF in (27, ord("q")):  # ESC or q ends the stream
                return False
        return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
        if self.show:
            cv2.destroyAllWindows()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("function", metavar="FUNCTION", help="OpenFx function to stream through")
    p.add_argument(
        "--image", default="0", help="video file, camera index, or 'synthetic' (default: camera 0)"
    )
    p.add_argument(
        "-g",
        "--gateway",
        default=os.environ.get("OPENFX_URL", "127.0.0.1:31113"),
        help="gateway gRPC address",
    )
    p.add_argument("-o", "--output", help="write the processed frames to this video file (.mp4)")
    p.add_argument(
        "--show",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a window (default: if DISPLAY)",
    )
    p.add_argument("--frames", type=int, default=0, help="stop after N frames (synthetic default: 300)")
    p.add_argument("--width", type=int, default=960)
    p.add_argument("--height", type=int, default=640)
    p.add_argument("--quality", type=int, default=80, help="JPEG quality of the frames sent")
    p.add_argument("--window", type=int, default=4, help="frames in flight (pipelining); 1 = lock-step")
    p.add_argument("--op", default="", help="operation prefix for imgprocessing (faces, edges, gray, none)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate written to --output")
    p.add_argument("--reconnect", type=int, default=0, help="reconnect this many times if the stream breaks")
    p.add_argument("--token", default=None, help="gateway bearer token (default: $OPENFX_TOKEN)")
    p.add_argument(
        "--tls-ca", default=None, help="CA certificate to reach the gateway over TLS ($OPENFX_TLS_CA)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress line")
    args = p.parse_args(argv)
    args.progress = args.progress and sys.stderr.isatty()  # a live line is for a person, not a pipe
    if args.window < 1:
        p.error("--window must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    channel = gateway_channel(args.gateway, args.token, args.tls_ca)
    stub = gpb_grpc.FxGatewayStub(channel)
    sink = Sink(args)
    attempts = 0
    total = None
    try:
        frames = open_source(args.image, args.width, args.height, args.frames)
        while True:
            stream = Stream(args)
            try:
                stream.run(stub, frames, sink)
                total = stream
                break
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
                if code == grpc.StatusCode.UNAVAILABLE and attempts < args.reconnect:
                    attempts += 1
                    print(
                        f"\nstream broke ({details}); reconnecting ({attempts}/{args.reconnect})",
                        file=sys.stderr,
                    )
                    time.sleep(min(2.0, 0.25 * 2**attempts))
                    continue
                if code == grpc.StatusCode.UNAVAILABLE and "connect" in (details or ""):
                    raise ClientError(f"cannot reach the gateway at {args.gateway}") from None
                raise ClientError(f"{code.name}: {details} (after {stream.received} frames)") from None
    except ClientError as exc:
        print(f"{chr(10) if args.progress else ''}client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nclient: interrupted", file=sys.stderr)
        return 130
    finally:
        sink.close()
        channel.close()
    if args.progress:
        print(file=sys.stderr)
    print(total.report() if total else "no frames")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # grpc's request-consumer thread may still be parked in our generator after a failed stream;
    # interpreter teardown under a live grpc thread can abort ("terminate called"), so leave directly.
    os._exit(code)
