"""Authentication, TLS, limits and draining, end to end through real gateway processes."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openfx.client_channel import gateway_channel
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc
from tests.conftest import (
    FIXTURES,
    READY_FUNCTIONS,
    ROOT,
    MiB,
    RunningGateway,
    eventually,
    free_port,
    start_gateway,
)
from tests.tls_helpers import make_certificates

ADMIN, INVOKER, MANAGER = "admin-secret-1", "invoke-secret-2", "manage-secret-3"
CLI = str(Path(sys.executable).parent / "openfx-cli")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("secured")
    tokens = tmp / "tokens.yaml"
    tokens.write_text(
        f"tokens:\n"
        f"  - {{name: admin, token: {ADMIN}, scopes: [invoke, manage]}}\n"
        f"  - {{name: invoker, token: {INVOKER}, scopes: [invoke]}}\n"
        f"  - {{name: manager, token: {MANAGER}, scopes: [manage]}}\n"
    )
    gw = start_gateway(FIXTURES / "stack.yaml", tmp / "gateway.log", "--tokens-file", str(tokens))
    try:
        _wait(gw, ADMIN)
        yield gw
    finally:
        gw.stop()


def _wait(gw: RunningGateway, token: str, tls_ca: str | None = None) -> None:
    stub = gpb_grpc.FxGatewayStub(gateway_channel(gw.grpc_address, token, tls_ca))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert gw.process.poll() is None, gw.log()
        try:
            fns = stub.List(gpb.Empty(), timeout=2).Functions
            if all(f.AvailableReplicas >= 1 for f in fns if f.Name in READY_FUNCTIONS) and fns:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError(gw.log())


def stub(gw: RunningGateway, token: str | None) -> gpb_grpc.FxGatewayStub:
    return gpb_grpc.FxGatewayStub(gateway_channel(gw.grpc_address, token or "", None))


def code_of(fn, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        fn(*args, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_grpc_tokens_and_scopes(secured: RunningGateway) -> None:
    invoke = gpb.InvokeServiceRequest(Service="echo", Input=b"x")
    assert code_of(stub(secured, None).Invoke, invoke) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub(secured, "wrong").Invoke, invoke) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub(secured, MANAGER).Invoke, invoke) == grpc.StatusCode.PERMISSION_DENIED
    assert stub(secured, INVOKER).Invoke(invoke, timeout=10).Msg == b"x"
    log = gpb.FunctionRequest(FunctionName="echo")
    assert code_of(stub(secured, INVOKER).GetLog, log) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(stub(secured, MANAGER).GetLog, log) == grpc.StatusCode.OK
    delete = gpb.DeleteFunctionRequest(FunctionName="nope")
    assert code_of(stub(secured, INVOKER).Delete, delete) == grpc.StatusCode.PERMISSION_DENIED
    assert (
        code_of(stub(secured, ADMIN).Delete, delete) == grpc.StatusCode.NOT_FOUND
    )  # authorised, then checked
    assert code_of(stub(secured, None).List, gpb.Empty()) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub(secured, INVOKER).List, gpb.Empty()) == grpc.StatusCode.OK
    assert code_of(stub(secured, None).HealthCheck, gpb.Empty()) == grpc.StatusCode.OK  # probes stay open
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(secured.grpc_address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1


def test_streams_need_the_invoke_scope(secured: RunningGateway) -> None:
    frames = [gpb.InvokeServiceRequest(Service="echo", Input=b"%d" % i) for i in range(5)]
    assert [m.Output for m in stub(secured, INVOKER).Invokes(iter(frames), timeout=10)] == [
        f.Input for f in frames
    ]
    with pytest.raises(grpc.RpcError) as err:
        list(stub(secured, None).Invokes(iter(frames), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_http_tokens_and_scopes(secured: RunningGateway) -> None:
    url = f"{secured.http_url}/function/echo"
    r = requests.post(url, data=b"x", timeout=10)
    assert (
        r.status_code == 401
        and r.headers["WWW-Authenticate"] == "Bearer"
        and "missing bearer token" in r.text
    )
    assert (
        requests.post(url, data=b"x", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    )
    assert requests.post(url, headers={"Authorization": f"Bearer {MANAGER}"}, timeout=10).status_code == 403
    assert (
        requests.post(url, data=b"x", headers={"Authorization": f"Bearer {INVOKER}"}, timeout=10).content
        == b"x"
    )
    system = f"{secured.http_url}/system/functions"
    assert requests.get(system, timeout=10).status_code == 401
    assert requests.get(system, headers={"Authorization": f"Bearer {INVOKER}"}, timeout=10).status_code == 200
    assert (
        requests.post(system, json={}, headers={"Authorization": f"Bearer {INVOKER}"}, timeout=10).status_code
        == 403
    )
    assert requests.get(f"{secured.http_url}/healthz", timeout=10).status_code == 200
    metrics = requests.get(f"{secured.http_url}/metrics", timeout=10).text
    assert 'gateway_auth_rejected_total{code="401"}' in metrics
    assert 'gateway_auth_rejected_total{code="403"}' in metrics


def test_cli_sends_the_token(secured: RunningGateway, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENFX_TOKEN"}
    out = subprocess.run(
        [CLI, "fn", "call", "echo", "-g", secured.grpc_address],
        input=b"hi",
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 1 and b"set OPENFX_TOKEN" in out.stderr
    out = subprocess.run(
        [CLI, "fn", "call", "echo", "-g", secured.grpc_address],
        input=b"hi",
        capture_output=True,
        env={**env, "OPENFX_TOKEN": INVOKER},
        timeout=60,
    )
    assert out.stdout == b"hi"
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"openfx: {{gateway: '{secured.grpc_address}', token_file: '{token_file}'}}\n")
    out = subprocess.run(
        [CLI, "fn", "call", "echo"],
        input=b"via user config",
        capture_output=True,
        env={**env, "OPENFX_CONFIG": str(config)},
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout == b"via user config", out.stderr


def test_video_client_and_bridge_pass_the_token(secured: RunningGateway, tmp_path: Path) -> None:
    client = [
        sys.executable,
        str(ROOT / "clients/client.py"),
        "echo",
        "--image",
        "synthetic",
        "--frames",
        "10",
        "-g",
        secured.grpc_address,
        "--no-progress",
        "--no-show",
    ]
    assert subprocess.run([*client, "--token", INVOKER], capture_output=True, timeout=60).returncode == 0
    denied = subprocess.run([*client, "--token", "wrong"], capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr

    from tests.mqtt_helpers import Device, start_bridge, start_broker

    broker = start_broker(tmp_path)
    bridge = start_bridge(
        broker.port,
        (secured.grpc_address, secured.http_url),
        tmp_path / "bridge.log",
        env={"OPENFX_TOKEN": INVOKER},
    )
    device = Device(broker.port, ["fn/echo/reply"])
    try:
        device.request("fn/echo", b"with token")
        assert device.next().payload == b"with token"
    finally:
        device.close()
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(20)
        broker.stop()


def test_no_tokens_off_loopback_refuses_to_start(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openfx.gateway",
            "--no-functions",
            "--grpc",
            f"0.0.0.0:{free_port()}",
            "--http",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("OPENFX_")},
    )
    assert (
        out.returncode == 1 and "refusing to serve" in out.stderr and "without authentication" in out.stderr
    )


def test_tls_on_grpc_and_http(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    gw = start_gateway(
        FIXTURES / "stack.yaml",
        tmp_path / "gateway.log",
        "--tls-cert",
        str(certs["cert"]),
        "--tls-key",
        str(certs["key"]),
    )
    try:
        _wait(gw, "", str(certs["ca"]))
        secure = stub_tls(gw, str(certs["ca"]))
        assert secure.Invoke(gpb.InvokeServiceRequest(Service="echo", Input=b"tls"), timeout=10).Msg == b"tls"
        plain = gpb_grpc.FxGatewayStub(grpc.insecure_channel(gw.grpc_address))
        assert code_of(plain.HealthCheck, gpb.Empty()) == grpc.StatusCode.UNAVAILABLE
        https = gw.http_url.replace("http://", "https://")
        r = requests.post(f"{https}/function/echo", data=b"over https", verify=str(certs["ca"]), timeout=10)
        assert r.content == b"over https"
        with pytest.raises(requests.exceptions.SSLError):
            requests.post(f"{https}/function/echo", data=b"x", timeout=10)  # not trusted without the CA
        out = subprocess.run(
            [CLI, "fn", "call", "echo", "-g", gw.grpc_address],
            input=b"cli tls",
            capture_output=True,
            env={**os.environ, "OPENFX_TLS_CA": str(certs["ca"])},
            timeout=60,
        )
        assert out.stdout == b"cli tls", out.stderr
        assert bridge_calls(gw.grpc_address, https, str(certs["ca"])) == [b"bridged", b"bridged"]
        (tmp_path / "other").mkdir()
        stranger = make_certificates(tmp_path / "other")["ca"]  # a CA that did not sign the gateway's
        untrusted = bridge_calls(gw.grpc_address, https, str(stranger))
        assert all(out.startswith(b"UNAVAILABLE: ") for out in untrusted), untrusted
    finally:
        gw.stop()


def bridge_calls(grpc_address: str, https: str, ca: str) -> list[bytes]:
    """The MQTT bridge's call to echo over each transport, trusting `ca` for the gateway."""
    import asyncio

    from openfx.bridge.config import BridgeConfig
    from openfx.bridge.gateway_client import connect

    async def call(transport: str) -> bytes:
        try:
            config = BridgeConfig(
                gateway=grpc_address,
                gateway_http=https,
                transport=transport,
                gateway_tls_ca=ca,
                invoke_timeout=5,
            )
            client = connect(config)
        except Exception as exc:  # a file that is not a CA: refused when the client is made
            return f"UNAVAILABLE: {exc}".encode()
        try:
            return (await client.invoke("echo", b"bridged", "fn/echo"))[1]
        finally:
            await client.close()

    return [asyncio.run(call("http")), asyncio.run(call("grpc"))]


