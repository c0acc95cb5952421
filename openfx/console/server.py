"""The console's listener: static page + the API it needs, all on one origin of its own.

Why its own origin (127.0.0.1:31115 by default): the page keeps a bearer token in session
storage, and functions serve their own HTML under /function/ on the API's origin; a function's
page on the console's origin could read that token. So this origin serves no function output as
a page: results come from /console/invoke as attachments with a sandboxing CSP, the page reads
them with fetch() and shows them as text (or as an <img>). The API the page calls (/system/...)
is served here too, same-origin, under the gateway's Host/Origin/JSON-only guard and tokens.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

from aiohttp import web

from openfx.config import NAME_RE
from openfx.errors import InvokeError
from openfx.gateway.auth import ANY, INVOKE, MANAGE, AuthError, TokenStore
from openfx.gateway.http_api import build_app, read_body
from openfx.gateway.management import Management
from openfx.gateway.metrics import FunctionStats, GatewayMetrics

STATIC = Path(__file__).with_name("static")
WINDOW_SECONDS = 60.0
# the page: scripts, styles and images only from this origin; result images are blob: URLs
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)
# a function's output fetched by the page: never a document that could run script here
RESULT_CSP = "default-src 'none'; sandbox"
SCOPES = {"/console/invoke/": INVOKE, "/console/": ANY}


def _scope(path: str) -> str | None:
    for prefix, scope in SCOPES.items():
        if path.startswith(prefix):
            return scope
    return None


class Window:
    """Snapshots of the metrics, so latency and error rate cover the last minute, not all time."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.snapshots: deque[tuple[float, dict[str, FunctionStats]]] = deque()

    def read(self) -> tuple[dict[str, FunctionStats], dict[str, FunctionStats]]:
        """(since start, over the window): the window is since start until a snapshot is old enough."""
        now, current = time.monotonic(), self.metrics.function_stats()
        while len(self.snapshots) > 1 and now - self.snapshots[1][0] >= WINDOW_SECONDS:
            self.snapshots.popleft()
        base = self.snapshots[0][1] if self.snapshots and now - self.snapshots[0][0] >= 1 else {}
        if not self.snapshots or now - self.snapshots[-1][0] >= 1:
            self.snapshots.append((now, current))
        window = {name: stats.minus(base.get(name, FunctionStats())) for name, stats in current.items()}
        return current, window


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def build_console(
    manage: Management, metrics: GatewayMetrics, max_body: int, tokens: TokenStore, body_timeout: float
) -> web.Application:
    app = build_app(manage, metrics, max_body, tokens, body_timeout, functions=False)
    window = Window(metrics)

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("Cache-Control", "no-store")

    app.on_response_prepare.append(headers)

    def who(request: web.Request, scope: str) -> None:
        """AuthError unless the caller may use `scope` (open scopes need no token)."""
        tokens.check(request.headers.get("Authorization"), scope)

    def refused(exc: AuthError) -> web.Response:
        metrics.auth_rejected(exc)
        return web.json_response({"message": exc.message}, status=exc.http)

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def whoami(request: web.Request) -> web.StreamResponse:
        """The scopes the page may offer: open ones, plus those of the token it holds (a wrong token
        is refused even where it is not needed, so the page asks again rather than half-working)."""
        authorization = request.headers.get("Authorization")
        scopes = []
        try:
            who(request, ANY)
            for scope in (INVOKE, MANAGE):
                try:
                    tokens.check(authorization, scope)
                    scopes.append(scope)
                except AuthError as exc:
                    if authorization and exc.http == 401:
                        raise
        except AuthError as exc:
            return refused(exc)
        return web.json_response({"scopes": scopes})

    async def overview(request: web.Request) -> web.StreamResponse:
        try:
            who(request, ANY)
        except AuthError as exc:
            return refused(exc)
        listed = await manage.list()
        total, recent = window.read()
        rows: list[dict[str, Any]] = []
        for fn in listed.Functions:
            since_start = total.get(fn.Name, FunctionStats())
            stats = recent.get(fn.Name, FunctionStats())
            if stats.calls <= 0:
                stats = since_start
            error = fn.Annotations.get("openfx.error", "")
            ready = fn.AvailableReplicas >= fn.Replicas > 0
            rows.append(
                {
                    "name": fn.Name,
                    "image": fn.Image,
                    "status": "ready" if ready else ("failed" if error else "starting"),
                    "error": error,
                    "replicas": fn.Replicas,
                    "available": fn.AvailableReplicas,
                    "invocations": fn.InvocationCount,
                    "error_rate": round(stats.errors / stats.calls, 4) if stats.calls else None,
                    "p50_ms": _ms(stats.quantile(0.5)),
                    "p99_ms": _ms(stats.quantile(0.99)),
                }
            )
        return web.json_response({"window_seconds": WINDOW_SECONDS, "functions": rows})

    async def invoke(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            who(request, INVOKE)
        except AuthError as exc:
            return refused(exc)
        if not NAME_RE.match(name):
            return web.json_response({"message": f"invalid function name {name!r}"}, status=400)
        try:
            body = await read_body(request, body_timeout)
            reply = await manage.invoker.invoke(name, body, "http")
        except InvokeError as exc:
            return web.json_response({"message": exc.message}, status=exc.http)
        return web.Response(
            body=reply.Output,
            headers={
                "Content-Type": reply.ContentType or "application/octet-stream",
                "Content-Disposition": "attachment",
                "Content-Security-Policy": RESULT_CSP,
            },
        )

    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    app.router.add_get("/console/whoami", whoami)
    app.router.add_get("/console/overview", overview)
    app.router.add_post("/console/invoke/{name}", invoke)
    return app
