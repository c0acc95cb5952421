"""Talking to a gateway from the CLI: address resolution and one-line errors for every failure."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click
import grpc

from openfx.client_channel import gateway_channel
from openfx.config import DEFAULT_GATEWAY
from openfx.errors import not_found
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc

T = TypeVar("T")


def resolve_gateway(flag: str | None, config_gateway: str | None = None) -> str:
    """OpenFx's order: the -g flag, the config file's `openfx.gateway`, OPENFX_URL, the default."""
    for candidate in (flag, config_gateway, os.environ.get("OPENFX_URL"), DEFAULT_GATEWAY):
        if candidate:
            address = candidate.rstrip("/")
            for prefix in ("http://", "grpc://"):
                address = address.removeprefix(prefix)
            if address.startswith(":"):
                address = "127.0.0.1" + address
            return address
    return DEFAULT_GATEWAY


class Gateway:
    """A gRPC stub plus the address, so errors can say where we tried.

    The token comes from OPENFX_TOKEN or the config's `openfx.token_file`; TLS is used when a CA
    is given (OPENFX_TLS_CA or `openfx.tls_ca`)."""

    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None) -> None:
        self.address = address
        self.channel = gateway_channel(address, token, tls_ca)
        self.stub = gpb_grpc.FxGatewayStub(self.channel)

    def call(self, rpc: Callable[..., T], request: Any, timeout: float | None = 30.0, what: str = "") -> T:
        try:
            return rpc(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise click.ClickException(explain(exc, self.address, what)) from None


def explain(exc: grpc.RpcError, address: str, what: str = "") -> str:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and (
        "connect" in (details or "") or "Connection refused" in (details or "")
    ):
        return (
            f"cannot reach the gateway at {address}: start it with 'openfx-cli up -d', "
            "or point -g/--gateway or OPENFX_URL at a running one"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{details}: set OPENFX_TOKEN (or openfx.token_file in the config) to a gateway token"
    if code == grpc.StatusCode.NOT_FOUND and what and details == not_found(what).message:
        # the gateway's own "no such function"; a handler's NOT_FOUND keeps its code and words
        return f"{details} ('openfx-cli fn list' shows what is deployed)"
    return f"{code.name}: {details}"
