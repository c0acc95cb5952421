"""Invokes end to end: the video client, concurrent streams, replicas, faults on either side."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from openfx.pb import fxgateway_pb2 as gpb
from tests.conftest import ROOT, RunningGateway, eventually
from tests.test_gateway_manage import call, meta, spec_request, wait_for

CLIENT = [sys.executable, str(ROOT / "clients/client.py")]


def write_video(path: Path, frames: int, width: int = 960, height: int = 640) -> list[np.ndarray]:
    """A synthetic test video: a moving white square on a colour gradient."""
    y, x = np.mgrid[0:height, 0:width]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (width, height))
    written = []
    for i in range(frames):
        img = np.stack([x % 256, y % 256, (x // 4 + i) % 256], axis=-1).astype(np.uint8)
        cv2.rectangle(img, (100 + 10 * i, 200), (300 + 10 * i, 400), (255, 255, 255), -1)
        writer.write(img)
        written.append(img)
    writer.release()
    return written


def read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def client(gw: RunningGateway, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLIENT, *args, "-g", gw.grpc_address, "--no-progress", "--no-show"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_video_file_through_imgprocessing_frame_by_frame(
    stack_gateway: RunningGateway, tmp_path: Path
) -> None:
    source, output = tmp_path / "in.mp4", tmp_path / "out.mp4"
    originals = write_video(source, 40)
    out = client(stack_gateway, "imgprocessing", "--image", str(source), "--op", "gray", "-o", str(output))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("40 frames in") and "latency p50" in out.stdout
    processed = read_video(output)
    assert len(processed) == 40
    for original, frame in zip(originals, processed, strict=True):
        assert frame.shape == (640, 960, 3)
        spread = frame.max(axis=2).astype(int) - frame.min(axis=2)
        assert (
            spread.mean() < 8 < 50 < (original.max(axis=2).astype(int) - original.min(axis=2)).mean()
        )  # gray
        luma = cv2.cvtColor(original, cv2.COLOR_BGR2GRAY).astype(int)
        assert np.abs(luma - frame[..., 1]).mean() < 12  # same picture (after lossy encodings and mp4)


def test_workshop_command_line_with_synthetic_source(stack_gateway: RunningGateway) -> None:
    out = client(stack_gateway, "imgprocessing", "--image", "synthetic", "--frames", "30", "--window", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("30 frames in")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["echo", "--image", "missing.mp4"], "video file not found: missing.mp4"),
        (["nope", "--image", "synthetic", "--frames", "3"], "NOT_FOUND: function 'nope' not found"),
        (["echo", "--image", "7"], "cannot open camera 7"),
    ],
)
def test_client_errors_are_one_line(stack_gateway: RunningGateway, args: list[str], message: str) -> None:
    out = client(stack_gateway, *args)
    assert out.returncode == 1 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_client_gateway_down() -> None:
    out = subprocess.run(
        [*CLIENT, "echo", "--image", "synthetic", "-g", "127.0.0.1:1", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "cannot reach the gateway at 127.0.0.1:1" in out.stderr


def frames_for(name: str, tag: int, count: int) -> Iterator[gpb.InvokeServiceRequest]:
    for i in range(count):
        yield gpb.InvokeServiceRequest(Service=name, Input=f"{tag}:{i}".encode() * 100)


def test_concurrent_streams_each_get_their_own_frames_in_order(gateway: RunningGateway) -> None:
    results: dict[int, list[bytes]] = {}

    def run(tag: int) -> None:
        replies = gateway.stub().Invokes(frames_for("echo", tag, 200), timeout=60)
        results[tag] = [m.Output for m in replies]

    threads = [threading.Thread(target=run, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(6))
    for tag, outputs in results.items():
        assert outputs == [r.Input for r in frames_for("echo", tag, 200)]


def test_stream_outlives_the_unary_timeout(gateway: RunningGateway) -> None:
    """sleeper's timeout is 1 s; a 2 s stream of short calls must not be cut."""
    requests = (gpb.InvokeServiceRequest(Service="sleeper", Input=b"0.25") for _ in range(8))
    assert [m.Output for m in gateway.stub().Invokes(requests, timeout=30)] == [b"slept 0.25"] * 8


def test_mismatched_service_ends_the_stream_after_answering(gateway: RunningGateway) -> None:
    requests = iter(
        [
            gpb.InvokeServiceRequest(Service="echo", Input=b"a"),
            gpb.InvokeServiceRequest(Service="binary", Input=b"b"),
        ]
    )
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for m in gateway.stub().Invokes(requests, timeout=10):
            got.append(m.Output)
    assert got == [b"a"]
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "one stream, one function" in err.value.details()
    )


