"""`openfx.fn`, the module for function authors: its statuses reach callers on every path with the
documented code, and its logger writes to the function's log."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests

from openfx import fn, hops
from openfx.errors import InvokeError
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc
from openfx.watcher.loader import load_handler
from openfx.watcher.runtime import FunctionRuntime
from tests.conftest import FIXTURES, RunningGateway, start_gateway

HANDLER = FIXTURES / "functions" / "author" / "src" / "handler.py"
EXPECTED = {
    "bad": (grpc.StatusCode.INVALID_ARGUMENT, 400),
    "missing": (grpc.StatusCode.NOT_FOUND, 404),
    "deny": (grpc.StatusCode.PERMISSION_DENIED, 403),
    "later": (grpc.StatusCode.UNAVAILABLE, 503),
}


@pytest.mark.parametrize("word", sorted(EXPECTED))
def test_runtime_keeps_the_authors_status(word: str) -> None:
    runtime = FunctionRuntime("author", load_handler(HANDLER))
    with pytest.raises(InvokeError) as err:
        runtime.invoke(wpb.Request(input=word.encode()))
    assert err.value.code == EXPECTED[word][0] and err.value.message == f"answer for {word}"


@pytest.fixture(scope="module")
def author(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("author")
    stack = tmp / "stack.yaml"
    stack.write_text(f"functions:\n  author:\n    handler: {{dir: {HANDLER.parent}, file: handler.py}}\n")
    gw = start_gateway(stack, tmp / "gateway.log")
    try:
        gw.wait_ready(names={"author"})
        yield gw
    finally:
        gw.stop()


def test_statuses_and_log_through_the_gateway(author: RunningGateway, tmp_path: Path) -> None:
    stub = author.stub()
    for word, (code, http) in EXPECTED.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.Invoke(gpb.InvokeServiceRequest(Service="author", Input=word.encode()), timeout=10)
        assert err.value.code() == code and err.value.details() == f"answer for {word}"
        r = requests.post(f"{author.http_url}/function/author", data=word.encode(), timeout=10)
        assert r.status_code == http and r.text == f"answer for {word}\n"
    assert stub.Invoke(gpb.InvokeServiceRequest(Service="author", Input=b"ok"), timeout=10).Msg == b"fine: ok"
    log = stub.GetLog(gpb.FunctionRequest(FunctionName="author"), timeout=10).Msg.decode()
    assert "author got 'ok'" in log and "author got 'later'" in log
    # the CLI keeps a handler's NOT_FOUND as it is; its "fn list" hint is for a missing function only
    cli = [str(Path(sys.executable).parent / "openfx-cli"), "fn", "call", "-g", author.grpc_address]
    said = subprocess.run([*cli, "author"], input=b"missing", capture_output=True, timeout=60)
    assert said.stderr.decode().strip() == "Error: NOT_FOUND: answer for missing"
    said = subprocess.run([*cli, "nobody"], input=b"x", capture_output=True, timeout=60)
    assert said.stderr.decode().strip() == (
        "Error: function 'nobody' not found ('openfx-cli fn list' shows what is deployed)"
    )


def test_load_failures_are_named_with_the_users_line(tmp_path: Path) -> None:
    """fn info / fn list show what kind of load failure it is and where in the user's code, from the
    watcher's own report (not from grepping its output)."""
    stack = tmp_path / "stack.yaml"
    stack.write_text(
        "functions:\n"
        + "".join(
            f"  {name}:\n    handler: {{dir: {FIXTURES}/functions/{name}/src}}\n"
            for name in ("badsyntax", "badinit", "badimport")
        )
    )
    gw = start_gateway(stack, tmp_path / "gateway.log")
    expected = {
        "badsyntax": "cannot load the handler: syntax error: handler.py:1: expected ':'",
        "badinit": "cannot load the handler: init failed: Handler.__init__ failed: "
        "FileNotFoundError: model.bin is missing (at handler.py:6)",
        "badimport": "cannot load the handler: import failed: handler.py:1: ModuleNotFoundError",
    }
    try:
        deadline = time.monotonic() + 60
        errors: dict[str, str] = {}
        while time.monotonic() < deadline and len(errors) < 3:
            try:
                for fn in gw.stub().List(gpb.Empty(), timeout=5).Functions:
                    if fn.Annotations.get("openfx.error"):
                        errors[fn.Name] = fn.Annotations["openfx.error"]
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        for name, text in expected.items():
            assert text in errors.get(name, ""), (name, errors.get(name))
            assert "Traceback" not in errors[name] and "openfx/" not in errors[name]
    finally:
        gw.stop()
    # the log says why once per start (the watcher's line), not once more from the gateway
    lines = gw.log().splitlines()
    causes = [line for line in lines if "No module named" in line]
    starts = [line for line in lines if line.startswith("badimport[0]: listening on ")]
    assert causes and len(starts) - 1 <= len(causes) <= len(starts), (causes, starts)  # stop may cut one
    assert all("badimport[0]: handler failed to load: import failed: handler.py:1" in c for c in causes)


