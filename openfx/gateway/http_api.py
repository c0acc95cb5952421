"""HTTP trigger and REST routes (OpenFx's grpc-gateway paths), on the same core as gRPC.

`/function/<name>` takes the raw body and answers the raw result, binary-safe and
without the newline OpenFx appended. Errors are one line of text with the status
mapped from the gRPC code; the REST routes answer JSON like grpc-gateway did.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message as ProtoMessage

from openfx.config import NAME_RE
from openfx.errors import InvokeError
from openfx.gateway.auth import AuthError, TokenStore, http_scope
from openfx.gateway.management import Management
from openfx.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from openfx.pb import fxgateway_pb2 as gpb
from openfx.triggers import KINDS, STATUS_KEY, TIMEOUT_KEY, TOPIC_KEY, TRIGGER_KEY, decode_topic

OPENAPI = Path(__file__).with_name("openapi.yaml")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message.rstrip("\n") + "\n")


def _refused(exc: InvokeError) -> web.Response:
    """A function call's refusal: one line, the mapped status, and the exact gRPC code by name."""
    return web.Response(
        status=exc.http, text=exc.message.rstrip("\n") + "\n", headers={STATUS_KEY: exc.code.name}
    )


def relayed(request: web.Request) -> tuple[str, str, float | None]:
    """The trigger name, topic and deadline a trigger relays in headers (plain HTTP: "http").

    Like the gRPC metadata: only the names of trigger kinds are taken, topics are capped."""
    headers = request.headers
    trigger = headers.get(TRIGGER_KEY, "http")
    if trigger not in KINDS:
        trigger = "http"
    deadline = None
    if (value := headers.get(TIMEOUT_KEY)) is not None:
        try:
            deadline = float(value)
        except ValueError:
            deadline = -1.0
        if not 0 < deadline < 86_400:
            raise InvokeError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bad {TIMEOUT_KEY} header {value[:40]!r}: seconds, more than 0 and less than a day",
            )
    topic = headers.get(TOPIC_KEY, "")
    if not topic.isascii():
        raise InvokeError(grpc.StatusCode.INVALID_ARGUMENT, f"{TOPIC_KEY} must be percent-encoded UTF-8")
    return trigger, decode_topic(topic), deadline


def _json_error(exc: InvokeError) -> web.Response:
    body = {"code": exc.code.value[0], "message": exc.message, "details": []}
    return web.json_response(body, status=exc.http)