def stub_tls(gw: RunningGateway, ca: str) -> gpb_grpc.FxGatewayStub:
    return gpb_grpc.FxGatewayStub(gateway_channel(gw.grpc_address, "", ca))


def test_per_function_request_limit(gateway: RunningGateway) -> None:
    small = gpb.InvokeServiceRequest(Service="small", Input=b"x" * 1024)
    assert gateway.stub().Invoke(small, timeout=10).Msg == small.Input
    big = gpb.InvokeServiceRequest(Service="small", Input=b"x" * 1025)
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub().Invoke(big, timeout=10)
    assert (
        err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_request_bytes" in err.value.details()
    )
    r = requests.post(f"{gateway.http_url}/function/small", data=b"x" * 2000, timeout=10)
    assert r.status_code == 413


def test_stream_cap_and_slow_http_body(tmp_path: Path) -> None:
    gw = start_gateway(
        FIXTURES / "stack.yaml", tmp_path / "gateway.log", "--max-streams", "2", "--http-body-timeout", "1"
    )
    try:
        gw.wait_ready(names=READY_FUNCTIONS)
        stop = threading.Event()

        def held_open():  # type: ignore[no-untyped-def]
            yield gpb.InvokeServiceRequest(Service="echo", Input=b"a")
            stop.wait(20)

        streams = [gw.stub().Invokes(held_open(), timeout=30) for _ in range(2)]
        for s in streams:
            assert next(s).Output == b"a"
        with pytest.raises(grpc.RpcError) as err:
            list(gw.stub().Invokes(iter([gpb.InvokeServiceRequest(Service="echo", Input=b"b")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams" in err.value.details()
        stop.set()
        for s in streams:
            list(s)

        host, port = gw.http_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /function/echo HTTP/1.1\r\nHost: %s:%s\r\nContent-Length: 100\r\n\r\nonly-ten-b"
                % (host.encode(), port.encode())
            )
            reply = sock.recv(4096)  # the 1 s body timeout answers (the socket's own 10 s would raise)
        assert reply.startswith(b"HTTP/1.1 408")
    finally:
        gw.stop()


def test_sigterm_drains_calls_and_streams(tmp_path: Path) -> None:
    """A call held inside its handler and an open stream, both in flight when SIGTERM arrives
    (and known to be: the handler reports its start, the stream its first frame), finish."""
    from tests.test_gateway_invoke import latch_dir

    with latch_dir() as marks:
        drains(tmp_path, marks)


def drains(tmp_path: Path, marks: Path) -> None:
    from tests.test_gateway_invoke import wait_file

    gw = start_gateway(FIXTURES / "stack.yaml", tmp_path / "gateway.log", "--max-message-bytes", str(8 * MiB))
    gw.wait_ready(names=READY_FUNCTIONS)
    results: dict[str, object] = {}
    first_frame = threading.Event()
    held = marks / "held"

    def held_call() -> None:
        try:
            results["call"] = (
                gw.stub()
                .Invoke(gpb.InvokeServiceRequest(Service="latch", Input=str(held).encode()), timeout=30)
                .Msg
            )
        except grpc.RpcError as exc:
            results["call"] = exc.code()

    def slow_stream() -> None:
        frames = (gpb.InvokeServiceRequest(Service="slow", Input=b"%d" % i) for i in range(5))
        got = []
        try:
            for m in gw.stub().Invokes(frames, timeout=30):
                got.append(m.Output)
                first_frame.set()
            results["stream"] = got
        except grpc.RpcError as exc:
            results["stream"] = exc.code()
            first_frame.set()

    threads = [threading.Thread(target=held_call), threading.Thread(target=slow_stream)]
    try:
        for t in threads:
            t.start()
        wait_file(held.with_name("held.started"))
        assert first_frame.wait(20)
        gw.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while "stopping (draining in-flight calls)" not in gw.log():
            assert time.monotonic() < deadline, gw.log()
            time.sleep(0.02)
        held.with_name("held.release").touch()
        for t in threads:
            t.join(30)
    finally:
        held.with_name("held.release").touch()
    assert results["call"] == b"released"
    assert results["stream"] == [b"%d" % i for i in range(5)]
    assert gw.process.wait(30) == 0


def test_repeated_kills_back_off(gateway: RunningGateway) -> None:
    from tests.test_gateway_manage import call, wait_for

    for _ in range(3):
        pid = int(wait_for(lambda: _pid(gateway), timeout=20, what="pid function"))
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda p=pid: (_pid(gateway) or p) != p, timeout=20, what="a new process")
    delays = [
        line.split("restarting in ")[1].split("s")[0]
        for line in gateway.log().splitlines()
        if line.startswith("pid[0]: exited; restarting in")
    ]
    assert [float(d) for d in delays[-3:]] == sorted(float(d) for d in delays[-3:])  # growing
    assert float(delays[-1]) > float(delays[-3])
    assert call(gateway, "pid")


def _pid(gw: RunningGateway) -> bytes | None:
    try:
        return gw.stub().Invoke(gpb.InvokeServiceRequest(Service="pid"), timeout=5).Msg
    except grpc.RpcError:
        return None


SHA_SECRET, ENV_ADMIN, ENV_INVOKE = "sha-secret-4", "env-admin-secret-5", "env-invoke-secret-6"


@pytest.fixture(scope="module")
def digests_and_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """Tokens as an operator keeps them: a file holding only a SHA-256 digest, plus the
    OPENFX_ADMIN_TOKEN / OPENFX_INVOKE_TOKEN environment variables."""
    tmp = tmp_path_factory.mktemp("digests")
    tokens = tmp / "tokens.yaml"
    digest = hashlib.sha256(SHA_SECRET.encode()).hexdigest()
    tokens.write_text(f"tokens:\n  - {{name: hashed, sha256: {digest}, scopes: [manage]}}\n")
    stack = tmp / "stack.yaml"
    stack.write_text(f"include: [{ROOT}/functions/echo/config.yaml]\n")
    gw = start_gateway(
        stack,
        tmp / "gateway.log",
        "--tokens-file",
        str(tokens),
        env={"OPENFX_ADMIN_TOKEN": ENV_ADMIN, "OPENFX_INVOKE_TOKEN": ENV_INVOKE},
        admin=False,
    )
    try:
        _wait(gw, ENV_ADMIN)
        yield gw
    finally:
        gw.stop()


def test_sha256_and_environment_tokens(digests_and_env: RunningGateway) -> None:
    gw = digests_and_env
    invoke = gpb.InvokeServiceRequest(Service="echo", Input=b"x")
    log = gpb.FunctionRequest(FunctionName="echo")
    assert code_of(stub(gw, SHA_SECRET).GetLog, log) == grpc.StatusCode.OK  # the digest's secret
    assert code_of(stub(gw, SHA_SECRET).Invoke, invoke) == grpc.StatusCode.PERMISSION_DENIED  # manage only
    digest = hashlib.sha256(SHA_SECRET.encode()).hexdigest()
    assert code_of(stub(gw, digest).GetLog, log) == grpc.StatusCode.UNAUTHENTICATED  # the digest is no token
    assert code_of(stub(gw, ENV_ADMIN).GetLog, log) == grpc.StatusCode.OK
    assert stub(gw, ENV_ADMIN).Invoke(invoke, timeout=10).Msg == b"x"
    assert stub(gw, ENV_INVOKE).Invoke(invoke, timeout=10).Msg == b"x"
    assert code_of(stub(gw, ENV_INVOKE).GetLog, log) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(stub(gw, None).Invoke, invoke) == grpc.StatusCode.UNAUTHENTICATED
    url = f"{gw.http_url}/function/echo"
    assert (
        requests.post(url, data=b"h", headers={"Authorization": f"Bearer {ENV_INVOKE}"}, timeout=10).content
        == b"h"
    )
    r = requests.post(url, data=b"h", headers={"Authorization": f"Bearer {SHA_SECRET}"}, timeout=10)
    assert r.status_code == 403 and "lacks the 'invoke' scope" in r.text


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", f"Token {ENV_INVOKE}", ENV_INVOKE, f"Bearer{ENV_INVOKE}"],
)
def test_malformed_authorization_is_401(digests_and_env: RunningGateway, header: str) -> None:
    r = requests.post(
        f"{digests_and_env.http_url}/function/echo", data=b"x", headers={"Authorization": header}, timeout=10
    )
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert "malformed Authorization header: use 'Bearer <token>'" in r.text or "invalid token" in r.text
    call = digests_and_env.channel(None).unary_unary(
        "/pb.FxGateway/Invoke",
        request_serializer=gpb.InvokeServiceRequest.SerializeToString,
        response_deserializer=gpb.Message.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        call(
            gpb.InvokeServiceRequest(Service="echo", Input=b"x"),
            metadata=(("authorization", header),),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_malformed_authorization_says_how_to_send_it(digests_and_env: RunningGateway) -> None:
    for header in ("Basic dXNlcjpwYXNz", "Bearer    ", ENV_INVOKE):
        r = requests.post(
            f"{digests_and_env.http_url}/function/echo",
            data=b"x",
            headers={"Authorization": header},
            timeout=10,
        )
        assert r.status_code == 401 and "malformed Authorization header: use 'Bearer <token>'" in r.text
    # the scheme is case-insensitive (RFC 7235)
    lower = requests.post(
        f"{digests_and_env.http_url}/function/echo",
        data=b"x",
        headers={"Authorization": f"bearer {ENV_INVOKE}"},
        timeout=10,
    )
    assert lower.status_code == 200 and lower.content == b"x"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "tokens file not found"),
        ("tokens: [a, b", "not valid YAML"),
        ("tokens: {name: x}", "expected 'tokens:' with a list"),
        ("tokens:\n  - {name: x, token: s, scope: [invoke]}", "tokens[0]: unknown key 'scope'"),
        ("tokens:\n  - {name: x, token: s, scopes: [admin]}", "tokens[0]: scopes must be among"),
        ("tokens:\n  - {name: x, sha256: not-hex}", "tokens[0]: sha256 is not hex"),
        ("tokens:\n  - {name: x}", "tokens[0] needs 'token' or 'sha256'"),
        ("tokens:\n  - just-a-string", "tokens[0] must be a mapping"),
    ],
)
def test_bad_tokens_file_stops_the_gateway(tmp_path: Path, content: str | None, message: str) -> None:
    tokens = tmp_path / "tokens.yaml"
    if content is not None:
        tokens.write_text(content + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openfx.gateway",
            "--no-functions",
            "--tokens-file",
            str(tokens),
            "--grpc",
            f"127.0.0.1:{free_port()}",
            "--http",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("OPENFX_")},
    )
    last = out.stderr.strip().splitlines()[-1]  # one line says what is wrong, and where
    assert out.returncode == 2 and last.startswith(f"gateway: {tokens}: ") and message in last, out.stderr


