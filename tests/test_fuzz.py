"""Hostile input, bounded: random HTTP requests, malformed protobuf frames, random bytes to every
function, and schemathesis against the published OpenAPI description. Every answer must be a
defined status and the gateway must keep serving."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import grpc
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from openfx.gateway.http_api import OPENAPI
from openfx.pb import fxgateway_pb2 as gpb
from tests.conftest import ADMIN_HEADERS, ROOT, RunningGateway, start_gateway

# what the gateway itself may answer; a 5xx is a gateway fault, allowed only from a function (/function/)
DEFINED_HTTP = {200, 400, 401, 403, 404, 405, 408, 409, 413, 414, 415, 421, 429, 431}
FUNCTION_HTTP = {500, 503, 504}
OK, INVALID, INTERNAL, NOT_FOUND = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.NOT_FOUND,
)
# what each function may answer to arbitrary bytes: a crash (INTERNAL) or a dead process
# (UNAVAILABLE) is a bug, except for `fail`, which raises on purpose
FIXTURE_FUNCTIONS = {
    "echo": {OK},
    "fail": {INVALID, INTERNAL},
    "info": {OK},
    "binary": {OK},
    "printer": {OK},
    "cls": {OK, INVALID},  # decodes its input as UTF-8
    "nope": {NOT_FOUND},
}
COLLECTION_FUNCTIONS = {
    "sentiment-analysis": {OK, INVALID},
    "imgprocessing": {INVALID},  # never an image
    "crawler": {INVALID},  # never a URL
    "unmarshalling": {OK, INVALID},
}
FUNCTIONS = [*FIXTURE_FUNCTIONS, *COLLECTION_FUNCTIONS]


def alive(gw: RunningGateway) -> bool:
    return gw.stub().HealthCheck(gpb.Empty(), timeout=5).Msg == b"OK"


def functions(gw: RunningGateway) -> dict[str, int]:
    return {f.Name: f.AvailableReplicas for f in gw.stub().List(gpb.Empty(), timeout=5).Functions}


@pytest.fixture
def untouched(gateway: RunningGateway) -> Iterator[None]:
    """The shared gateway is alive after the test and serves the same functions as before it."""
    before = functions(gateway)
    yield
    assert alive(gateway)
    assert functions(gateway) == before
    assert (
        gateway.stub().Invoke(gpb.InvokeServiceRequest(Service="echo", Input=b"ok"), timeout=10).Msg == b"ok"
    )


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    path=st.one_of(
        st.sampled_from(
            [
                "/function/echo",
                "/function/",
                "/system/functions",
                "/system/function/echo",
                "/system/scale-function",
                "/system/function-log/x",
                "/metrics",
                "/healthz",
            ]
        ),
        st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(
            lambda p: "/" + p
        ),
    ),
    headers=st.dictionaries(
        st.sampled_from(["Content-Type", "X-Thing", "Accept", "Authorization"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
        max_size=3,
    ),
    body=st.binary(max_size=512),
)
def test_random_http_requests_get_defined_statuses(
    gateway: RunningGateway, untouched: None, method, path, headers, body
) -> None:  # type: ignore[no-untyped-def]
    """Anonymous requests (a random Authorization is never the admin token): every management
    write is refused, so nothing on the shared gateway changes (checked by `untouched`)."""
    try:
        r = requests.request(method, gateway.http_url + path, headers=headers, data=body, timeout=10)
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader):
        return  # the client library refused to send it
    allowed = DEFINED_HTTP | (FUNCTION_HTTP if path.startswith("/function/") else set())
    assert r.status_code in allowed, (method, path, r.status_code, r.text[:200])
    if path.startswith("/system/") and method not in ("GET", "HEAD", "OPTIONS"):
        assert 400 <= r.status_code < 500, (method, path, r.status_code)  # never done without a token


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    frame=st.binary(max_size=300),
    method=st.sampled_from(["Invoke", "List", "Deploy", "GetMeta", "ReplicaUpdate", "Delete"]),
)
def test_malformed_protobuf_frames(
    gateway: RunningGateway, untouched: None, frame: bytes, method: str
) -> None:
    """Random frames, sent anonymously: management methods must refuse them before parsing
    (UNAUTHENTICATED); the rest parse them or say INTERNAL (grpc's "Exception deserializing
    request"; grpc.aio says UNKNOWN "Unexpected DecodeError"); never any other UNKNOWN (an
    exception escaping a servicer)."""
    call = gateway.channel(None).unary_unary(f"/pb.FxGateway/{method}")  # raw bytes in, raw bytes out
    try:
        call(frame, timeout=10)
    except grpc.RpcError as exc:
        allowed = {
            "Invoke": {INTERNAL, INVALID, NOT_FOUND},
            "List": {INTERNAL},
            "GetMeta": {INTERNAL, INVALID, NOT_FOUND},
        }.get(method, {grpc.StatusCode.UNAUTHENTICATED})
        if exc.code() == grpc.StatusCode.UNKNOWN:
            # grpc.aio's own answer to a frame that does not parse (the servicer never ran); any
            # other UNKNOWN is an exception escaping the gateway's code
            assert "DecodeError" in exc.details() and "Error parsing message" in exc.details(), exc.details()
        else:
            assert exc.code() in allowed, (method, exc.code(), exc.details())
    else:
        assert method in ("Invoke", "List", "GetMeta"), method
    assert alive(gateway)


def test_truncated_http2_and_garbage_connections(gateway: RunningGateway) -> None:
    host, port = gateway.grpc_address.split(":")
    for garbage in (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
        b"\x16\x03\x01\x02\x00",
        b"GET / HTTP/1.1\r\n\r\n",
        bytes(range(256)),
    ):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(garbage)
    host, port = gateway.http_url.removeprefix("http://").split(":")
    for garbage in (b"\x00\xff" * 100 + b"\r\n\r\n", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(garbage)
            reply = sock.recv(100)
            assert reply[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ") and reply[9:10] == b"4" or reply == b""
    assert alive(gateway)


def random_bytes_to(gw: RunningGateway, function: str, allowed: set[grpc.StatusCode]) -> None:
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(payload=st.binary(max_size=2048))
    def one(payload: bytes) -> None:
        if function == "crawler":
            # never a real URL and never empty (empty crawls the default site): nothing may leave this machine
            payload = b"not-a-url:" + re.sub(rb"(?i)https?", b"xttp", payload)
        try:
            gw.stub().Invoke(gpb.InvokeServiceRequest(Service=function, Input=payload), timeout=30)
            code = OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert exc.details() and "\n" not in exc.details()
        assert code in allowed, (function, payload[:60], code)

    one()
    assert alive(gw)


@pytest.mark.parametrize("function", FIXTURE_FUNCTIONS)
def test_random_bytes_to_fixture_functions(gateway: RunningGateway, untouched: None, function: str) -> None:
    random_bytes_to(gateway, function, FIXTURE_FUNCTIONS[function])


@pytest.mark.parametrize("function", COLLECTION_FUNCTIONS)
def test_random_bytes_to_collection_functions(stack_gateway: RunningGateway, function: str) -> None:
    before = functions(stack_gateway)
    random_bytes_to(stack_gateway, function, COLLECTION_FUNCTIONS[function])
    assert functions(stack_gateway)[function] == before[function] == 1  # the process survived


schema = schemathesis.openapi.from_path(OPENAPI)


@pytest.fixture(scope="module")
def openapi_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A gateway of its own (echo alone): this test manages as the admin, so its fuzzed deploys,
    updates and deletes must never reach the shared gateway the other tests rely on."""
    folder = tmp_path_factory.mktemp("openapi")
    (folder / "stack.yaml").write_text(f"include: [{ROOT}/functions/echo/config.yaml]\n")
    gw = start_gateway(folder / "stack.yaml", folder / "gateway.log")
    try:
        gw.wait_ready(names={"echo"})
        yield gw
    finally:
        gw.stop()


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_conformance(case, openapi_gateway: RunningGateway) -> None:  # type: ignore[no-untyped-def]
    """Responses match the published description. 5xx is allowed only on /function (a function may fail)."""
    if case.path.startswith("/system/"):
        # management is exercised as the local admin (without the token every write is a 401)
        case.headers = {**ADMIN_HEADERS, **(case.headers or {})}
    if case.path == "/system/scale-function":
        return  # a fuzzed replica count up to the cap (64) would start that many processes on 2 cores
    excluded = [not_a_server_error] if case.path.startswith("/function/") else []
    if case.path == "/system/functions" and case.method.upper() in ("POST", "PUT"):
        excluded.append(positive_data_acceptance)  # a source folder must exist: not expressible in a schema
    case.call_and_validate(base_url=openapi_gateway.http_url, excluded_checks=excluded)
    assert alive(openapi_gateway)
