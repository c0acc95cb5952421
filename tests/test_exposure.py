"""The embedded gateway left running on a workstation: what a local user, a web page in the user's
browser, or a sloppy client can and cannot do to it. Real gateway processes on loopback; each
test replays the attack from issue #12, asserts the defined answer, and that a normal call still
works during and after it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from google.protobuf import json_format

from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc
from tests.conftest import (
    ADMIN_HEADERS,
    ADMIN_TOKEN,
    FIXTURES,
    READY_FUNCTIONS,
    ROOT,
    RunningGateway,
    eventually,
    free_port,
    start_gateway,
)
from tests.shared_tmp import shared_tmp

HANDLER_DIR = FIXTURES / "functions" / "echopid" / "src"


def deploy_request(name: str = "intruder", **overrides: object) -> gpb.CreateFunctionRequest:
    request = gpb.CreateFunctionRequest(
        Service=name,
        Image=name,
        Annotations={"openfx.source": str(HANDLER_DIR), "openfx.handler.file": "handler.py"},
        MinReplicas=1,
        MaxReplicas=1,
    )
    for key, value in overrides.items():
        if isinstance(value, dict):
            getattr(request, key).update(value)
        else:
            setattr(request, key, value)
    return request


def code_of(call, *args) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    try:
        call(*args, timeout=20)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def echo_works(gw: RunningGateway) -> bool:
    reply = gw.stub(None).Invoke(gpb.InvokeServiceRequest(Service="echo", Input=b"still here"), timeout=10)
    return reply.Msg == b"still here"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """`python -m openfx.gateway` as tests and users start it: no tokens, no admin token, loopback."""
    tmp = tmp_path_factory.mktemp("plain")
    gw = start_gateway(
        FIXTURES / "stack.yaml", tmp / "gateway.log", "--http-header-timeout", "1", admin=False
    )
    try:
        gw.wait_ready(names=READY_FUNCTIONS)
        yield gw
    finally:
        gw.stop()


def test_management_is_closed_without_a_token_even_on_loopback(plain: RunningGateway) -> None:
    anonymous = plain.stub(None)
    assert echo_works(plain)  # invoking stays open on loopback
    assert code_of(anonymous.List, gpb.Empty())[0] == grpc.StatusCode.OK
    assert code_of(anonymous.Info, gpb.Empty())[0] == grpc.StatusCode.OK
    for call, request in [
        (anonymous.Deploy, deploy_request()),
        (anonymous.Update, deploy_request("echo")),
        (anonymous.Delete, gpb.DeleteFunctionRequest(FunctionName="echo")),
        (anonymous.ReplicaUpdate, gpb.ScaleServiceRequest(ServiceName="echo", Replicas=5)),
        (anonymous.GetLog, gpb.FunctionRequest(FunctionName="echo")),
    ]:
        code, details = code_of(call, request)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "management needs a token" in details
    # the issue's reproduction: a JSON deploy sent as text/plain, as any web page could send it
    body = json_format.MessageToJson(deploy_request())
    r = requests.post(
        f"{plain.http_url}/system/functions", data=body, headers={"Content-Type": "text/plain"}, timeout=10
    )
    assert r.status_code == 415 and "application/json" in r.text
    r = requests.post(
        f"{plain.http_url}/system/functions", json=json_format.MessageToDict(deploy_request()), timeout=10
    )
    assert r.status_code == 401 and "management needs a token" in r.text
    assert requests.delete(f"{plain.http_url}/system/function/echo", timeout=10).status_code == 401
    assert requests.get(f"{plain.http_url}/system/function-log/echo", timeout=10).status_code == 401
    names = {f.Name for f in anonymous.List(gpb.Empty(), timeout=10).Functions}
    assert "intruder" not in names and "echo" in names
    metrics = requests.get(f"{plain.http_url}/metrics", timeout=10).text
    assert 'gateway_auth_rejected_total{code="401"}' in metrics
    assert 'gateway_http_refused_total{reason="content-type"}' in metrics
    assert echo_works(plain)


def test_the_local_admin_token_manages_and_invoking_stays_open(gateway: RunningGateway) -> None:
    """The module gateway runs with the run's admin token file, as `openfx-cli up` starts it."""
    assert echo_works(gateway)
    admin, wrong = gateway.stub(), gateway.stub("not-the-token-at-all")
    assert (
        code_of(wrong.GetLog, gpb.FunctionRequest(FunctionName="echo"))[0] == grpc.StatusCode.UNAUTHENTICATED
    )
    assert code_of(gateway.stub(None).GetLog, gpb.FunctionRequest(FunctionName="echo"))[0] == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert code_of(admin.GetLog, gpb.FunctionRequest(FunctionName="echo"))[0] == grpc.StatusCode.OK
    r = requests.get(f"{gateway.http_url}/system/function-log/echo", headers=ADMIN_HEADERS, timeout=10)
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (deploy_request("x" * 300), "at most 63"),
        (deploy_request("a" * 64), "at most 63"),
        (deploy_request(MinReplicas=500, MaxReplicas=500), "MinReplicas must be between 0 and 64"),
        (deploy_request(MaxReplicas=65), "MaxReplicas must be between 0 and 64"),
        (deploy_request(EnvVars={f"V{i}": "x" for i in range(10_000)}), "10000 environment variables"),
        (deploy_request(EnvVars={"BIG": "x" * (1024 * 1024)}), "variable BIG is"),
        (deploy_request(EnvVars={"A=B": "x"}), "not a valid name"),
        (deploy_request(Annotations={"openfx.handler.file": "../../../etc/passwd"}), "inside the source"),
        (deploy_request(Annotations={"openfx.handler.name": "os.system"}), "must be a Python name"),
    ],
)
def test_deploy_caps(gateway: RunningGateway, request_: gpb.CreateFunctionRequest, needle: str) -> None:
    before = {f.Name for f in gateway.stub().List(gpb.Empty(), timeout=10).Functions}
    code, details = code_of(gateway.stub().Deploy, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details
    assert len(details) < 200 and "\n" not in details
    assert {f.Name for f in gateway.stub().List(gpb.Empty(), timeout=10).Functions} == before
    assert echo_works(gateway)


@pytest.fixture(scope="module")
def own_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A gateway whose replicas run as its own user (`--function-user ''`): the non-root path."""
    tmp = tmp_path_factory.mktemp("own")
    stack = tmp / "stack.yaml"
    stack.write_text(f"include:\n  - {ROOT / 'functions' / 'echo' / 'config.yaml'}\n")
    gw = start_gateway(stack, tmp / "gateway.log", "--function-user", "")
    try:
        gw.wait_ready(names={"echo"})
        yield gw
    finally:
        gw.stop()


def _bad_sources(folder: Path) -> list[tuple[str, Path, str]]:
    """(function name, source, the refusal's reason) for each way a source can be wrong."""
    empty, missing, handler = folder / "empty", folder / "missing", HANDLER_DIR / "handler.py"
    empty.mkdir(mode=0o755)
    return [
        ("nofolder", missing, f"source folder {missing} does not exist"),
        ("afile", handler, f"source {handler} is not a folder"),
        ("nohandler", empty, f"handler file handler.py not found in the source folder {empty}"),
    ]


@pytest.mark.parametrize("runs_as", ["function user", "gateway user"])
def test_a_source_that_is_not_a_folder_holding_the_handler_is_refused(
    gateway: RunningGateway, own_user: RunningGateway, runs_as: str
) -> None:
    """The same check as root (made as the function user) and not (the module gateway runs
    replicas as openfx-fn when the tests run as root; `own_user` as its own user): one line,
    INVALID_ARGUMENT / 400, over gRPC and HTTP, nothing deployed, the gateway still answering."""
    gw = gateway if runs_as == "function user" else own_user
    with shared_tmp() as folder:
        for name, source, reason in _bad_sources(folder):
            request = deploy_request(name, Annotations={"openfx.source": str(source)})
            code, details = code_of(gw.stub().Deploy, request)
            assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {reason}")
            body = json_format.MessageToDict(request)
            r = requests.post(f"{gw.http_url}/system/functions", json=body, headers=ADMIN_HEADERS, timeout=30)
            assert r.status_code == 400, r.text
            invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert r.json() == {"code": invalid, "message": details, "details": []}
            assert name not in {f.Name for f in gw.stub().List(gpb.Empty(), timeout=10).Functions}
            assert echo_works(gw)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root gateway runs replicas as another user")
def test_a_source_the_function_user_cannot_read_is_refused(gateway: RunningGateway) -> None:
    with shared_tmp() as folder:
        private = folder / "private"
        private.mkdir(mode=0o700)  # root's: the gateway could read it, its replicas could not
        (private / "handler.py").write_text("def Handler(req):\n    return req.input\n")
        code, details = code_of(
            gateway.stub().Deploy, deploy_request("private", Annotations={"openfx.source": str(private)})
        )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "\n" not in details
    assert details.startswith(f"private: function user openfx-fn cannot read {private}: Permission denied")
    assert echo_works(gateway)


def test_scale_is_capped_like_deploy(gateway: RunningGateway) -> None:
    code, details = code_of(
        gateway.stub().ReplicaUpdate, gpb.ScaleServiceRequest(ServiceName="echo", Replicas=65)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "64" in details


def test_browsers_are_kept_out(plain: RunningGateway) -> None:
    host_port = plain.http_url.removeprefix("http://")
    port = host_port.rsplit(":", 1)[1]
    echo = f"{plain.http_url}/function/echo"
    # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its own name as Host
    for path in ("/function/echo", "/healthz", "/system/functions", "/metrics"):
        r = requests.post if path == "/function/echo" else requests.get
        answer = r(f"{plain.http_url}{path}", headers={"Host": f"evil.example:{port}"}, timeout=10)
        assert answer.status_code == 421 and "does not name this gateway" in answer.text
    for name in ("127.0.0.1", "localhost", "[::1]"):
        assert (
            requests.post(echo, data=b"ok", headers={"Host": f"{name}:{port}"}, timeout=10).content == b"ok"
        )
    assert requests.post(echo, data=b"x", headers={"Host": "127.0.0.1:1"}, timeout=10).status_code == 421
    # a page of another origin: refused on every route; the gateway's own pages are fine
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1", f"https://{host_port}"):
        r = requests.post(echo, data=b"x", headers={"Origin": origin}, timeout=10)
        assert r.status_code == 403 and "cross-origin" in r.text, origin
        r = requests.get(f"{plain.http_url}/system/functions", headers={"Origin": origin}, timeout=10)
        assert r.status_code == 403
    own = {"Origin": f"http://{host_port}", "Sec-Fetch-Site": "same-origin"}
    assert requests.post(echo, data=b"mine", headers=own, timeout=10).content == b"mine"
    # an image tag or a form of another site sends no Origin on GET, but the browser says where it came from
    r = requests.get(echo, headers={"Sec-Fetch-Site": "cross-site"}, timeout=10)
    assert r.status_code == 403
    assert requests.get(echo, headers={"Sec-Fetch-Site": "none"}, timeout=10).status_code == 200
    metrics = requests.get(f"{plain.http_url}/metrics", timeout=10).text
    assert 'gateway_http_refused_total{reason="host"}' in metrics
    assert 'gateway_http_refused_total{reason="origin"}' in metrics
    assert echo_works(plain)


def test_allowed_hosts_and_origins(tmp_path: Path) -> None:
    gw = start_gateway(
        FIXTURES / "stack.yaml",
        tmp_path / "gateway.log",
        "--allowed-host",
        "gw.example",
        "--allowed-host",
        "10.1.2.3:8080",
        "--allowed-origin",
        "http://console.example:9000",
        "--no-functions",
    )
    try:
        wait_http(gw)
        health = f"{gw.http_url}/healthz"
        assert requests.get(health, headers={"Host": "gw.example:31114"}, timeout=5).status_code == 200
        assert requests.get(health, headers={"Host": "gw.example"}, timeout=5).status_code == 200
        assert requests.get(health, headers={"Host": "10.1.2.3:8080"}, timeout=5).status_code == 200
        assert requests.get(health, headers={"Host": "10.1.2.3:8081"}, timeout=5).status_code == 421
        allowed = {"Origin": "http://console.example:9000"}
        assert requests.get(health, headers=allowed, timeout=5).status_code == 200
        assert (
            requests.get(health, headers={"Origin": "http://console.example"}, timeout=5).status_code == 403
        )
    finally:
        gw.stop()


def _start_and_fail(
    *args: str, env: dict[str, str] | None = None, module: str = "openfx.gateway", stack: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m <module>` with a stack (else no functions) and a clean environment."""
    what = ["-f", str(stack)] if stack else ["--no-functions"]
    return subprocess.run(
        [sys.executable, "-m", module, *what, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OPENFX_")}, **(env or {})},
    )


STARTERS = [("openfx.gateway", "gateway"), ("openfx.launcher", "platform")]  # and their log prefix


def _free_listeners() -> tuple[str, ...]:
    return ("--grpc", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}", "--console", "")


@pytest.mark.parametrize(("module", "prefix"), STARTERS)
def test_a_bad_function_in_the_stack_stops_the_start_in_one_line(module: str, prefix: str) -> None:
    """Start-up deploys answer as Deploy does: one line naming the function, exit 1, no traceback
    (the echo started before it is stopped with the gateway)."""
    with shared_tmp() as folder:
        missing, stack = folder / "missing", folder / "stack.yaml"
        stack.write_text(
            f"include: [{ROOT / 'functions' / 'echo' / 'config.yaml'}]\n"
            f"functions:\n  broken:\n    handler: {{dir: {missing}}}\n"
        )
        extra = ("--no-mqtt",) if module == "openfx.launcher" else ()
        out = _start_and_fail(*_free_listeners(), *extra, module=module, stack=stack)
    line = f"{prefix}: cannot start function broken of the stack file: source folder {missing} does not exist"
    assert out.returncode == 1 and out.stderr.splitlines()[-1] == line, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("broken") == 1


@pytest.mark.parametrize(("module", "prefix"), STARTERS)
def test_a_function_user_that_does_not_exist_is_refused_in_one_line(module: str, prefix: str) -> None:
    echo = ROOT / "functions" / "echo" / "config.yaml"
    nobody = ("--function-user", "no-such-user-xyz")
    out = _start_and_fail(*_free_listeners(), *nobody, module=module, stack=echo)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [
        f"{prefix}: function user 'no-such-user-xyz' does not exist (scripts/function-user makes openfx-fn)"
    ]


def test_open_management_is_explicit_and_loopback_only(tmp_path: Path) -> None:
    off_loopback = _start_and_fail(
        "--open-management", "--allow-unauthenticated", "--grpc", f"0.0.0.0:{free_port()}"
    )
    assert off_loopback.returncode == 1 and "only when both listeners are on loopback" in off_loopback.stderr
    with_tokens = _start_and_fail("--open-management", env={"OPENFX_ADMIN_TOKEN": "x" * 20})
    assert with_tokens.returncode == 1 and "contradicts the configured tokens" in with_tokens.stderr
    leaky = tmp_path / "token"
    leaky.write_text(ADMIN_TOKEN)
    leaky.chmod(0o644)
    shared = _start_and_fail("--admin-token-file", str(leaky))
    assert shared.returncode == 2 and "readable by others (mode 644)" in shared.stderr

    gw = start_gateway(FIXTURES / "stack.yaml", tmp_path / "gateway.log", "--open-management", admin=False)
    try:
        gw.wait_ready(names={"echo"})
        assert "management is OPEN" in gw.log()
        anonymous = gw.stub(None)
        assert anonymous.Deploy(deploy_request("opened"), timeout=30).Msg == b"OK"
        assert anonymous.Delete(gpb.DeleteFunctionRequest(FunctionName="opened"), timeout=30).Msg == b"OK"
        assert echo_works(gw)
    finally:
        gw.stop()


def test_up_open_management_lets_anyone_local_deploy(tmp_path: Path) -> None:
    """`openfx-cli up -d --open-management`, as KETI's CLI users start it: no token is made, an
    anonymous Deploy works, a loud warning is printed; then `down`."""
    stack = tmp_path / "openfx.yaml"
    stack.write_text(f"include: [{ROOT / 'functions' / 'echo' / 'config.yaml'}]\n")
    user_config = tmp_path / "home" / "config.yaml"
    env = {**os.environ, "OPENFX_HOME": str(tmp_path / "state"), "OPENFX_CONFIG": str(user_config)}
    grpc_address = f"127.0.0.1:{free_port()}"
    where = ["--grpc", grpc_address, "--http", f"127.0.0.1:{free_port()}", "--console", "", "--no-mqtt"]
    cli = str(Path(sys.executable).parent / "openfx-cli")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cli, *args], capture_output=True, text=True, timeout=180, env=env)

    up = run("up", "-d", "-f", str(stack), "--open-management", *where)
    try:
        assert up.returncode == 0, up.stderr
        assert "WARNING: --open-management" in up.stderr and not user_config.with_name("token").exists()
        with grpc.insecure_channel(grpc_address) as channel:
            anonymous = gpb_grpc.FxGatewayStub(channel)
            assert anonymous.Deploy(deploy_request("opened"), timeout=60).Msg == b"OK"
            invoke = gpb.InvokeServiceRequest(Service="opened", Input=b"x")
            assert eventually(lambda: anonymous.Invoke(invoke, timeout=10).Msg, "opened answers")
            echo = gpb.InvokeServiceRequest(Service="echo", Input=b"still here")
            assert anonymous.Invoke(echo, timeout=10).Msg == b"still here"
    finally:
        down = run("down", "-f", str(stack))
    assert down.returncode == 0 and down.stdout == "OpenFx is down.\n", down.stderr


def test_slow_headers_and_bodies_are_cut_off(plain: RunningGateway) -> None:
    """Slowloris: headers trickled one line at a time; a management body that never ends."""
    host, port = plain.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n".encode())
        closed = False
        deadline = time.monotonic() + 15  # bound only: the gateway's header timeout is 1 s here
        while time.monotonic() < deadline and not closed:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                sock.settimeout(0.3)
                closed = sock.recv(1024) == b""
            except TimeoutError:
                assert echo_works(plain)  # everyone else is served meanwhile
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "a connection trickling its headers was kept open"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /system/functions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer x\r\nContent-Length: 1000\r\n\r\n{{".encode()
        )
        reply = sock.recv(4096)
    # no token is configured on this gateway, so the refusal comes before the body is read
    assert reply.startswith(b"HTTP/1.1 401")
    assert echo_works(plain)


def test_management_body_that_never_ends_gets_408(tmp_path: Path) -> None:
    gw = start_gateway(
        FIXTURES / "stack.yaml", tmp_path / "gateway.log", "--http-body-timeout", "1", "--no-functions"
    )
    host, port = gw.http_url.removeprefix("http://").split(":")
    try:
        wait_http(gw)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                f"POST /system/functions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Type: application/json\r\n"
                f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 1000\r\n\r\n{{".encode()
            )
            reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and b"not received within 1s" in reply
        assert requests.get(f"{gw.http_url}/healthz", timeout=5).text == "OK"
    finally:
        gw.stop()


def wait_http(gw: RunningGateway) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert gw.process.poll() is None, gw.log()
        try:
            requests.get(f"{gw.http_url}/healthz", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(gw.log())


def test_the_gateway_log_rotates_under_a_flood_of_function_output(tmp_path: Path) -> None:
    stack = tmp_path / "stack.yaml"
    stack.write_text(f"functions:\n  chatter:\n    handler: {{dir: {FIXTURES}/functions/chatter/src}}\n")
    log_file = tmp_path / "logs" / "gateway.log"
    gw = start_gateway(
        stack,
        tmp_path / "stdout.log",
        "--log-file",
        str(log_file),
        "--log-max-bytes",
        "20000",
        "--log-backups",
        "2",
    )
    try:
        gw.wait_ready(names={"chatter"})
        for _ in range(3):
            reply = gw.stub(None).Invoke(
                gpb.InvokeServiceRequest(Service="chatter", Input=b"2000"), timeout=60
            )
            assert reply.Msg == b"2000"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "chatter done" not in log_file.read_text():
            time.sleep(0.1)  # the last call's output reaches the log after its reply
        files = sorted(log_file.parent.iterdir())
        assert [f.name for f in files] == ["gateway.log", "gateway.log.1", "gateway.log.2"]
        assert all(f.stat().st_size <= 20000 for f in files)  # 6,000 lines (~250 KB) were written
        assert "chatter done" in log_file.read_text()
        assert (tmp_path / "stdout.log").stat().st_size < 2000  # nothing floods the process's stderr
    finally:
        gw.stop()


def _series(metrics: str, family: str) -> list[str]:
    return [line for line in metrics.splitlines() if line.startswith(family)]


def test_calls_to_unknown_names_share_one_metrics_label(plain: RunningGateway) -> None:
    """An anonymous caller inventing function names must not grow /metrics: each distinct name
    used to add ~24 series (1 MB after 300 calls). Unknown names, whether refused by the invoker
    (404) or before it (a bad relay header, 400), are counted under function_name="<unknown>"."""

    def count(code: str) -> float:
        text = requests.get(f"{plain.http_url}/metrics", timeout=10).text
        for line in _series(text, "gateway_function_invocation_total{"):
            if 'function_name="<unknown>"' in line and f'code="{code}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before_404, before_400 = count("404"), count("400")
    before = requests.get(f"{plain.http_url}/metrics", timeout=10).text
    prefix = "n" + "0" * 10  # names as in the probe: n and 60 digits
    for i in range(40):
        reply = requests.post(f"{plain.http_url}/function/n{i:060d}", data=b"x", timeout=10)
        assert reply.status_code == 404, reply.text
    for i in range(40, 50):  # refused in the HTTP front end before the invoker sees the call
        reply = requests.post(
            f"{plain.http_url}/function/n{i:060d}",
            data=b"x",
            headers={"X-Openfx-Timeout": "never"},
            timeout=10,
        )
        assert reply.status_code == 400, reply.text
    after = requests.get(f"{plain.http_url}/metrics", timeout=10).text
    assert prefix not in after
    for family in ("gateway_function_invocation_total{", "gateway_functions_seconds_count{"):
        new = set(_series(after, family)) - set(_series(before, family))
        assert {line.split("function_name=")[1].split('"')[1] for line in new} <= {"<unknown>"}
    assert (count("404") - before_404, count("400") - before_400) == (40, 10)
    assert echo_works(plain)  # a deployed function keeps its own label
    assert (
        'gateway_function_invocation_total{code="200",function_name="echo"}'
        in requests.get(f"{plain.http_url}/metrics", timeout=10).text
    )


@pytest.mark.parametrize(("module", "prefix"), STARTERS)
def test_a_second_gateway_on_a_taken_grpc_port_stops_before_starting_anything(
    gateway: RunningGateway, module: str, prefix: str
) -> None:
    """gRPC binds with SO_REUSEPORT unless told not to: a second platform on the same port used to
    start, deploy its functions and share the first one's connections. It must refuse in one line."""
    echo = ROOT / "functions" / "echo" / "config.yaml"
    taken = ("--grpc", gateway.grpc_address, "--http", f"127.0.0.1:{free_port()}", "--console", "")
    extra = ("--no-mqtt",) if module == "openfx.launcher" else ()
    out = _start_and_fail(*taken, *extra, module=module, stack=echo)
    assert out.returncode == 1, out.stderr
    last = out.stderr.splitlines()[-1]
    expected = f"{prefix}: cannot listen on {gateway.grpc_address} for gRPC (in use?)"
    assert last.startswith(expected), out.stderr
    assert "echo[0]" not in out.stderr and "Traceback" not in out.stderr  # no function was started
    assert gateway.stub().Invoke(gpb.InvokeServiceRequest(Service="echo", Input=b"x"), timeout=10).Msg == b"x"