def test_a_functions_control_characters_are_escaped_in_the_logs(tmp_path: Path) -> None:
    """A handler printing CR and ESC could forge a gateway log line ("platform: ready: ...") and
    send terminal escapes to whoever reads `fn log`: both logs get visible escapes instead."""
    stack = tmp_path / "stack.yaml"
    stack.write_text(f"functions:\n  forger:\n    handler: {{dir: {FIXTURES}/functions/forger/src}}\n")
    log_file = tmp_path / "gateway.log"
    gw = start_gateway(stack, tmp_path / "stdout.log", "--log-file", str(log_file))
    try:
        gw.wait_ready(names={"forger"})
        line = b"hello\rplatform: ready: forged line\x1b[31m\x07\x7f\xc2\x9b2J\tend"
        reply = gw.stub(None).Invoke(gpb.InvokeServiceRequest(Service="forger", Input=line), timeout=30)
        assert reply.Msg == b"printed"
        shown = r"hello\rplatform: ready: forged line\x1b[31m\x07\x7f\x9b2J" + "\tend"

        def logged() -> str | None:
            text = gw.stub().GetLog(gpb.FunctionRequest(FunctionName="forger"), timeout=10).Msg.decode()
            return text if shown in text else None

        log = eventually(logged, "the forged line in fn log")
        # the same call that keeps the line for GetLog writes it to the log file
        written = log_file.read_bytes()
        assert f"forger[0]: {shown}".encode() in written, written[-2000:]
        for raw in (b"\x1b", b"\r", b"\x07", b"\x7f", "\x9b".encode()):
            assert raw not in written and raw.decode() not in log
        assert not any(row.startswith(b"platform: ready: forged") for row in written.splitlines())
    finally:
        gw.stop()
