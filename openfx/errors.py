"""One error type for every path (gRPC, HTTP, MQTT) so a status is decided once.

The gateway and the watcher raise `InvokeError(code, message)`; each front end only
translates it: gRPC aborts with the code, HTTP answers the mapped status with the
message as one line of text.
"""

from __future__ import annotations

import grpc

_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# Wire value of each status code, for the framed embedded hop.
CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def http_status(code: grpc.StatusCode) -> int:
    """HTTP status for a gRPC code (500 for anything without a closer match)."""
    return _HTTP_STATUS.get(code, 500)


class InvokeError(Exception):
    """A call failed with a defined status.

    `http` overrides the mapped HTTP status where gRPC has one code for two
    HTTP meanings (RESOURCE_EXHAUSTED is 413 for a too-large payload, else 429).
    """

    def __init__(self, code: grpc.StatusCode, message: str, http: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http = http or http_status(code)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def not_found(name: str) -> InvokeError:
    return InvokeError(grpc.StatusCode.NOT_FOUND, f"function {name!r} not found")
