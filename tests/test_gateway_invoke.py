"""End to end through a real gateway and real watcher processes: invoking over gRPC and HTTP."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests

from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc
from tests.conftest import FIXTURES, MiB, RunningGateway
from tests.shared_tmp import shared_tmp


def invoke(gw: RunningGateway, name: str, data: bytes, timeout: float = 10) -> bytes:
    return gw.stub().Invoke(gpb.InvokeServiceRequest(Service=name, Input=data), timeout=timeout).Msg


def invoke_error(gw: RunningGateway, name: str, data: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        invoke(gw, name, data)
    return info.value


def test_grpc_invoke_is_binary_safe(gateway: RunningGateway) -> None:
    payload = bytes(range(256)) * 3
    assert invoke(gateway, "echo", payload) == payload
    assert invoke(gateway, "binary", b"!") == bytes(range(256)) + b"!"


def test_http_trigger_is_binary_safe_and_adds_no_newline(gateway: RunningGateway) -> None:
    payload = b"\x00\xff\xfe hi"
    r = requests.post(f"{gateway.http_url}/function/echo", data=payload, timeout=10)
    assert r.status_code == 200 and r.content == payload
    assert requests.get(f"{gateway.http_url}/function/echo/", timeout=10).content == b""


def test_invokes_stream_on_both_service_names(gateway: RunningGateway) -> None:
    channel = gateway.channel()
    for stub in (gpb_grpc.FxGatewayStub(channel), gpb_grpc.GatewayStub(channel)):
        frames = [bytes([i]) * (i + 1) for i in range(50)]
        replies = stub.Invokes(
            iter(gpb.InvokeServiceRequest(Service="echo", Input=f) for f in frames), timeout=30
        )
        assert [m.Output for m in replies] == frames


def test_request_info_reaches_the_handler(gateway: RunningGateway) -> None:
    assert invoke(gateway, "info", b"") == b"info|grpc||True"
    assert requests.post(f"{gateway.http_url}/function/info", timeout=10).content == b"info|http||True"


def test_a_trigger_relays_its_name_topic_and_deadline_over_http(gateway: RunningGateway) -> None:
    """How the MQTT bridge calls over HTTP: the handler sees the trigger's name and topic; names
    that are not trigger kinds stay "http"; the deadline header shortens the function's timeout."""
    url = f"{gateway.http_url}/function/info"
    relayed = {"X-Openfx-Trigger": "mqtt", "X-Openfx-Topic": "fn/info/" + "t" * 2000}
    assert (
        requests.post(url, headers=relayed, timeout=10).content
        == b"info|mqtt|fn/info/" + b"t" * 1016 + b"|True"
    )
    spoofed = {"X-Openfx-Trigger": "admin", "X-Openfx-Topic": "x"}
    assert requests.post(url, headers=spoofed, timeout=10).content == b"info|http|x|True"
    r = requests.post(
        f"{gateway.http_url}/function/sleeper", data=b"0.8", headers={"X-Openfx-Timeout": "0.2"}, timeout=10
    )
    assert (r.status_code, r.headers["X-Openfx-Status"]) == (504, "DEADLINE_EXCEEDED")
    assert "call to sleeper passed the caller's deadline (0.2s)" in r.text  # not blamed on sleeper
    raw = requests.post(url, headers={"X-Openfx-Topic": "fn/\xff".encode("latin-1")}, timeout=10)
    assert (raw.status_code, raw.headers["X-Openfx-Status"]) == (400, "INVALID_ARGUMENT")
    assert raw.text == "x-openfx-topic must be percent-encoded UTF-8\n"
    for bad in ("soon", "0", "-1", "nan", "1e9"):
        r = requests.post(url, headers={"X-Openfx-Timeout": bad}, timeout=10)
        assert (r.status_code, r.headers["X-Openfx-Status"]) == (400, "INVALID_ARGUMENT"), bad
        assert r.text.startswith("bad x-openfx-timeout header") and r.text.count("\n") == 1