def _proto_json(message: ProtoMessage) -> web.Response:
    if isinstance(message, gpb.Message):
        body: Any = {"Msg": message.Msg.decode("utf-8", "replace")}
    else:
        body = json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    return web.json_response(body)


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The whole body, or InvokeError: 413 over the size limit, 408 when it does not arrive in time
    (a client that never finishes its body must not hold a request open)."""
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except web.HTTPRequestEntityTooLarge:
        raise InvokeError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request body over the limit of {request.app['max_body']} bytes",
            http=413,
        ) from None
    except TimeoutError:
        raise InvokeError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"request body not received within {timeout:g}s", http=408
        ) from None


def _parse(body: bytes, message: ProtoMessage) -> ProtoMessage:
    try:
        json_format.Parse(body.decode() or "{}", message)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        raise InvokeError(grpc.StatusCode.INVALID_ARGUMENT, f"bad JSON body: {exc}") from None
    return message


def build_app(
    manage: Management,
    metrics: GatewayMetrics,
    max_body: int,
    tokens: TokenStore | None = None,
    body_timeout: float = 30.0,
    functions: bool = True,
) -> web.Application:
    """The API; without `functions`, no /function/ routes: the console's origin must never serve a
    function's own output as a page (it would run with the console's token in reach)."""
    invoker = manage.invoker

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        scope = http_scope(request.method, request.path)
        unrouted = request.match_info.http_exception is not None  # 404 / 405 answer first
        if tokens is not None and not unrouted and not tokens.is_open(scope):
            try:
                tokens.check(request.headers.get("Authorization"), scope)  # type: ignore[arg-type]
            except AuthError as exc:
                metrics.auth_rejected(exc)
                headers = {"WWW-Authenticate": "Bearer"} if exc.http == 401 else {}
                return web.Response(status=exc.http, text=exc.message + "\n", headers=headers)
        return await handler(request)

    app = web.Application(client_max_size=max_body, middlewares=[authenticate])
    app["max_body"] = max_body

    async def invoke(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not NAME_RE.match(name):
            return _refused(InvokeError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid function name {name!r}"))
        try:
            trigger, topic, deadline = relayed(request)
            body = await read_body(request, body_timeout)
        except InvokeError as exc:
            metrics.observe(invoker.metric_label(name), exc.http, 0.0)
            return _refused(exc)
        try:
            reply = await invoker.invoke(name, body, trigger, topic, deadline)
        except InvokeError as exc:
            return _refused(exc)
        # the function chose the type (or it is opaque bytes); browsers must not guess another
        return web.Response(
            body=reply.Output,
            headers={
                "Content-Type": reply.ContentType or "application/octet-stream",
                "X-Content-Type-Options": "nosniff",
            },
        )

    def rest(call: Callable[[web.Request], Awaitable[ProtoMessage]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return _proto_json(await call(request))
            except InvokeError as exc:
                return _json_error(exc)

        return handler

    async def list_functions(request: web.Request) -> ProtoMessage:
        return await manage.list()

    async def parse(request: web.Request, message: ProtoMessage) -> ProtoMessage:
        return _parse(await read_body(request, body_timeout), message)

    async def deploy(request: web.Request) -> ProtoMessage:
        return await manage.deploy(await parse(request, gpb.CreateFunctionRequest()))

    async def update(request: web.Request) -> ProtoMessage:
        return await manage.update(await parse(request, gpb.CreateFunctionRequest()))

    async def get_meta(request: web.Request) -> ProtoMessage:
        return await manage.get_meta(request.match_info["name"])

    async def delete(request: web.Request) -> ProtoMessage:
        return await manage.delete(request.match_info["name"])

    async def scale(request: web.Request) -> ProtoMessage:
        req = await parse(request, gpb.ScaleServiceRequest())
        return await manage.scale(req.ServiceName, req.Replicas)

    async def info(request: web.Request) -> ProtoMessage:
        return gpb.Message(Msg=manage.info().encode())

    async def get_log(request: web.Request) -> web.StreamResponse:
        try:
            message = await manage.get_log(request.match_info["name"])
        except InvokeError as exc:
            return _text(exc.http, exc.message)
        return web.Response(body=message.Msg, content_type="text/plain")

    async def healthz(request: web.Request) -> web.StreamResponse:
        return web.Response(text="OK")

    async def openapi(request: web.Request) -> web.StreamResponse:
        return web.Response(body=OPENAPI.read_bytes(), content_type="application/yaml")

    async def prometheus(request: web.Request) -> web.StreamResponse:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    if functions:
        app.router.add_route("GET", "/function/{name}", invoke)
        app.router.add_route("POST", "/function/{name}", invoke)
        app.router.add_route("GET", "/function/{name}/", invoke)
        app.router.add_route("POST", "/function/{name}/", invoke)
    app.router.add_get("/system/functions", rest(list_functions))
    app.router.add_post("/system/functions", rest(deploy))
    app.router.add_put("/system/functions", rest(update))
    app.router.add_get("/system/function/{name}", rest(get_meta))
    app.router.add_delete("/system/function/{name}", rest(delete))
    app.router.add_get("/system/function-log/{name}", get_log)
    app.router.add_put("/system/scale-function", rest(scale))
    app.router.add_get("/system/info", rest(info))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/openapi.yaml", openapi)
    app["started"] = time.time()
    return app
