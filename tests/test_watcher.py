"""The watcher alone: handler loading, error mapping, and a real watcher process over gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openfx.errors import InvokeError
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc
from openfx.watcher import loader
from openfx.watcher.loader import HandlerLoadError, load_handler
from openfx.watcher.runtime import FunctionRuntime
from openfx.watcher.server import WatcherSettings
from tests.conftest import FIXTURES, free_port

FN = FIXTURES / "functions"


def test_load_function_and_class_handlers() -> None:
    assert load_handler(FN / "binary/src/handler.py")(wpb.Request(input=b"x")).endswith(b"x")
    instance = load_handler(FN / "cls/src/handler.py")
    assert instance(wpb.Request(input=b"a")) == "1:a" and instance(wpb.Request(input=b"b")) == "2:b"


def load_error(path: Path, kind: str, match: str) -> None:
    """Loading fails with this kind (what `fn info` names) and a message matching `match`."""
    with pytest.raises(HandlerLoadError, match=match) as failure:
        load_handler(path)
    assert failure.value.kind == kind, (failure.value.kind, str(failure.value))


def test_load_errors_say_what_was_found(tmp_path: Path) -> None:
    load_error(tmp_path / "missing.py", loader.FILE_MISSING, "^handler file not found: ")
    load_error(FN / "badimport/src/handler.py", loader.IMPORT_ERROR, "ModuleNotFoundError")
    (tmp_path / "h.py").write_text("def handle(req):\n    return 1\n")
    load_error(tmp_path / "h.py", loader.NOT_FOUND, "should define 'Handler'; found: handle")
    (tmp_path / "c.py").write_text(
        "class Handler:\n    def __init__(self):\n        raise OSError('no model')\n"
    )
    load_error(tmp_path / "c.py", loader.INIT_FAILED, r"Handler.__init__ failed: OSError: no model")
    (tmp_path / "s.py").write_text("def Handler(req)\n    return 1\n")
    load_error(tmp_path / "s.py", loader.SYNTAX_ERROR, r"^s.py:1: ")


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
    settings = WatcherSettings(
        handler_file=str(handler), function_name=function, address=address, lock_file=str(lock)
    )
    env = {**os.environ, **settings.to_env()}
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
    """A call inside the handler when SIGTERM arrives (the handler says so) finishes; the watcher
    says it is draining it, and only then is the call released."""
    latch = FIXTURES / "functions/latch/src/handler.py"
    proc, address, _ = start_watcher(tmp_path, "latch", latch)
    try:
        wait_serving(address)
        stub = wpb_grpc.FxWatcherStub(grpc.insecure_channel(address))
        held = tmp_path / "held"
        call = stub.Call.future(wpb.Request(input=str(held).encode()), timeout=30)
        deadline = time.monotonic() + 20
        while not held.with_name("held.started").exists():
            assert time.monotonic() < deadline and not call.done(), "the call never reached the handler"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        line = proc.stderr.readline()  # type: ignore[union-attr]
        while b"stopping" not in line and line:
            line = proc.stderr.readline()  # type: ignore[union-attr]
        assert b"stopping (draining 1 in flight)" in line
        held.with_name("held.release").touch()
        assert call.result().Output == b"released"
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_probe_asks_a_live_watcher(tmp_path: Path) -> None:
    """`python -m openfx.watcher.probe` (the image's HEALTHCHECK): 1 while __init__ runs, 0 once
    serving, 1 with the gRPC code once the watcher is gone."""
    slow = tmp_path / "handler.py"
    slow.write_text((FN / "cls/src/handler.py").read_text().replace("sleep(0.5)", "sleep(3)"))
    proc, address, lock = start_watcher(tmp_path, "cls", slow)

    def probe() -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PROBE_ADDR": address}
        return subprocess.run(
            [sys.executable, "-m", "openfx.watcher.probe"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )

    try:
        deadline = time.monotonic() + 20
        while True:  # the servers are up before the handler loads: NOT_SERVING first
            early = probe()
            if early.returncode == 1 and "UNAVAILABLE" not in early.stderr:
                break
            assert time.monotonic() < deadline and not lock.exists(), early.stderr
        assert early.stderr == ""  # answered NOT_SERVING, not an error
        wait_serving(address)
        ok = probe()
        assert (ok.returncode, ok.stderr) == (0, "")
    finally:
        proc.terminate()
        proc.wait(10)
    gone = probe()
    assert gone.returncode == 1 and gone.stderr == f"probe: {address}: UNAVAILABLE\n"
    default_port = subprocess.run(  # WATCHER_PORT names the port on 127.0.0.1 when PROBE_ADDR is unset
        [sys.executable, "-m", "openfx.watcher.probe"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PROBE_ADDR"} | {"WATCHER_PORT": str(free_port())},
        timeout=30,
    )
    assert default_port.returncode == 1 and default_port.stderr.startswith("probe: 127.0.0.1:")


def test_load_failure_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    proc, _, _ = start_watcher(tmp_path, "badimport")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert b"badimport: handler failed to load: import failed: handler.py:1: ModuleNotFoundError" in err


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


def test_results_become_bytes_and_bad_ones_are_internal() -> None:
    from openfx.watcher.runtime import to_bytes, to_reply

    assert to_bytes(None) == b"" and to_bytes(b"b") == b"b" and to_bytes("é") == "é".encode()
    assert to_bytes(bytearray(b"ba")) == b"ba" and to_bytes(memoryview(b"mv")) == b"mv"
    for bad in (3, 1.5, ["x"], {"a": 1}):
        with pytest.raises(InvokeError) as err:
            to_bytes(bad)
        assert err.value.code == grpc.StatusCode.INTERNAL
        assert err.value.message == (
            f"handler returned {type(bad).__name__}; return str, bytes, None or (body, content_type)"
        )
    assert to_reply(("<b>", "text/html")) == wpb.Reply(Output=b"<b>", ContentType="text/html")
    assert to_reply((None, "")) == wpb.Reply()
    assert to_reply("x") == wpb.Reply(Output=b"x")
    for bad in ((b"x",), (b"x", b"text/plain"), (b"x", "a", "b")):
        with pytest.raises(InvokeError) as err:
            to_reply(bad)
        assert (err.value.code, err.value.message) == (
            grpc.StatusCode.INTERNAL,
            "handler returned a tuple; return (body, content_type: str)",
        )


def test_error_messages_are_one_line_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    from openfx.errors import InvokeError as Chosen

    def raising(exc: BaseException):  # type: ignore[no-untyped-def]
        def handler(req):  # type: ignore[no-untyped-def]
            raise exc

        return FunctionRuntime("r", handler)

    cases = [
        (ValueError("  bad\n  input\there  "), grpc.StatusCode.INVALID_ARGUMENT, "bad input here"),
        (ValueError(""), grpc.StatusCode.INVALID_ARGUMENT, "ValueError"),
        (KeyError("k"), grpc.StatusCode.INTERNAL, "KeyError: 'k'"),
        (RuntimeError("x" * 800), grpc.StatusCode.INTERNAL, "RuntimeError: " + "x" * 500),
        (Chosen(grpc.StatusCode.NOT_FOUND, "its own"), grpc.StatusCode.NOT_FOUND, "its own"),
    ]
    for exc, code, message in cases:
        with pytest.raises(InvokeError) as err:
            raising(exc).invoke(wpb.Request())
        assert (err.value.code, err.value.message) == (code, message)
    with caplog.at_level("ERROR", logger="openfx.watcher"):
        with pytest.raises(InvokeError):
            raising(RuntimeError("logged with its traceback")).invoke(wpb.Request())
    assert "Traceback" in caplog.text and "logged with its traceback" in caplog.text


def test_loader_details(tmp_path: Path) -> None:
    import sys as _sys

    (tmp_path / "helper.py").write_text("VALUE = 'from a sibling module'\n")
    (tmp_path / "h.py").write_text("import helper\n\ndef Handler(req):\n    return helper.VALUE\n")
    handler = load_handler(tmp_path / "h.py")
    assert handler(None) == "from a sibling module"  # the handler's folder is importable
    assert _sys.path.count(str(tmp_path)) == 1
    load_handler(tmp_path / "h.py")
    assert _sys.path.count(str(tmp_path)) == 1  # added once
    assert "openfx_handler_h" in _sys.modules
    (tmp_path / "n.py").write_text("Handler = 42\n")
    load_error(tmp_path / "n.py", loader.NOT_CALLABLE, r"^Handler in n.py is a int, not callable$")
    (tmp_path / "empty.py").write_text("X = 1\n_private = print\n")
    load_error(tmp_path / "empty.py", loader.NOT_FOUND, r"^empty.py should define 'Handler'; found: nothing$")
    (tmp_path / "two.py").write_text("def b(req): pass\ndef a(req): pass\n")
    load_error(tmp_path / "two.py", loader.NOT_FOUND, r"^two.py should define 'Handler'; found: a, b$")
    assert load_handler(tmp_path / "two.py", name="a")(None) is None  # another name
    (tmp_path / "boom.py").write_text("raise OSError('at import')\n")
    load_error(tmp_path / "boom.py", loader.IMPORT_ERROR, r"boom.py.*OSError: at import$")
    load_error(tmp_path, loader.FILE_MISSING, r"^handler file not found: ")  # a folder is not a handler file


# -- the call context a handler's own calls inherit, and the loader's finer rules (plain functions)


def test_a_handler_sees_its_calls_hops_and_deadline_and_nothing_after(tmp_path: Path) -> None:
    """`fn.call` and `mesh` read `hops.current` to send the next hop count and the time left: the
    handler must see this call's Info.Hops/Timeout and its start, and the next code (another call
    on the same thread or loop) must not inherit them."""
    import asyncio

    from openfx import hops

    seen: list[hops.CallContext] = []

    def sync_handler(req):  # type: ignore[no-untyped-def]
        seen.append(hops.current.get())

    async def async_handler(req):  # type: ignore[no-untyped-def]
        seen.append(hops.current.get())

    request = wpb.Request(info=wpb.Info(Hops=3, Timeout="2.5s"))
    before = time.monotonic()
    FunctionRuntime("s", sync_handler).invoke(request)
    asyncio.run(FunctionRuntime("a", async_handler).invoke_async(request))
    after = time.monotonic()
    for context in seen:
        assert (context.hops, context.timeout) == (3, "2.5s")
        assert before <= context.began <= after and context.deadline == context.began + 2.5
    assert len(seen) == 2 and hops.current.get() is hops.OUTSIDE


def test_a_handler_crash_logs_one_record_with_its_whole_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def handler(req):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    with caplog.at_level("ERROR", logger="openfx.watcher"), pytest.raises(InvokeError):
        FunctionRuntime("r", handler).invoke(wpb.Request())
    [record] = caplog.records
    text = record.getMessage()
    assert text.startswith('handler raised Traceback (most recent call last):\n  File "'), text
    assert text.endswith("\nRuntimeError: boom") and 'raise RuntimeError("boom")' in text
    assert FunctionRuntime("named", handler).name == "named"


def test_load_errors_point_at_the_users_own_line(tmp_path: Path) -> None:
    """The innermost frame in the handler's folder, also in a sibling module; never a frame of the
    standard library or the platform; the file itself when no user frame exists."""
    (tmp_path / "failing_sibling.py").write_text("X = 1\nraise OSError('in the helper')\n")
    (tmp_path / "h.py").write_text("import failing_sibling\n")
    load_error(tmp_path / "h.py", loader.IMPORT_ERROR, r"^failing_sibling.py:2: OSError: in the helper$")
    (tmp_path / "j.py").write_text("import json\n\nCONFIG = json.loads('{')\n")
    load_error(tmp_path / "j.py", loader.IMPORT_ERROR, r"^j.py:3: JSONDecodeError: ")
    (tmp_path / "broken_sibling.py").write_text("def f(:\n")
    (tmp_path / "s.py").write_text("import broken_sibling\n")
    load_error(tmp_path / "s.py", loader.SYNTAX_ERROR, r"^broken_sibling.py:1: ")  # the sibling, not s.py
    (tmp_path / "i.py").write_text("class Handler:\n    def __init__(self, model):\n        pass\n")
    load_error(
        tmp_path / "i.py",
        loader.INIT_FAILED,
        r"^Handler.__init__ failed: TypeError: .*'model' \(at i.py\)$",  # raised before its code ran
    )
    (tmp_path / "k.py").write_text("class Handler:\n    def __init__(self):\n        {}['k']\n")
    load_error(
        tmp_path / "k.py", loader.INIT_FAILED, r"^Handler.__init__ failed: KeyError: 'k' \(at k.py:3\)$"
    )


def test_load_error_messages_are_never_empty_and_bounded(tmp_path: Path) -> None:
    (tmp_path / "e.py").write_text("raise OSError()\n")
    load_error(tmp_path / "e.py", loader.IMPORT_ERROR, r"^e.py:1: OSError: \(no message\)$")
    (tmp_path / "l.py").write_text("raise OSError('x' * 400)\n")
    load_error(tmp_path / "l.py", loader.IMPORT_ERROR, r"^l.py:1: OSError: x{300}$")
    (tmp_path / "h.txt").write_text("def Handler(req):\n    return 1\n")  # no importer for .txt
    load_error(tmp_path / "h.txt", loader.IMPORT_ERROR, rf"^cannot import {tmp_path / 'h.txt'}$")


def test_loading_puts_the_handlers_folder_first_and_the_shim_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler's sibling modules win over anything installed (as in its container); KETI's
    `mesh` shim is found only when nothing else provides it; the module is registered (pickle,
    dataclasses and `fn.log` look it up by name); the working folder changes only when asked."""
    shim = str(loader.SHIM_DIR)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != shim])
    monkeypatch.delitem(sys.modules, "mesh", raising=False)
    monkeypatch.chdir(tmp_path.parent)
    folder = tmp_path / "fn"
    folder.mkdir()
    (folder / "handler.py").write_text("import mesh\n\ndef Handler(req):\n    return mesh.__name__\n")
    handler = load_handler(folder / "handler.py")
    assert handler(None) == "mesh" and sys.modules["openfx_handler_handler"].Handler is handler
    assert sys.path[0] == str(folder) and sys.path[-1] == shim
    assert Path.cwd() == tmp_path.parent  # tests and benches keep their folder
    load_handler(folder / "handler.py", chdir=True)
    assert sys.path.count(shim) == 1 and Path.cwd() == folder  # the watcher's way, as KETI runs it
