"""For function authors: a logger and the statuses a handler may answer with, nothing else to learn.

    from openfx import fn

    def Handler(req):
        fn.log.info("got %d bytes", len(req.input))      # shows in `openfx-cli fn log NAME`
        if not req.input:
            raise fn.BadInput("send an image")            # INVALID_ARGUMENT / HTTP 400
        ...

A plain `ValueError` still means bad input and any other exception INTERNAL / HTTP 500; these
classes are for the other answers a caller should be able to tell apart. The gateway maps each to
its gRPC code and HTTP status on every path (gRPC, HTTP, MQTT's `status` property).
"""

from __future__ import annotations

import logging

import grpc

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


__all__ = ["BadInput", "Forbidden", "FunctionError", "NotFound", "Unavailable", "log"]
