"""Keeps web browsers from driving the gateway on the user's behalf.

A gateway on 127.0.0.1 is reachable from every web page the user has open: a page may send
"simple" requests (form posts, `text/plain` bodies, image loads) to any origin without a CORS
preflight, and DNS rebinding lets a page on `evil.example` talk to 127.0.0.1 under its own
name. So every HTTP request must name the gateway in its `Host` header, requests a browser
marks as coming from another origin are refused, and management writes accept only
`application/json` (which a page can send cross-origin only after a preflight this gateway
never answers). Function routes keep taking any bytes: images, forms, curl's default.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARDS = ("0.0.0.0", "::", "")
JSON_TYPES = ("application/json",)
# what browsers send in Sec-Fetch-Site for a request a page of another origin started
FOREIGN_SITES = ("cross-site", "same-site")


@dataclass(frozen=True)
class HostNames:
    """Values the Host header may carry: exact `host:port` pairs, and names allowed on any port."""

    exact: frozenset[str]
    any_port: frozenset[str]
    anything: bool = False  # --allowed-host '*': the operator turned the check off

    @classmethod
    def for_listener(cls, host: str, port: int, allowed: Iterable[str] = ()) -> HostNames:
        bound = f"[{host}]" if ":" in host else host
        names = {*LOOPBACK_NAMES} | ({bound} if host not in WILDCARDS else set())
        exact = {f"{name}:{port}" for name in names}
        any_port: set[str] = set()
        for entry in allowed:
            entry = entry.strip().lower()
            if entry == "*":
                return cls(frozenset(exact), frozenset(), anything=True)
            name, _, entry_port = entry.rpartition(":")
            if entry_port.isdigit() and (name.endswith("]") or ":" not in name):
                exact.add(entry)
            else:
                any_port.add(entry)
        return cls(frozenset(n.lower() for n in exact), frozenset(any_port))

    def allows(self, host_header: str | None) -> bool:
        if self.anything:
            return True
        if not host_header:
            return False
        host = host_header.strip().lower()
        if host in self.exact:
            return True
        name, _, port = host.rpartition(":")
        if not port.isdigit() or (":" in name and not name.endswith("]")):
            name = host  # no port given
        return name in self.any_port


def _refuse(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")


_REFUSED: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def _refused_counter(registry: CollectorRegistry) -> Counter:
    """One counter per registry, shared by every listener the gateway guards (API and console)."""
    if registry not in _REFUSED:
        _REFUSED[registry] = Counter(
            "gateway_http_refused_total",
            "HTTP requests refused before routing, by reason (host, origin, content-type)",
            ["reason"],
            registry=registry,
        )
    return _REFUSED[registry]


def browser_guard(
    hosts: HostNames, origins: Iterable[str], registry: CollectorRegistry
) -> Callable[..., object]:
    """The aiohttp middleware: Host, then Origin / Sec-Fetch-Site, then JSON-only management writes."""
    allowed_origins = frozenset(o.rstrip("/").lower() for o in origins)
    refused = _refused_counter(registry)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not hosts.allows(host):
            refused.labels("host").inc()
            return _refuse(421, f"Host {host!r} does not name this gateway (see --allowed-host)")
        origin = request.headers.get("Origin")
        if origin is not None:
            own = f"{request.scheme}://{host}".lower()
            if origin.rstrip("/").lower() not in (own, *allowed_origins):
                refused.labels("origin").inc()
                return _refuse(403, f"cross-origin request from {origin!r} refused (see --allowed-origin)")
        elif request.headers.get("Sec-Fetch-Site", "").lower() in FOREIGN_SITES:
            refused.labels("origin").inc()
            return _refuse(403, "request started by a page of another site refused")
        if (
            request.match_info.http_exception is None  # unrouted: 404 / 405 answer first
            and request.path.startswith("/system/")
            and request.method in ("POST", "PUT", "PATCH", "DELETE")
            and (request.method != "DELETE" or request.body_exists)
            and request.content_type not in JSON_TYPES
        ):
            refused.labels("content-type").inc()
            return _refuse(415, f"management requests take application/json, not {request.content_type!r}")
        return await handler(request)

    return guard