def test_http_refusals_name_their_grpc_status(gateway: RunningGateway) -> None:
    """Several codes share an HTTP status (400: INVALID_ARGUMENT, FAILED_PRECONDITION...); the
    header says which one, so a relaying trigger answers devices with the gateway's own code."""
    post = lambda name, data=b"": requests.post(f"{gateway.http_url}/function/{name}", data=data, timeout=10)  # noqa: E731
    cases = {
        ("nope", b""): (404, "NOT_FOUND"),
        ("Bad_Name", b""): (400, "INVALID_ARGUMENT"),
        ("fail", b"bad"): (400, "INVALID_ARGUMENT"),
        ("fail", b"boom"): (500, "INTERNAL"),
        ("badimport", b""): (503, "UNAVAILABLE"),
    }
    for (name, data), expected in cases.items():
        r = post(name, data)
        assert (r.status_code, r.headers.get("X-Openfx-Status")) == expected, name
    assert "X-Openfx-Status" not in post("echo", b"fine").headers


def test_class_handler_is_instantiated_once(gateway: RunningGateway) -> None:
    first = int(invoke(gateway, "cls", b"a").split(b":")[0])
    second = invoke(gateway, "cls", b"b")
    assert second == f"{first + 1}:b".encode()


def test_unknown_function_is_not_found(gateway: RunningGateway) -> None:
    assert invoke_error(gateway, "nope", b"").code() == grpc.StatusCode.NOT_FOUND
    r = requests.post(f"{gateway.http_url}/function/nope", data=b"x", timeout=10)
    assert r.status_code == 404 and "nope" in r.text and r.text.count("\n") == 1
    assert requests.post(f"{gateway.http_url}/function/Bad_Name", timeout=10).status_code == 400


def test_handler_errors_become_statuses_and_the_process_survives(gateway: RunningGateway) -> None:
    err = invoke_error(gateway, "fail", b"bad")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "must not be 'bad'" in err.details()
    err = invoke_error(gateway, "fail", b"boom")
    assert err.code() == grpc.StatusCode.INTERNAL and "RuntimeError: something broke inside" in err.details()
    err = invoke_error(gateway, "fail", b"int")
    assert err.code() == grpc.StatusCode.INTERNAL and "None or (body, content_type)" in err.details()
    assert requests.post(f"{gateway.http_url}/function/fail", data=b"bad", timeout=10).status_code == 400
    assert requests.post(f"{gateway.http_url}/function/fail", data=b"x", timeout=10).status_code == 500
    meta = gateway.stub().GetMeta(gpb.FunctionRequest(FunctionName="fail"), timeout=5)
    assert meta.AvailableReplicas == 1  # still the same healthy process


def test_timeout_is_deadline_exceeded(gateway: RunningGateway) -> None:
    # the function's own 1 s timeout answered (the caller's 10 s deadline would say "Deadline Exceeded")
    err = invoke_error(gateway, "sleeper", b"3")
    assert (
        err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        and err.details() == "function sleeper timed out after 1s (its timeout)"
    )
    r = requests.post(f"{gateway.http_url}/function/sleeper", data=b"3", timeout=10)
    assert r.status_code == 504 and "timed out after 1s (its timeout)" in r.text


