"""For function authors: a logger, the statuses a handler may answer with, and calling another function.

    from openfx import fn

    def Handler(req):
        fn.log.info("got %d bytes", len(req.input))      # shows in `openfx-cli fn log NAME`
        if not req.input:
            raise fn.BadInput("send an image")            # INVALID_ARGUMENT / HTTP 400
        ...

A plain `ValueError` still means bad input and any other exception INTERNAL / HTTP 500; these
classes are for the other answers a caller should be able to tell apart. The gateway maps each to
its gRPC code and HTTP status on every path (gRPC, HTTP, MQTT's `status` property).

`fn.call(name, data)` calls another function and returns its output (bytes): the way functions
compose (KETI's `mesh.mesh_call` is a shim over it). It goes through the gateway
(`OPENFX_GATEWAY`, which the embedded platform sets), so the callee's limits, authentication and
metrics apply as to any caller; it carries this call's remaining deadline and its place in the
call chain, and a chain deeper than `hops.MAX_HOPS` (a loop) is refused with a clear error.
"""

from __future__ import annotations

import logging
import threading

import grpc

from openfx import defaults, env, hops
from openfx.errors import InvokeError

# The watcher's output is the function's log (`fn log`); this logger writes there, one line per call.
log = logging.getLogger("function")


class FunctionError(InvokeError):
    """Answer the caller with `code` and a one-line `message` (the process keeps serving)."""

    code_name = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(getattr(grpc.StatusCode, self.code_name), " ".join(str(message).split())[:500])


class BadInput(FunctionError):
    """The input cannot be processed: INVALID_ARGUMENT / HTTP 400."""

    code_name = "INVALID_ARGUMENT"


class NotFound(FunctionError):
    """What the input names does not exist: NOT_FOUND / HTTP 404."""

    code_name = "NOT_FOUND"


class Forbidden(FunctionError):
    """The caller may not do this: PERMISSION_DENIED / HTTP 403."""

    code_name = "PERMISSION_DENIED"


class Unavailable(FunctionError):
    """Not now, try again (a dependency is down, a model still loading): UNAVAILABLE / HTTP 503."""

    code_name = "UNAVAILABLE"


GATEWAY_ENV = "OPENFX_GATEWAY"  # host:port of the gateway's gRPC (set by the embedded platform)
TOKEN_ENV = "OPENFX_TOKEN"  # a bearer token for it, when the gateway asks for one
NAMESPACE_ENV = "OPENFX_NAMESPACE"  # no gateway: call `<name>.<namespace>:50051` directly (a cluster)
DEFAULT_TIMEOUT = defaults.TIMEOUT_SECONDS  # outside any call (a script, a test) and without `timeout`

_channels: dict[str, grpc.Channel] = {}
_channels_lock = threading.Lock()


def _channel(address: str) -> grpc.Channel:
    """One channel per address for the life of the process (a new one per call costs a handshake)."""
    with _channels_lock:
        channel = _channels.get(address)
        if channel is None:
            channel = _channels[address] = grpc.insecure_channel(address)
        return channel


def call(name: str, data: bytes | str = b"", timeout: float | None = None) -> bytes:
    """Call function `name` with `data`; return its output. Raises `InvokeError` with the callee's
    status (a handler that lets it through answers its own caller with the same status)."""
    payload = data.encode() if isinstance(data, str) else bytes(data)
    context = hops.current.get()
    depth = context.hops + 1
    refused = hops.too_deep(depth, name)
    if refused:
        raise InvokeError(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
    budget = context.remaining()
    if budget is not None and budget <= 0:
        raise InvokeError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no time left to call {name}")
    if timeout is not None:
        budget = timeout if budget is None else min(budget, timeout)
    budget = DEFAULT_TIMEOUT if budget is None else budget
    metadata = [(hops.METADATA_KEY, str(depth))]
    if token := env.optional(TOKEN_ENV):
        metadata.append(("authorization", f"Bearer {token}"))
    gateway = env.string(GATEWAY_ENV)
    try:
        if gateway:
            from openfx.pb import fxgateway_pb2 as gpb
            from openfx.pb import fxgateway_pb2_grpc as gpb_grpc

            stub = gpb_grpc.FxGatewayStub(_channel(gateway))
            request = gpb.InvokeServiceRequest(Service=name, Input=payload)
            return bytes(stub.Invoke(request, timeout=budget, metadata=metadata).Msg)
        from openfx.pb import fxwatcher_pb2 as wpb
        from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc

        address = f"{name}.{env.string(NAMESPACE_ENV, 'openfx-fn')}:{defaults.WATCHER_PORT}"
        info = wpb.Info(
            FunctionName=name, Timeout=f"{budget:g}s", Hops=depth, Trigger=wpb.Trigger(Name="grpc")
        )
        reply = wpb_grpc.FxWatcherStub(_channel(address)).Call(
            wpb.Request(input=payload, info=info), timeout=budget
        )
        return bytes(reply.Output)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else "") or code.name
        message = details if details.startswith(f"call to {name}") else f"{name}: {details}"
        raise InvokeError(code, message) from None


__all__ = ["BadInput", "Forbidden", "FunctionError", "NotFound", "Unavailable", "call", "log"]
