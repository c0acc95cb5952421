"""The one place a request meets the user's handler (both gRPC and the framed hop call it).

Turns the handler's return value into a Reply (bytes, or `(body, content_type)` for the HTTP
trigger's Content-Type) and its exceptions into statuses:
`ValueError` (including `UnicodeDecodeError`) means bad input, `InvokeError`
carries its own code, anything else is INTERNAL. The process keeps serving.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import traceback
from contextvars import Token

import grpc

from openfx import hops
from openfx.errors import InvokeError
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.watcher.loader import HandlerFn

log = logging.getLogger("openfx.watcher")


def to_bytes(result: object) -> bytes:
    if result is None:
        return b""
    if isinstance(result, bytes):
        return result
    if isinstance(result, (bytearray, memoryview)):
        return bytes(result)
    if isinstance(result, str):
        return result.encode("utf-8")
    raise InvokeError(
        grpc.StatusCode.INTERNAL,
        f"handler returned {type(result).__name__}; return str, bytes, None or (body, content_type)",
    )


def to_reply(result: object) -> wpb.Reply:
    if isinstance(result, tuple):
        if len(result) != 2 or not isinstance(result[1], str):
            raise InvokeError(
                grpc.StatusCode.INTERNAL, "handler returned a tuple; return (body, content_type: str)"
            )
        return wpb.Reply(Output=to_bytes(result[0]), ContentType=result[1])
    return wpb.Reply(Output=to_bytes(result))


class FunctionRuntime:
    """Calls the handler; never raises anything but `InvokeError`.

    A plain `def` handler runs in the watcher's thread pool (it may block). An `async def` handler
    (or a class with `async def __call__`) runs on the event loop itself, as in Starlette/FastAPI:
    its author promises never to block, and each call saves the thread hand-off, which costs more
    CPU than a small handler's own work (bench/README.md).
    """

    def __init__(self, name: str, handler: HandlerFn) -> None:
        self.name = name
        self.handler = handler
        # a function, or an instance whose class defines `async def __call__`
        self.is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            type(handler).__call__
        )

    def invoke(self, request: wpb.Request) -> wpb.Reply:
        token = _serving(request)
        try:
            result = self.handler(request)
            if inspect.iscoroutine(result):  # an async handler called outside a loop (tests, benches)
                result = asyncio.run(result)
            return to_reply(result)
        except Exception as exc:
            raise _status(exc) from exc
        finally:
            hops.current.reset(token)

    async def invoke_async(self, request: wpb.Request) -> wpb.Reply:
        token = _serving(request)
        try:
            return to_reply(await self.handler(request))
        except Exception as exc:
            raise _status(exc) from exc
        finally:
            hops.current.reset(token)


def _serving(request: wpb.Request) -> Token[hops.CallContext]:
    """Let the handler's own calls (`fn.call`, `mesh`) inherit this call's hop count and deadline
    (plain code, not a context manager: it runs on every call, echo's included)."""
    info = request.info
    return hops.current.set(hops.CallContext(info.Hops, info.Timeout, time.monotonic()))


def _status(exc: Exception) -> InvokeError:
    """The status a handler's exception answers with: its own InvokeError, INVALID_ARGUMENT for a
    ValueError, INTERNAL (traceback logged) for anything else."""
    if isinstance(exc, InvokeError):
        return exc
    if isinstance(exc, ValueError):
        return InvokeError(grpc.StatusCode.INVALID_ARGUMENT, _one_line(exc))
    log.error("handler raised %s", "".join(traceback.format_exception(exc)).rstrip())
    return InvokeError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:500]