def test_caller_deadline_is_respected(gateway: RunningGateway) -> None:
    with pytest.raises(grpc.RpcError) as info:
        invoke(gateway, "sleeper", b"0.8", timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@contextlib.contextmanager
def latch_dir() -> Iterator[Path]:
    """A folder the latch function can write its marks in: functions may run as another user
    (the gateway's function user), who cannot enter pytest's private tmp folders."""
    folder = Path(tempfile.mkdtemp(prefix="openfx-latch-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def wait_file(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_too_many_in_flight_is_resource_exhausted_not_queued(gateway: RunningGateway) -> None:
    """latch allows 2 calls in flight; its handler reports each start and holds it until released."""
    with shared_tmp() as tmp_path:  # the handler runs as the function user: it writes here
        _too_many_in_flight(gateway, tmp_path)


def _too_many_in_flight(gateway: RunningGateway, tmp_path: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = [
            pool.submit(invoke, gateway, "latch", str(tmp_path / f"call{i}").encode(), 30) for i in range(2)
        ]
        try:
            for i in range(2):
                wait_file(tmp_path / f"call{i}.started")  # both inside the handler: 2 in flight
            err = invoke_error(gateway, "latch", str(tmp_path / "third").encode())
            r = requests.post(f"{gateway.http_url}/function/latch", data=str(tmp_path / "fourth"), timeout=10)
        finally:
            for i in range(2):
                (tmp_path / f"call{i}.release").touch()
        assert [f.result() for f in held] == [b"released"] * 2
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.details() == (
        "function latch has 2 calls in flight (max_inflight)"
    )
    assert r.status_code == 429
    # refused at once, never queued: the refused calls never reached the handler
    assert not (tmp_path / "third.started").exists() and not (tmp_path / "fourth.started").exists()
    (tmp_path / "after.release").touch()
    assert invoke(gateway, "latch", str(tmp_path / "after").encode()) == b"released"  # slots freed


def test_payload_limits(gateway: RunningGateway) -> None:
    big = os.urandom(5 * MiB)  # over gRPC's 4 MiB default, under the gateway's 8 MiB
    assert invoke(gateway, "echo", big, timeout=30) == big
    assert requests.post(f"{gateway.http_url}/function/echo", data=big, timeout=30).content == big
    err = invoke_error(gateway, "echo", os.urandom(9 * MiB))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    r = requests.post(f"{gateway.http_url}/function/echo", data=os.urandom(9 * MiB), timeout=30)
    assert r.status_code == 413


def metric(gw: RunningGateway, sample: str) -> float:
    """The value of one sample line of /metrics (0 when absent)."""
    for line in requests.get(f"{gw.http_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_every_path_with_real_codes(gateway: RunningGateway) -> None:
    ok = 'gateway_function_invocation_total{code="200",function_name="printer"}'
    bad = 'gateway_function_invocation_total{code="400",function_name="fail"}'
    # a name that is not deployed is counted under one label, so callers cannot grow /metrics
    missing = 'gateway_function_invocation_total{code="404",function_name="<unknown>"}'
    before = {s: metric(gateway, s) for s in (ok, bad, missing)}
    invoke(gateway, "printer", b"abc")
    requests.post(f"{gateway.http_url}/function/printer", data=b"abc", timeout=10)
    invoke_error(gateway, "fail", b"bad")
    requests.post(f"{gateway.http_url}/function/nope", data=b"x", timeout=10)
    assert {s: metric(gateway, s) - before[s] for s in before} == {ok: 2, bad: 1, missing: 1}
    text = requests.get(f"{gateway.http_url}/metrics", timeout=10).text
    assert 'gateway_service_count{function_name="echo"} 1.0' in text
    assert 'gateway_service_count{function_name="badimport"} 0.0' in text
    # latency by function and by the path it came in on
    assert 'gateway_functions_seconds_count{function_name="printer",trigger="grpc"} 1.0' in text
    assert 'gateway_functions_seconds_count{function_name="printer",trigger="http"} 1.0' in text


def test_original_openfx_client_works_for_utf8_results(gateway: RunningGateway, tmp_path) -> None:
    """Stubs generated from KETI OpenFx's own proto (Msg declared `string`) talk to our gateway."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{FIXTURES / 'openfx_original'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "fxgateway.proto",
        ],
        check=True,
    )
    script = (
        "import grpc, fxgateway_pb2 as pb, fxgateway_pb2_grpc as g\n"
        f"s = g.FxGatewayStub(grpc.insecure_channel('{gateway.grpc_address}'))\n"
        "print(s.Invoke(pb.InvokeServiceRequest(Service='echo', Input='héllo'.encode())).Msg)\n"
        "print(s.HealthCheck(pb.Empty()).Msg)\n"
        "print([f.Name for f in s.List(pb.Empty()).Functions if f.Name == 'echo'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["héllo", "OK", "['echo']"]
