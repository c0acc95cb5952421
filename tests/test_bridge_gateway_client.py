"""How the bridge calls the gateway (openfx/bridge/gateway_client.py), against real servers on
127.0.0.1: a scripted aiohttp server standing in for odd gateways (one that names no status, one
that never answers, none at all), and the real gateway over both transports."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from aiohttp import web

from openfx.bridge.config import BridgeConfig
from openfx.bridge.gateway_client import GrpcGateway, HttpGateway, connect
from tests.conftest import ROOT, RunningGateway, free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/function/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def test_http_calls_carry_the_trigger_topic_deadline_and_token() -> None:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append({**request.headers, "body": (await request.read()).decode(), "path": request.path})
        return web.Response(body=b"\x00answer\xff")

    async def body() -> None:
        runner, url = await serve(handler)
        gateway = HttpGateway(BridgeConfig(gateway_http=url, token="s3cret", invoke_timeout=7.5))
        try:
            assert await gateway.invoke("echo", b"hello", "fn/echo") == (
                grpc.StatusCode.OK,
                b"\x00answer\xff",
            )
        finally:
            await gateway.close()
            await runner.cleanup()

    asyncio.run(body())
    [headers] = seen
    assert (headers["path"], headers["body"]) == ("/function/echo", "hello")
    assert headers["Authorization"] == "Bearer s3cret"
    assert (headers["x-openfx-trigger"], headers["x-openfx-topic"], headers["x-openfx-timeout"]) == (
        "mqtt",
        "fn/echo",
        "7.5",
    )


@pytest.mark.parametrize(
    ("status", "header", "code"),
    [
        (400, "FAILED_PRECONDITION", grpc.StatusCode.FAILED_PRECONDITION),  # the header wins over 400
        (429, None, grpc.StatusCode.RESOURCE_EXHAUSTED),  # no header (a proxy): mapped from HTTP
        (502, None, grpc.StatusCode.UNAVAILABLE),
        (418, None, grpc.StatusCode.UNKNOWN),
        (404, "NO_SUCH_CODE", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_refusals_come_back_as_the_gateways_code(
    status: int, header: str | None, code: grpc.StatusCode
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"X-Openfx-Status": header} if header else {}
        return web.Response(status=status, text="it says no\n", headers=headers)

    async def body() -> tuple[grpc.StatusCode, bytes]:
        runner, url = await serve(handler)
        gateway = HttpGateway(BridgeConfig(gateway_http=url))
        try:
            return await gateway.invoke("x", b"", "fn/x")
        finally:
            await gateway.close()
            await runner.cleanup()

    assert asyncio.run(body()) == (code, f"{code.name}: it says no".encode())


def test_a_gateway_that_never_answers_is_cut_off_by_the_watchdog() -> None:
    """The gateway normally ends a call at the deadline it is sent; one that cannot (wedged) must
    not hold the bridge's call forever: DEADLINE_EXCEEDED (which the bridge retries)."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="too late")

    async def body() -> tuple[grpc.StatusCode, bytes]:
        runner, url = await serve(handler)
        gateway = HttpGateway(BridgeConfig(gateway_http=url, invoke_timeout=0.2))
        try:
            return await asyncio.wait_for(gateway.invoke("x", b"", "fn/x"), 10)
        finally:
            release.set()
            await gateway.close()
            await runner.cleanup()

    code, output = asyncio.run(body())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and output.startswith(b"DEADLINE_EXCEEDED: ")


def test_stopping_cancels_a_call_instead_of_answering_it() -> None:
    release, reached = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        reached.set()  # the request is on the server: the call is in flight
        await release.wait()
        return web.Response()

    async def body() -> None:
        runner, url = await serve(handler)
        gateway = HttpGateway(BridgeConfig(gateway_http=url))
        call = asyncio.create_task(gateway.invoke("x", b"", "fn/x"))
        await asyncio.wait_for(reached.wait(), 10)
        assert gateway._calls  # tracked while in flight, so the check below can fail
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert gateway._calls == {}
        release.set()
        await gateway.close()
        await runner.cleanup()

    asyncio.run(body())


def test_no_gateway_listening_is_unavailable() -> None:
    async def body() -> tuple[grpc.StatusCode, bytes]:
        gateway = HttpGateway(BridgeConfig(gateway_http=f"http://127.0.0.1:{free_port()}"))
        try:
            return await gateway.invoke("x", b"", "fn/x")
        finally:
            await gateway.close()

    code, output = asyncio.run(body())
    assert code == grpc.StatusCode.UNAVAILABLE and output.startswith(b"UNAVAILABLE: gateway: ")


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_both_transports_give_the_same_outcomes_from_the_real_gateway(
    gateway: RunningGateway, transport: str
) -> None:
    config = BridgeConfig(
        gateway=gateway.grpc_address, gateway_http=gateway.http_url, transport=transport, invoke_timeout=5
    )

    async def body() -> list[tuple[grpc.StatusCode, bytes]]:
        client = connect(config)
        assert isinstance(client, HttpGateway if transport == "http" else GrpcGateway)
        try:
            return [
                await client.invoke("info", b"", "fn/info/온도\r\n%41"),
                await client.invoke("echo", bytes(range(256)), "fn/echo"),
                await client.invoke("nope", b"", "fn/nope"),
                await client.invoke("fail", b"bad", "fn/fail"),
            ]
        finally:
            await client.close()

    info, echo, missing, refused = asyncio.run(body())
    assert info == (grpc.StatusCode.OK, "info|mqtt|fn/info/온도\r\n%41|True".encode())  # the exact topic
    assert echo == (grpc.StatusCode.OK, bytes(range(256)))
    assert missing == (grpc.StatusCode.NOT_FOUND, b"NOT_FOUND: function 'nope' not found")
    assert refused[0] == grpc.StatusCode.INVALID_ARGUMENT and b"must not be 'bad'" in refused[1]


def test_the_transport_follows_the_address_given() -> None:
    from openfx.bridge.config import load_bridge_config

    assert load_bridge_config(None).transport == "http"
    assert load_bridge_config(None, gateway="10.0.0.5:31113").transport == "grpc"  # never a default URL
    both = load_bridge_config(None, gateway="10.0.0.5:31113", gateway_http="http://10.0.0.5:31114")
    assert both.transport == "http"
    assert load_bridge_config(None, gateway="10.0.0.5:31113", transport="http").transport == "http"
    shipped = load_bridge_config(ROOT / "broker/bridge.yaml")  # the file names all three
    assert (shipped.transport, shipped.gateway_http) == ("http", "http://127.0.0.1:31114")
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        BridgeConfig(gateway_http="10.0.0.5:31114")


@pytest.mark.parametrize(
    ("content", "reason"), [(None, "No such file"), ("not a certificate\n", "NO_CERTIFICATE")]
)
def test_an_unusable_gateway_ca_stops_the_bridge_with_one_line(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_text(content)
    out = subprocess.run(
        [sys.executable, "-m", "openfx.bridge", "--metrics", "", "--gateway-http", "https://127.0.0.1:1"],
        env={**os.environ, "OPENFX_TLS_CA": str(ca)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.startswith("bridge: cannot use gateway_tls_ca: ")
    assert reason in out.stderr and out.stderr.count("\n") == 1
