"""The invocation core: every call, from gRPC, HTTP or a stream, goes through here.

It finds the function, enforces its in-flight limit (RESOURCE_EXHAUSTED at once,
never a queue) and its timeout (DEADLINE_EXCEEDED), picks a replica, and counts
the outcome with its real status in the metrics and the function's invocation count.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator

import grpc

from openfx.errors import InvokeError, http_status
from openfx.gateway.backend import Backend
from openfx.gateway.backend import DeployedFunction as Function
from openfx.gateway.metrics import UNKNOWN_FUNCTION, GatewayMetrics
from openfx.pb import fxwatcher_pb2 as wpb

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def watcher_request(fn: Function, payload: bytes, trigger: str, topic: str = "") -> wpb.Request:
    now = datetime.datetime.now(datetime.UTC).isoformat()
    d = fn.definition
    return wpb.Request(
        input=payload,
        info=wpb.Info(
            FunctionName=d.name,
            Timeout=f"{d.timeout}s",
            Runtime="python3",
            Trigger=wpb.Trigger(Name=trigger, Topic=topic, Time=now),
        ),
    )


def _rounded(seconds: float) -> str:
    """A duration as a person reads it: gRPC's remaining time (0.499017) is the 0.5 s they set."""
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.2g}s"


def _timed_out(name: str, own: float, deadline: float | None, timeout: float) -> InvokeError:
    """The call's timeout is the shorter of the function's and the caller's: say which ran out, so
    a caller's short deadline is not blamed on the function (and the other way round)."""
    if deadline is not None and timeout < own:
        return InvokeError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"call to {name} passed the caller's deadline ({_rounded(deadline)})",
        )
    return InvokeError(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"function {name} timed out after {_rounded(own)} (its timeout)"
    )


def _check_size(fn: Function, payload: bytes) -> None:
    limit = fn.definition.max_request_bytes
    if limit and len(payload) > limit:
        raise InvokeError(
            RESOURCE_EXHAUSTED,
            f"request of {len(payload)} bytes is over {fn.name}'s limit of {limit} (max_request_bytes)",
            http=413,
        )