class _RecordingWatcher(wpb_grpc.FxWatcherServicer):
    """A callee's FxWatcher on 127.0.0.1: keeps what each call carried (Info, the gRPC deadline)."""

    def __init__(self) -> None:
        self.seen: list[tuple[wpb.Info, float | None]] = []

    def Call(self, request: wpb.Request, context: grpc.ServicerContext) -> wpb.Reply:  # noqa: N802
        info = wpb.Info()
        info.CopyFrom(request.info)
        self.seen.append((info, context.time_remaining()))
        if request.input == b"fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such sensor")
        return wpb.Reply(Output=b"scored:" + request.input)


@pytest.fixture
def cluster_callee(monkeypatch: pytest.MonkeyPatch) -> Iterator[_RecordingWatcher]:
    """No OPENFX_GATEWAY (an image behind a KETI gateway): fn.call dials `scorer.team:50051`,
    whose channel is pointed at the recording watcher (the DNS name exists only in a cluster)."""
    servicer = _RecordingWatcher()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    wpb_grpc.add_FxWatcherServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    monkeypatch.delenv(fn.GATEWAY_ENV, raising=False)
    monkeypatch.setenv(fn.NAMESPACE_ENV, "team")
    monkeypatch.setitem(fn._channels, "scorer.team:50051", channel)
    try:
        yield servicer
    finally:
        channel.close()
        server.stop(None)


def test_a_call_without_a_gateway_goes_to_the_callees_watcher_with_hops_and_deadline(
    cluster_callee: _RecordingWatcher,
) -> None:
    serving = hops.current.set(hops.CallContext(hops=2, timeout="5s", began=time.monotonic()))
    try:
        assert fn.call("scorer", "good news") == b"scored:good news"
        with pytest.raises(InvokeError) as failed:
            fn.call("scorer", b"fail")
    finally:
        hops.current.reset(serving)
    assert failed.value.code == grpc.StatusCode.NOT_FOUND and failed.value.message == "scorer: no such sensor"
    info, deadline = cluster_callee.seen[0]
    assert info.FunctionName == "scorer" and info.Trigger.Name == "grpc"
    assert info.Hops == 3  # the call being served was two deep
    budget = hops.parse_timeout(info.Timeout)
    assert budget is not None and 0 < budget <= 5  # what is left of the caller's 5 s, not 30 s
    assert deadline is not None and 0 < deadline < budget + 0.5  # gRPC rounds its deadline up a little
    # outside any call: the first hop, with the default budget unless the caller gives a shorter one
    assert fn.call("scorer", b"x") == b"scored:x"
    assert fn.call("scorer", b"y", timeout=2) == b"scored:y"
    (default, _), (given, deadline) = cluster_callee.seen[-2:]
    assert (default.Hops, default.Timeout) == (1, f"{fn.DEFAULT_TIMEOUT:g}s")
    assert (given.Hops, given.Timeout) == (1, "2s") and deadline is not None and 0 < deadline < 2.5
