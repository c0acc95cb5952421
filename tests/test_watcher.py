"""The watcher alone: handler loading, error mapping, and a real watcher process over gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openfx.errors import InvokeError
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc
from openfx.watcher.loader import HandlerLoadError, load_handler
from openfx.watcher.runtime import FunctionRuntime
from tests.conftest import FIXTURES, free_port

FN = FIXTURES / "functions"


def test_load_function_and_class_handlers() -> None:
    assert load_handler(FN / "binary/src/handler.py")(wpb.Request(input=b"x")).endswith(b"x")
    instance = load_handler(FN / "cls/src/handler.py")
    assert instance(wpb.Request(input=b"a")) == "1:a" and instance(wpb.Request(input=b"b")) == "2:b"


def test_load_errors_say_what_was_found(tmp_path: Path) -> None:
    with pytest.raises(HandlerLoadError, match="not found"):
        load_handler(tmp_path / "missing.py")
    with pytest.raises(HandlerLoadError, match="ModuleNotFoundError"):
        load_handler(FN / "badimport/src/handler.py")
    (tmp_path / "h.py").write_text("def handle(req):\n    return 1\n")
    with pytest.raises(HandlerLoadError, match="should define 'Handler'; found: handle"):
        load_handler(tmp_path / "h.py")
    (tmp_path / "c.py").write_text(
        "class Handler:\n    def __init__(self):\n        raise OSError('no model')\n"
    )
    with pytest.raises(HandlerLoadError, match=r"Handler.__init__ failed: OSError: no model"):
        load_handler(tmp_path / "c.py")


def test_runtime_maps_results_and_exceptions() -> None:
    rt = FunctionRuntime("fail", load_handler(FN / "fail/src/handler.py"))
    for data, code in ((b"bad", grpc.StatusCode.INVALID_ARGUMENT), (b"x", grpc.StatusCode.INTERNAL)):
        with pytest.raises(InvokeError) as err:
            rt.invoke(wpb.Request(input=data))
        assert err.value.code == code
    utf8 = FunctionRuntime("u", lambda req: req.input.decode("utf-8"))
    with pytest.raises(InvokeError) as err:
        utf8.invoke(wpb.Request(input=b"\xff"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT  # UnicodeDecodeError is bad input
    assert FunctionRuntime("n", lambda req: None).invoke(wpb.Request()) == wpb.Reply()
    assert FunctionRuntime("s", lambda req: "é").invoke(wpb.Request()).Output == "é".encode()
    typed = FunctionRuntime("t", lambda req: ("<p>", "text/html")).invoke(wpb.Request())
    assert (typed.Output, typed.ContentType) == (b"<p>", "text/html")
    for bad in ((b"x",), (b"x", 3), (b"x", "a", "b")):
        with pytest.raises(InvokeError, match="tuple") as err:
            FunctionRuntime("b", lambda req, bad=bad: bad).invoke(wpb.Request())
        assert err.value.code == grpc.StatusCode.INTERNAL


def start_watcher(
    tmp_path: Path, function: str, handler: Path | None = None
) -> tuple[subprocess.Popen[bytes], str, Path]:
    address = f"127.0.0.1:{free_port()}"
    lock = tmp_path / f"{function}.lock"
    handler = handler or FN / function / "src/handler.py"
    env = {
        **os.environ,
        "HANDLER_FILE": str(handler),
        "WATCHER_ADDR": address,
        "LOCK_FILE": str(lock),
        "FUNCTION_NAME": function,
    }
    proc = subprocess.Popen([sys.executable, "-m", "openfx.watcher"], env=env, stderr=subprocess.PIPE)
    return proc, address, lock


def wait_serving(address: str, timeout: float = 20) -> list[int]:
    """Poll health; return the statuses seen (NOT_SERVING while __init__ runs, then SERVING)."""
    seen: list[int] = []
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service="pb.FxWatcher"), timeout=1).status
            seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return seen
        except grpc.RpcError:
            pass
        time.sleep(0.02)
    raise AssertionError("watcher never became SERVING")


def test_watcher_readiness_after_init_lock_file_and_calls(tmp_path: Path) -> None:
    slow = tmp_path / "handler.py"
    slow.write_text((FN / "cls/src/handler.py").read_text().replace("sleep(0.5)", "sleep(3)"))
    proc, address, lock = start_watcher(tmp_path, "cls", slow)
    try:
        seen = wait_serving(address)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen  # __init__ sleeps 3 s
        assert lock.exists()
        stub = wpb_grpc.FxWatcherStub(grpc.insecure_channel(address))
        assert stub.Call(wpb.Request(input=b"a"), timeout=5).Output == b"1:a"
        outs = [
            r.Output for r in stub.Calls(iter([wpb.Request(input=b"b"), wpb.Request(input=b"c")]), timeout=5)
        ]
        assert outs == [b"2:b", b"3:c"]
    finally:
        proc.terminate()
        proc.wait(10)
    assert not lock.exists()


def test_sigterm_drains_in_flight_calls(tmp_path: Path) -> None:
    proc, address, _ = start_watcher(tmp_path, "sleeper")
    try:
        wait_serving(address)
        stub = wpb_grpc.FxWatcherStub(grpc.insecure_channel(address))
        result: dict[str, object] = {}

        def slow_call() -> None:
            try:
                result["out"] = stub.Call(wpb.Request(input=b"1"), timeout=10).Output
            except grpc.RpcError as exc:
                result["err"] = exc.code()

        thread = threading.Thread(target=slow_call)
        thread.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        thread.join(15)
        assert result == {"out": b"slept 1"}
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_load_failure_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    proc, _, _ = start_watcher(tmp_path, "badimport")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert b"badimport: handler failed to load: importing handler.py failed: ModuleNotFoundError" in err


def test_async_handlers_run_on_the_loop_with_the_same_statuses() -> None:
    async def echo(req):  # type: ignore[no-untyped-def]
        if req.input == b"bad":
            raise ValueError("bad input")
        if req.input == b"boom":
            raise RuntimeError("boom")
        return req.input, "text/plain"

    class Model:
        async def __call__(self, req):  # type: ignore[no-untyped-def]
            return b"model:" + req.input

    rt, cls_rt = FunctionRuntime("a", echo), FunctionRuntime("m", Model())
    assert rt.is_async and cls_rt.is_async
    assert not FunctionRuntime("s", lambda req: req.input).is_async
    assert not FunctionRuntime("c", load_handler(FN / "cls/src/handler.py")).is_async
    import asyncio

    reply = asyncio.run(rt.invoke_async(wpb.Request(input=b"x")))
    assert (reply.Output, reply.ContentType) == (b"x", "text/plain")
    assert asyncio.run(cls_rt.invoke_async(wpb.Request(input=b"y"))).Output == b"model:y"
    assert cls_rt.invoke(wpb.Request(input=b"z")).Output == b"model:z"  # outside a loop, too
    for data, code in ((b"bad", grpc.StatusCode.INVALID_ARGUMENT), (b"boom", grpc.StatusCode.INTERNAL)):
        with pytest.raises(InvokeError) as err:
            asyncio.run(rt.invoke_async(wpb.Request(input=data)))
        assert err.value.code == code


def test_async_handler_calls_overlap_in_the_watcher(tmp_path: Path) -> None:
    """Three calls must be inside the handler at once, or each fails after 10 s."""
    proc, address, _ = start_watcher(tmp_path, "together")
    try:
        wait_serving(address)
        stub = wpb_grpc.FxWatcherStub(grpc.insecure_channel(address))
        calls = [stub.Call.future(wpb.Request(input=b"3"), timeout=30) for _ in range(3)]
        assert [c.result().Output for c in calls] == [b"together"] * 3
    finally:
        proc.terminate()
        proc.wait(10)
