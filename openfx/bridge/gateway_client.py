"""How the bridge calls the gateway: one `invoke` that answers a gRPC status and the output.

The default is the gateway's HTTP trigger over keep-alive connections: measured side by side
(echo, 32 calls in flight), a call costs the bridge 89 us of CPU and the gateway 100 us, against
234 us and 373 us over unary gRPC. The gRPC transport stays for gateways reachable only by gRPC
(`transport: grpc`). Both relay the trigger name and topic, so the handler, the gateway's auth,
limits and metrics see the same call either way; refusals come back as the gateway's own status.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from typing import Protocol

import aiohttp
import grpc

from openfx.bridge.config import BridgeConfig
from openfx.client_channel import aio_gateway_channel, bearer
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc
from openfx.triggers.base import STATUS_KEY, TIMEOUT_KEY, TOPIC_KEY, TRIGGER_KEY, encode_topic

Outcome = tuple[grpc.StatusCode, bytes]
CODES = {code.name: code for code in grpc.StatusCode}
# a status the gateway did not name (a proxy in between, say): the closest code
BY_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class Gateway(Protocol):
    async def invoke(self, function: str, payload: bytes, topic: str) -> Outcome: ...

    async def close(self) -> None: ...


def _token(config: BridgeConfig) -> str | None:
    return config.token if config.token is not None else os.environ.get("OPENFX_TOKEN") or None


def _ca(config: BridgeConfig) -> str | None:
    return config.gateway_tls_ca if config.gateway_tls_ca is not None else os.environ.get("OPENFX_TLS_CA")


class HttpGateway:
    """POST <gateway_http>/function/<name>, one keep-alive connection per call in flight.

    The gateway ends a call at the deadline it is sent; in case it cannot (stopped, wedged), a
    watchdog sweeping once a second ends calls a second past it. aiohttp's own per-request timeout
    does the same with two timers and a task lookup per call: a tenth of the bridge's CPU."""

    def __init__(self, config: BridgeConfig) -> None:
        self.base = config.gateway_http.rstrip("/")
        self.timeout = config.invoke_timeout
        self._calls: dict[asyncio.Task[object], float] = {}
        self._overdue: set[asyncio.Task[object]] = set()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        headers = {TRIGGER_KEY: "mqtt", TIMEOUT_KEY: f"{config.invoke_timeout:g}"}
        if token := _token(config):
            headers["Authorization"] = f"Bearer {token}"
        ca = _ca(config)
        tls = ssl.create_default_context(cafile=ca) if ca else None
        self.session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=config.max_inflight, ssl=tls if tls else True),
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent", "Content-Type"),
        )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for task, deadline in list(self._calls.items()):
                if deadline < now and task not in self._overdue:
                    self._overdue.add(task)
                    task.cancel()

    async def invoke(self, function: str, payload: bytes, topic: str) -> Outcome:
        task = asyncio.current_task()
        assert task is not None
        self._calls[task] = time.monotonic() + self.timeout + 1.0
        try:
            return await self._post(function, payload, topic)
        except asyncio.CancelledError:
            if task not in self._overdue or task.uncancel():
                raise  # the bridge is stopping (it may have cancelled an overdue call too)
            return grpc.StatusCode.DEADLINE_EXCEEDED, b"DEADLINE_EXCEEDED: no answer from the gateway in time"
        finally:
            del self._calls[task]
            self._overdue.discard(task)

    async def _post(self, function: str, payload: bytes, topic: str) -> Outcome:
        try:
            async with self.session.post(
                f"{self.base}/function/{function}", data=payload, headers={TOPIC_KEY: encode_topic(topic)}
            ) as response:
                body = await response.read()
                if response.status == 200:
                    return grpc.StatusCode.OK, body
                code = CODES.get(response.headers.get(STATUS_KEY, "")) or BY_HTTP.get(
                    response.status, grpc.StatusCode.UNKNOWN
                )
                message = body.decode("utf-8", "replace").strip() or f"HTTP {response.status}"
                return code, f"{code.name}: {message}".encode()
        except TimeoutError:
            return grpc.StatusCode.DEADLINE_EXCEEDED, b"DEADLINE_EXCEEDED: no answer from the gateway in time"
        except aiohttp.ClientError as exc:  # refused, reset, closed mid-answer: the gateway is away
            return grpc.StatusCode.UNAVAILABLE, f"UNAVAILABLE: gateway: {exc or type(exc).__name__}".encode()

    async def close(self) -> None:
        self._watchdog.cancel()
        await self.session.close()


class GrpcGateway:
    """FxGateway.Invoke on one asyncio channel."""

    def __init__(self, config: BridgeConfig) -> None:
        self.channel = aio_gateway_channel(config.gateway, _ca(config))
        self.stub = gpb_grpc.FxGatewayStub(self.channel)
        self.timeout = config.invoke_timeout
        self.metadata = (*bearer(_token(config)), (TRIGGER_KEY, "mqtt"))

    async def invoke(self, function: str, payload: bytes, topic: str) -> Outcome:
        try:
            reply = await self.stub.Invoke(
                gpb.InvokeServiceRequest(Service=function, Input=payload),
                timeout=self.timeout,
                metadata=(*self.metadata, (TOPIC_KEY, encode_topic(topic))),
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            return code, f"{code.name}: {exc.details()}".encode()
        return grpc.StatusCode.OK, reply.Msg

    async def close(self) -> None:
        await self.channel.close()


def connect(config: BridgeConfig) -> Gateway:
    if config.transport == "grpc":
        return GrpcGateway(config)
    return HttpGateway(config)