def test_stream_frame_error_keeps_its_status(stack_gateway: RunningGateway) -> None:
    requests = iter([gpb.InvokeServiceRequest(Service="imgprocessing", Input=b"not an image")])
    with pytest.raises(grpc.RpcError) as err:
        list(stack_gateway.stub().Invokes(requests, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a JPEG or PNG" in err.value.details()


def test_function_killed_mid_stream_ends_it_with_unavailable(gateway: RunningGateway) -> None:
    pid = echopid_pid(gateway)
    stop = threading.Event()

    def paced() -> Iterator[gpb.InvokeServiceRequest]:
        for i in range(400):
            if stop.is_set():
                return
            time.sleep(0.02)
            yield gpb.InvokeServiceRequest(Service="echopid", Input=str(i).encode())

    got = 0
    with pytest.raises(grpc.RpcError) as err:
        for _ in gateway.stub().Invokes(paced(), timeout=30):
            got += 1
            if got == 10:
                os.kill(pid, signal.SIGKILL)
    stop.set()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert 10 <= got < 400  # ended by the kill, not by running out of frames
    wait_for(lambda: meta(gateway, "echopid").AvailableReplicas == 1, what="echopid restarted")


def echopid_pid(gateway: RunningGateway) -> int:
    """The echopid process's pid; a kill by an earlier test may still be restarting it, so ask
    until it answers (bounded)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return int(call(gateway, "echopid", b"pid"))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def streamed_frames(gateway: RunningGateway, name: str, more_than: int, timeout: float = 30) -> None:
    """Wait until the gateway has answered more than `more_than` calls or frames of `name`."""
    wait_for(lambda: meta(gateway, name).InvocationCount > more_than, timeout, f"{name}'s stream running")


def stream_killing_the_replica(gateway: RunningGateway, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the video client on echopid and SIGKILL the replica once 10 more frames were answered.

    The kill runs on this thread and the client is killed whatever happens, so a failed probe fails
    the test at once instead of leaving a 100,000-frame stream running into the suite's timeout.
    """
    pid = echopid_pid(gateway)
    before = eventually(lambda: meta(gateway, "echopid"), "echopid's meta").InvocationCount
    proc = subprocess.Popen(
        [*CLIENT, "echopid", *args, "-g", gateway.grpc_address, "--no-progress", "--no-show"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        eventually(lambda: meta(gateway, "echopid").InvocationCount > before + 10, "echopid's stream running")
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_video_client_reports_and_optionally_reconnects(gateway: RunningGateway) -> None:
    out = stream_killing_the_replica(gateway, "--image", "synthetic", "--frames", "100000", "--window", "2")
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr
    eventually(lambda: meta(gateway, "echopid").AvailableReplicas == 1, "echopid restarted")

    out = stream_killing_the_replica(
        gateway, "--image", "synthetic", "--frames", "400", "--window", "2", "--reconnect", "20"
    )
    assert out.returncode == 0, out.stderr
    assert "reconnecting" in out.stderr and "frames in" in out.stdout


def test_client_killed_mid_stream_frees_the_function(gateway: RunningGateway) -> None:
    """onestream allows one call in flight: a leaked stream would keep refusing calls."""
    proc = subprocess.Popen(
        [
            *CLIENT,
            "onestream",
            "--image",
            "synthetic",
            "--frames",
            "100000",
            "-g",
            gateway.grpc_address,
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    streamed_frames(
        gateway, "onestream", meta(gateway, "onestream").InvocationCount + 2
    )  # its stream is open
    with pytest.raises(grpc.RpcError) as busy:
        call(gateway, "onestream", b"x")
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    proc.kill()
    proc.wait()
    assert wait_for(lambda: _try(gateway, "onestream") == b"x", timeout=15, what="the slot to be freed")


def _try(gw: RunningGateway, name: str) -> bytes | None:
    try:
        return call(gw, name, b"x")
    except grpc.RpcError:
        return None


def test_streams_to_a_function_with_replicas(gateway: RunningGateway) -> None:
    stub = gateway.stub()
    stub.Deploy(spec_request("multi", "echopid", replicas=2), timeout=30)
    try:
        wait_for(lambda: meta(gateway, "multi").AvailableReplicas == 2, what="2 replicas")
        gate = threading.Barrier(2)
        pids: list[bytes] = []

        def one() -> None:
            def requests() -> Iterator[gpb.InvokeServiceRequest]:
                yield gpb.InvokeServiceRequest(Service="multi", Input=b"pid")
                gate.wait(10)  # both streams open at once
                for i in range(50):
                    yield gpb.InvokeServiceRequest(Service="multi", Input=str(i).encode())

            replies = [m.Output for m in stub.Invokes(requests(), timeout=30)]
            assert replies[1:] == [str(i).encode() for i in range(50)]
            pids.append(replies[0])

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(pids) == 2 and len(set(pids)) == 2  # one stream per replica: load spread
    finally:
        stub.Delete(gpb.DeleteFunctionRequest(FunctionName="multi"), timeout=30)


def test_slow_function_slows_the_sender(gateway: RunningGateway) -> None:
    """Flow control end to end: with 1 MiB frames to a 0.1 s/frame function and no client window,
    the gateway pulls frames only as fast as HTTP/2 windows drain, never the whole input."""
    pulled = 0

    def frames() -> Iterator[gpb.InvokeServiceRequest]:
        nonlocal pulled
        for _ in range(200):
            pulled += 1
            yield gpb.InvokeServiceRequest(Service="slow", Input=b"\0" * (1 << 20))

    replies = gateway.stub().Invokes(frames(), timeout=60)
    answered = 0
    for _ in replies:
        answered += 1
        if answered == 15:
            break
    replies.cancel()
    # 15 MiB answered; gRPC's windows (a few MiB on each hop) bound what was pulled beyond that
    assert pulled - answered < 60, f"{pulled} pulled for {answered} answered: unbounded buffering"