class Invoker:
    def __init__(
        self, backend: Backend, metrics: GatewayMetrics, max_streams: int = 256, starting: bool = False
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.max_streams = max_streams
        self.streams = 0
        # until the gateway has deployed its stack (or read the cluster's functions), "not found"
        # is not known yet: say UNAVAILABLE, which callers and triggers retry, not NOT_FOUND
        self.starting = starting

    def _admit(self, name: str, payload: bytes) -> Function:
        try:
            fn = self.backend.get(name)
        except InvokeError as exc:
            if self.starting and exc.code == grpc.StatusCode.NOT_FOUND:
                raise InvokeError(
                    grpc.StatusCode.UNAVAILABLE, f"the gateway is starting: {name} is not deployed yet"
                ) from None
            raise
        limit = fn.definition.max_inflight
        if fn.in_flight >= limit:
            raise InvokeError(
                RESOURCE_EXHAUSTED, f"function {name} has {limit} calls in flight (max_inflight)"
            )
        _check_size(fn, payload)
        return fn

    def metric_label(self, name: str, fn: Function | None = None) -> str:
        """The function_name a call is counted under: an anonymous caller choosing names must not
        add series to /metrics without limit, so every name that is not deployed shares one."""
        return name if fn is not None or name in self.backend.functions else UNKNOWN_FUNCTION

    def _count(self, name: str, code: int, started: float, fn: Function | None, trigger: str) -> None:
        if fn is not None:
            fn.invocations += 1
        self.metrics.observe(self.metric_label(name, fn), code, time.perf_counter() - started, trigger)

    async def invoke(
        self, name: str, payload: bytes, trigger: str = "grpc", topic: str = "", deadline: float | None = None
    ) -> wpb.Reply:
        """Call `name` once. `deadline` (seconds) from the caller shortens the function's timeout."""
        started = time.perf_counter()
        fn: Function | None = None
        try:
            fn = self._admit(name, payload)
            fn.in_flight += 1  # from here: a call waiting for a cold start counts toward max_inflight
            try:
                timeout = fn.definition.timeout if deadline is None else min(deadline, fn.definition.timeout)
                acquire = getattr(fn, "acquire", None)  # embedded: waits (within the deadline) for a start
                replica = await acquire(deadline) if acquire else fn.pick()
                if deadline is not None and (waited := time.perf_counter() - started) > 0.01:
                    timeout = max(min(timeout, deadline - waited), 0.001)  # a cold start used part of it
                replica.in_flight += 1
                try:
                    reply = await replica.call(watcher_request(fn, payload, trigger, topic), timeout)
                except TimeoutError:
                    raise _timed_out(name, fn.definition.timeout, deadline, timeout) from None
                finally:
                    replica.in_flight -= 1
            finally:
                fn.in_flight -= 1
        except InvokeError as exc:
            self._count(name, exc.http, started, fn, trigger)
            raise
        self._count(name, 200, started, fn, trigger)
        return reply

    async def stream(
        self, name: str, first: bytes, rest: AsyncIterator[tuple[str, bytes]], trigger: str = "grpc"
    ) -> AsyncIterator[bytes]:
        """Forward a stream of inputs to one replica's `Calls`; yield outputs in order.

        Flow control is end to end: the upstream call pulls from `rest` only as fast
        as the function's HTTP/2 window allows, so a slow function slows the client.
        """
        if self.streams >= self.max_streams:
            raise InvokeError(RESOURCE_EXHAUSTED, f"{self.max_streams} streams already open (max_streams)")
        fn = self._admit(name, first)
        stamps: list[float] = []
        refused: list[InvokeError] = []

        async def requests() -> AsyncIterator[wpb.Request]:
            stamps.append(time.perf_counter())
            yield watcher_request(fn, first, trigger)
            async for service, payload in rest:
                if service and service != name:
                    # end the upstream half of the stream; frames already sent are still answered
                    refused.append(
                        InvokeError(
                            grpc.StatusCode.INVALID_ARGUMENT, f"one stream, one function: got {service!r}"
                        )
                    )
                    return
                try:
                    _check_size(fn, payload)
                except InvokeError as exc:
                    refused.append(exc)
                    return
                stamps.append(time.perf_counter())
                yield watcher_request(fn, payload, trigger)

        acquire = getattr(fn, "acquire", None)
        fn.in_flight += 1  # a stream waiting for a cold start counts toward max_inflight too
        try:
            replica = await acquire(None) if acquire else fn.pick()
            call = replica.stream(requests())
        except BaseException:
            fn.in_flight -= 1
            raise
        replica.in_flight += 1
        self.streams += 1
        try:
            async for reply in call:
                self._count(name, 200, stamps.pop(0) if stamps else time.perf_counter(), fn, trigger)
                yield reply.Output
            if refused:
                raise refused[0]
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller went away: let the cancellation through
            # the replica's channel was closed under the stream: its process exited
            self._count(name, 503, stamps.pop(0) if stamps else time.perf_counter(), fn, trigger)
            raise InvokeError(
                grpc.StatusCode.UNAVAILABLE, f"{replica.label} exited during the stream"
            ) from None
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            self._count(
                name, http_status(code), stamps.pop(0) if stamps else time.perf_counter(), fn, trigger
            )
            if code == grpc.StatusCode.UNAVAILABLE or not replica.connected:
                raise InvokeError(
                    grpc.StatusCode.UNAVAILABLE, f"{replica.label} ended the stream: {exc.details()}"
                ) from None
            raise InvokeError(code, exc.details() or code.name) from None
        finally:
            call.cancel()
            fn.in_flight -= 1
            replica.in_flight -= 1
            self.streams -= 1
