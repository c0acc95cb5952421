"""A channel to a gateway for every client (CLI, video client, MQTT bridge): TLS when a CA is
given, and the bearer token added to every call's metadata."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from openfx import env

MAX_MESSAGE = 256 * 1024 * 1024


class _Token(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _add(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self.header]
        return (
            details._replace(metadata=metadata)
            if hasattr(details, "_replace")
            else _Details(details, metadata)
        )

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._add(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._add(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: Any, request_iterator: Any) -> Any:
        return continuation(self._add(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable, details: Any, request_iterator: Any) -> Any:
        return continuation(self._add(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def gateway_channel(
    address: str,
    token: str | None = None,
    tls_ca: str | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """`token` and `tls_ca` default to OPENFX_TOKEN and OPENFX_TLS_CA."""
    token = token if token is not None else env.optional("OPENFX_TOKEN")
    tls_ca = tls_ca if tls_ca is not None else env.optional("OPENFX_TLS_CA")
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    opts += options or []
    if tls_ca:
        with open(tls_ca, "rb") as f:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()), options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    return grpc.intercept_channel(channel, _Token(token)) if token else channel


def aio_gateway_channel(address: str, tls_ca: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to the gateway (TLS when `tls_ca` or OPENFX_TLS_CA names a CA); the
    caller adds `bearer(token)` to each call's metadata."""
    tls_ca = tls_ca if tls_ca is not None else env.optional("OPENFX_TLS_CA")
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    if tls_ca:
        with open(tls_ca, "rb") as f:
            return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(f.read()), options=opts)
    return grpc.aio.insecure_channel(address, options=opts)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
