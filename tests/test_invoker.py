"""The invocation core alone (openfx.gateway.invoker): limits, timeouts, statuses and counts, with
a stand-in backend whose replicas are coroutines. End to end: tests/test_gateway_invoke.py,
tests/test_streaming.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from openfx.errors import InvokeError, not_found
from openfx.function_def import FunctionDef
from openfx.gateway.invoker import Invoker, watcher_request
from openfx.gateway.metrics import GatewayMetrics
from openfx.pb import fxwatcher_pb2 as wpb


class Replica:
    def __init__(self, label: str = "f[0]") -> None:
        self.label = label
        self.in_flight = 0
        self.connected = True
        self.requests: list[wpb.Request] = []
        self.timeouts: list[float] = []
        self.gate: asyncio.Event | None = None  # set: calls wait for it
        self.fail: Exception | None = None
        self.stream_error: Exception | None = None
        self.stream_cancelled = False

    async def call(self, request: wpb.Request, timeout: float) -> wpb.Reply:
        self.requests.append(request)
        self.timeouts.append(timeout)
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), timeout)  # TimeoutError, as the real replicas
        if self.fail is not None:
            raise self.fail
        return wpb.Reply(Output=b"out:" + request.input)

    async def answers(self, requests: AsyncIterator[wpb.Request]) -> AsyncIterator[wpb.Reply]:
        async for r in requests:
            self.requests.append(r)
            if self.stream_error is not None:
                raise self.stream_error
            yield wpb.Reply(Output=b"s:" + r.input)

    def stream(self, requests: AsyncIterator[wpb.Request]):  # type: ignore[no-untyped-def]
        """A stand-in for the gRPC stream call: iterable (`answers`) and cancellable."""
        replica = self

        class Call:
            def __aiter__(self):  # type: ignore[no-untyped-def]
                return replica.answers(requests)

            def cancel(self) -> None:
                replica.stream_cancelled = True

        return Call()


class Function:
    def __init__(self, definition: FunctionDef, replica: Replica) -> None:
        self.definition = definition
        self.invocations = 0
        self.in_flight = 0
        self.replica = replica

    @property
    def name(self) -> str:
        return self.definition.name

    def pick(self) -> Replica:
        return self.replica


class Backend:
    def __init__(self, **functions: Function) -> None:
        self.functions = functions

    def get(self, name: str) -> Function:
        if name not in self.functions:
            raise not_found(name)
        return self.functions[name]


def setup(**definition: object) -> tuple[Invoker, Function, Replica, GatewayMetrics]:
    replica = Replica()
    fn = Function(FunctionDef(name="f", image="i", handler_dir=Path("/x"), **definition), replica)  # type: ignore[arg-type]
    metrics = GatewayMetrics()
    return Invoker(Backend(f=fn), metrics, max_streams=2), fn, replica, metrics


def count(metrics: GatewayMetrics, function: str, code: int) -> float:
    labels = {"function_name": function, "code": str(code)}
    return metrics.registry.get_sample_value("gateway_function_invocation_total", labels) or 0.0


def failure(coro) -> InvokeError:  # type: ignore[no-untyped-def]
    with pytest.raises(InvokeError) as err:
        asyncio.run(coro)
    return err.value


def test_a_call_reaches_the_replica_with_its_request_info_and_is_counted() -> None:
    invoker, fn, replica, metrics = setup(timeout=7)
    reply = asyncio.run(invoker.invoke("f", b"hi", trigger="mqtt", topic="fn/f"))
    assert reply.Output == b"out:hi"
    [request] = replica.requests
    assert request.input == b"hi" and request.info.FunctionName == "f" and request.info.Timeout == "7s"
    assert (request.info.Trigger.Name, request.info.Trigger.Topic) == ("mqtt", "fn/f")
    assert request.info.Runtime == "python3" and request.info.Trigger.Time.endswith("+00:00")
    assert replica.timeouts == [7]
    assert (fn.invocations, fn.in_flight, replica.in_flight) == (1, 0, 0)
    assert count(metrics, "f", 200) == 1
    labels = {"function_name": "f", "trigger": "mqtt"}  # latency by function and trigger
    assert metrics.registry.get_sample_value("gateway_functions_seconds_count", labels) == 1
    assert 0 <= metrics.registry.get_sample_value("gateway_functions_seconds_sum", labels) < 10
    asyncio.run(invoker.invoke("f", b"again"))
    assert (replica.requests[1].info.Trigger.Name, replica.requests[1].info.Trigger.Topic) == ("grpc", "")


def test_the_callers_deadline_shortens_the_timeout_but_never_lengthens_it() -> None:
    invoker, _, replica, _ = setup(timeout=5)
    asyncio.run(invoker.invoke("f", b"", deadline=2))
    asyncio.run(invoker.invoke("f", b"", deadline=9))
    assert replica.timeouts == [2, 5]


def test_timeout_is_deadline_exceeded_and_504() -> None:
    invoker, fn, replica, metrics = setup(timeout=0.01)
    replica.gate = asyncio.Event()
    err = failure(invoker.invoke("f", b""))
    assert (err.code, err.http, err.message) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        504,
        "function f timed out after 0.01s (its timeout)",
    )
    assert (fn.invocations, fn.in_flight, replica.in_flight) == (1, 0, 0)
    assert count(metrics, "f", 504) == 1 and count(metrics, "f", 200) == 0


def test_a_timeout_says_whether_the_function_or_the_caller_ran_out() -> None:
    """The call's timeout is the shorter of the two: the caller's deadline must not be blamed on the
    function, and gRPC's remaining time (0.499017 s of a 0.5 s deadline) reads as what was set."""
    invoker, fn, replica, metrics = setup(timeout=30)
    replica.fail = TimeoutError()  # the replica's wait ran out (at once: no real waiting)
    said = {
        deadline: failure(invoker.invoke("f", b"", deadline=deadline)).message
        for deadline in (None, 0.499017, 12.4, 29.99, 30, 45)
    }
    assert said == {
        None: "function f timed out after 30s (its timeout)",
        0.499017: "call to f passed the caller's deadline (0.5s)",
        12.4: "call to f passed the caller's deadline (12s)",
        29.99: "call to f passed the caller's deadline (30s)",  # rounded, but the caller's all the same
        30: "function f timed out after 30s (its timeout)",  # as long as its own: the function's
        45: "function f timed out after 30s (its timeout)",
    }
    assert replica.timeouts == [30, 0.499017, 12.4, 29.99, 30, 30]
    fn.definition.timeout = 2.5
    err = failure(invoker.invoke("f", b""))
    assert (err.code, err.http, err.message) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        504,
        "function f timed out after 2.5s (its timeout)",
    )
    assert count(metrics, "f", 504) == 7 and fn.in_flight == replica.in_flight == 0


def test_unknown_function_is_not_found_and_counted_under_one_shared_label() -> None:
    """Names a caller invents must not each add series to /metrics."""
    invoker, fn, _, metrics = setup(max_inflight=1)
    err = failure(invoker.invoke("nope", b""))
    assert (err.code, err.http) == (grpc.StatusCode.NOT_FOUND, 404)
    failure(invoker.invoke("nope2", b""))
    assert count(metrics, "<unknown>", 404) == 2 and fn.invocations == 0
    assert count(metrics, "nope", 404) == 0 and count(metrics, "nope2", 404) == 0
    fn.in_flight = 1  # a deployed function refused before its call keeps its own label
    assert failure(invoker.invoke("f", b"")).http == 429
    assert count(metrics, "f", 429) == 1 and count(metrics, "<unknown>", 429) == 0


def test_while_the_gateway_starts_an_unknown_function_is_unavailable_not_missing() -> None:
    """A restarted gateway listens before it has deployed its stack: a caller (the MQTT bridge
    retrying through the restart) must get a status it retries, not a NOT_FOUND it dead-letters."""
    invoker, fn, _, metrics = setup()
    invoker.starting = True
    err = failure(invoker.invoke("nope", b""))
    assert (err.code, err.http) == (grpc.StatusCode.UNAVAILABLE, 503)
    assert err.message == "the gateway is starting: nope is not deployed yet"
    assert asyncio.run(invoker.invoke("f", b"x")).Output == b"out:x"  # what is deployed answers
    invoker.starting = False
    assert failure(invoker.invoke("nope", b"")).code == grpc.StatusCode.NOT_FOUND


def test_a_replicas_error_keeps_its_status_and_is_counted() -> None:
    invoker, fn, replica, metrics = setup()
    replica.fail = InvokeError(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    assert failure(invoker.invoke("f", b"")).code == grpc.StatusCode.INVALID_ARGUMENT
    assert count(metrics, "f", 400) == 1 and fn.invocations == 1 and fn.in_flight == 0


def test_in_flight_limit_refuses_at_once_and_frees_its_slots() -> None:
    async def scenario(invoker: Invoker, fn: Function, replica: Replica) -> tuple[InvokeError, list[bytes]]:
        replica.gate = asyncio.Event()
        held = [asyncio.create_task(invoker.invoke("f", b"%d" % i)) for i in range(2)]
        for _ in range(100):  # let both tasks reach the replica
            await asyncio.sleep(0)
        assert fn.in_flight == 2
        assert replica.in_flight == 2
        with pytest.raises(InvokeError) as err:
            await invoker.invoke("f", b"third")
        replica.gate.set()
        outputs = [r.Output for r in await asyncio.gather(*held)]
        return err.value, outputs

    invoker, fn, replica, metrics = setup(max_inflight=2)
    err, outputs = asyncio.run(scenario(invoker, fn, replica))
    assert (err.code, err.http, err.message) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        429,
        "function f has 2 calls in flight (max_inflight)",
    )
    assert outputs == [b"out:0", b"out:1"] and [r.input for r in replica.requests] == [b"0", b"1"]
    assert fn.in_flight == 0 and replica.in_flight == 0 and count(metrics, "f", 429) == 1
    assert asyncio.run(invoker.invoke("f", b"again")).Output == b"out:again"  # one below the limit: admitted


def test_request_size_limit_is_413_and_inclusive() -> None:
    invoker, _, replica, metrics = setup(max_request_bytes=4)
    assert asyncio.run(invoker.invoke("f", b"four")).Output == b"out:four"
    err = failure(invoker.invoke("f", b"fives"))
    assert (err.code, err.http) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 413)
    assert err.message == "request of 5 bytes is over f's limit of 4 (max_request_bytes)"
    assert count(metrics, "f", 413) == 1 and len(replica.requests) == 1
    unlimited, _, _, _ = setup(max_request_bytes=0)
    assert asyncio.run(unlimited.invoke("f", b"x" * 100_000)).Output.startswith(b"out:")


async def _collect(
    invoker: Invoker, name: str, frames: list[tuple[str, bytes]], first: bytes = b"a"
) -> list[bytes]:
    async def rest() -> AsyncIterator[tuple[str, bytes]]:
        for frame in frames:
            yield frame

    return [out async for out in invoker.stream(name, first, rest())]


def test_stream_answers_every_frame_in_order_and_counts_each() -> None:
    invoker, fn, replica, metrics = setup()
    out = asyncio.run(_collect(invoker, "f", [("f", b"b"), ("", b"c")]))
    assert out == [b"s:a", b"s:b", b"s:c"]
    assert all(r.info.Trigger.Name == "grpc" for r in replica.requests)
    assert fn.invocations == 3 and count(metrics, "f", 200) == 3
    assert (fn.in_flight, replica.in_flight, invoker.streams) == (0, 0, 0) and replica.stream_cancelled


def test_stream_of_another_function_ends_after_the_frames_sent() -> None:
    invoker, fn, _, _ = setup()
    got: list[bytes] = []

    async def run() -> None:
        async def rest() -> AsyncIterator[tuple[str, bytes]]:
            yield ("f", b"b")
            yield ("g", b"c")
            yield ("f", b"never")

        async for out in invoker.stream("f", b"a", rest()):
            got.append(out)

    err = failure(run())
    assert (err.code, err.message) == (grpc.StatusCode.INVALID_ARGUMENT, "one stream, one function: got 'g'")
    assert got == [b"s:a", b"s:b"] and invoker.streams == 0 and fn.in_flight == 0


def test_stream_frame_over_the_size_limit_ends_it_with_413() -> None:
    invoker, _, _, _ = setup(max_request_bytes=3)
    got: list[bytes] = []

    async def run() -> None:
        async def rest() -> AsyncIterator[tuple[str, bytes]]:
            yield ("f", b"abc")
            yield ("f", b"abcd")

        async for out in invoker.stream("f", b"a", rest()):
            got.append(out)

    err = failure(run())
    assert (err.code, err.http) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 413) and got == [b"s:a", b"s:abc"]
    assert failure(_collect(invoker, "f", [], first=b"abcd")).http == 413  # the first frame too


def test_stream_cap_and_in_flight_limit_apply_to_streams() -> None:
    invoker, fn, _, _ = setup(max_inflight=1)
    invoker.streams = 2
    err = failure(_collect(invoker, "f", []))
    assert (err.code, err.message) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "2 streams already open (max_streams)",
    )
    invoker.streams = 1
    assert asyncio.run(_collect(invoker, "f", [])) == [b"s:a"]  # one below the cap
    fn.in_flight = 1
    assert failure(_collect(invoker, "f", [])).code == grpc.StatusCode.RESOURCE_EXHAUSTED


class AioError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("code", "connected", "expected", "http"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, True, grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.INTERNAL, True, grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNAVAILABLE, True, grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.CANCELLED, False, grpc.StatusCode.UNAVAILABLE, 499),  # the process went away
    ],
)
def test_stream_errors_keep_their_status(code, connected, expected, http) -> None:  # type: ignore[no-untyped-def]
    invoker, fn, replica, metrics = setup()
    replica.stream_error = AioError(code, "went wrong")
    replica.connected = connected
    err = failure(_collect(invoker, "f", []))
    assert err.code == expected
    assert ("ended the stream: went wrong" in err.message) == (expected == grpc.StatusCode.UNAVAILABLE)
    assert count(metrics, "f", http) == 1 and fn.in_flight == 0 and invoker.streams == 0
    assert fn.invocations == 1


def test_stream_error_without_details_says_its_code() -> None:
    invoker, _, replica, _ = setup()
    replica.stream_error = AioError(grpc.StatusCode.INVALID_ARGUMENT, "")
    assert failure(_collect(invoker, "f", [])).message == "INVALID_ARGUMENT"


def test_open_streams_count_against_both_limits_while_open() -> None:
    async def scenario() -> None:
        invoker, fn, replica, _ = setup(max_inflight=5)
        release = asyncio.Event()
        first_answers = [asyncio.Event(), asyncio.Event()]

        async def held(i: int) -> list[bytes]:
            async def rest() -> AsyncIterator[tuple[str, bytes]]:
                await release.wait()
                yield ("f", b"last")

            out = []
            async for o in invoker.stream("f", b"%d" % i, rest()):
                out.append(o)
                first_answers[i].set()
            return out

        tasks = [asyncio.create_task(held(i)) for i in range(2)]
        for e in first_answers:
            await asyncio.wait_for(e.wait(), 10)
        assert (invoker.streams, fn.in_flight, replica.in_flight) == (2, 2, 2)
        with pytest.raises(InvokeError) as err:
            await _collect(invoker, "f", [])
        assert err.value.message == "2 streams already open (max_streams)"
        release.set()
        assert await asyncio.gather(*tasks) == [[b"s:0", b"s:last"], [b"s:1", b"s:last"]]
        assert (invoker.streams, fn.in_flight, replica.in_flight) == (0, 0, 0)

    asyncio.run(scenario())


def test_stream_cut_by_the_replica_exiting_is_unavailable() -> None:
    invoker, fn, replica, metrics = setup()
    replica.stream_error = asyncio.CancelledError()
    err = failure(_collect(invoker, "f", []))
    assert (err.code, err.message) == (grpc.StatusCode.UNAVAILABLE, "f[0] exited during the stream")
    assert count(metrics, "f", 503) == 1 and invoker.streams == 0 and replica.in_flight == 0


def test_watcher_request_carries_the_function_timeout() -> None:
    fn = Function(FunctionDef(name="g", image="i", handler_dir=None, timeout=2.5), Replica())
    request = watcher_request(fn, b"p", "http")  # type: ignore[arg-type]
    assert (request.info.FunctionName, request.info.Timeout, request.info.Trigger.Name) == (
        "g",
        "2.5s",
        "http",
    )
    assert request.info.Trigger.Topic == ""


def test_a_gateway_created_starting_says_unavailable_until_told_otherwise() -> None:
    """The gateway builds its invoker with starting=True (app.py): the flag must take effect from
    the constructor, not only when set later."""
    _, fn, _, metrics = setup()
    invoker = Invoker(Backend(f=fn), metrics, starting=True)
    assert failure(invoker.invoke("nope", b"")).code == grpc.StatusCode.UNAVAILABLE
    assert Invoker(Backend(f=fn), metrics).starting is False


def test_the_default_stream_cap_is_the_gateways() -> None:
    from openfx.gateway.app import GatewaySettings

    assert Invoker(Backend(), GatewayMetrics()).max_streams == GatewaySettings().max_streams == 256


class Clock:
    """Stands in for the invoker's `time`: cold starts and replies take exactly the time a test says."""

    def __init__(self) -> None:
        self.now = 0.0  # exact sums: a start of 0.01 s waits exactly 0.01 s

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    import openfx.gateway.invoker as invoker_module

    fake = Clock()
    monkeypatch.setattr(invoker_module, "time", fake)
    return fake


class ColdFunction(Function):
    """The embedded backend's contract (LocalFunction.acquire): `pick()` refuses while no replica is
    ready (UNAVAILABLE); `acquire(deadline)` waits for the start, within the caller's deadline, and
    returns the replica, or raises the start's failure (UNAVAILABLE, DEADLINE_EXCEEDED)."""

    def __init__(self, definition: FunctionDef, replica: Replica, clock: Clock, start_seconds: float) -> None:
        super().__init__(definition, replica)
        self.clock = clock
        self.start_seconds = start_seconds
        self.started = asyncio.Event()  # set: the start is done
        self.start_error: InvokeError | None = None
        self.deadlines: list[float | None] = []
        self.waiting = asyncio.Event()  # set once a caller waits for the start

    def pick(self) -> Replica:
        raise InvokeError(grpc.StatusCode.UNAVAILABLE, f"function {self.name} is not ready")

    async def acquire(self, deadline: float | None) -> Replica:
        self.deadlines.append(deadline)
        self.waiting.set()
        await self.started.wait()
        self.clock.now += self.start_seconds
        if self.start_error is not None:
            raise self.start_error
        return self.replica


def cold(
    clock: Clock, start_seconds: float, **definition: object
) -> tuple[Invoker, ColdFunction, Replica, GatewayMetrics]:
    replica = Replica()
    fn = ColdFunction(
        FunctionDef(name="f", image="i", handler_dir=Path("/x"), **definition),  # type: ignore[arg-type]
        replica,
        clock,
        start_seconds,
    )
    fn.started.set()
    metrics = GatewayMetrics()
    return Invoker(Backend(f=fn), metrics, max_streams=2), fn, replica, metrics


@pytest.mark.parametrize(
    ("deadline", "start_seconds", "timeout"),
    [
        (2, 0.5, 1.5),  # the cold start used 0.5 s of the caller's 2 s: the call gets what is left
        (None, 0.5, 10),  # no caller deadline: the call gets the function's whole timeout
        (2, 0.01, 2),  # a start within 10 ms (a replica already up) leaves the deadline as it is
        (1, 0.9995, 0.001),  # a start that used (nearly) all of it: the call still gets 1 ms, not 0
    ],
)
def test_a_cold_start_waits_within_the_callers_deadline_and_the_call_gets_what_is_left(
    clock: Clock, deadline: float | None, start_seconds: float, timeout: float
) -> None:
    invoker, fn, replica, _ = cold(clock, start_seconds, timeout=10)
    assert asyncio.run(invoker.invoke("f", b"x", deadline=deadline)).Output == b"out:x"
    assert fn.deadlines == [deadline]  # acquire waited, not pick (which refuses while starting)
    assert replica.timeouts == [pytest.approx(timeout)]


def test_a_call_waiting_for_a_cold_start_holds_an_in_flight_slot() -> None:
    async def scenario(invoker: Invoker, fn: ColdFunction) -> InvokeError:
        fn.started.clear()
        waiting = asyncio.create_task(invoker.invoke("f", b"1"))
        await asyncio.wait_for(fn.waiting.wait(), 10)
        assert fn.in_flight == 1
        with pytest.raises(InvokeError) as err:
            await invoker.invoke("f", b"2")
        fn.started.set()
        assert (await waiting).Output == b"out:1"
        return err.value

    invoker, fn, _, _ = cold(Clock(), 0, max_inflight=1)
    assert asyncio.run(scenario(invoker, fn)).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fn.in_flight == 0


def seconds(metrics: GatewayMetrics, trigger: str, which: str = "sum") -> float | None:
    return metrics.registry.get_sample_value(
        f"gateway_functions_seconds_{which}", {"function_name": "f", "trigger": trigger}
    )


def test_a_cold_start_that_fails_keeps_its_status_frees_the_slot_and_is_counted_by_trigger(
    clock: Clock,
) -> None:
    invoker, fn, replica, metrics = cold(clock, 3, timeout=10)
    fn.start_error = InvokeError(grpc.StatusCode.DEADLINE_EXCEEDED, "function f was not ready within 3s")
    err = failure(invoker.invoke("f", b"", trigger="mqtt", deadline=3))
    assert (err.code, err.http) == (grpc.StatusCode.DEADLINE_EXCEEDED, 504)
    assert (fn.in_flight, fn.invocations, replica.requests) == (0, 1, [])
    assert count(metrics, "f", 504) == 1 and seconds(metrics, "mqtt") == 3  # the time the wait took


def test_a_stream_waits_for_a_cold_start_without_a_deadline(clock: Clock) -> None:
    invoker, fn, _, _ = cold(clock, 1)
    assert asyncio.run(_collect(invoker, "f", [("f", b"b")])) == [b"s:a", b"s:b"]
    assert fn.deadlines == [None] and fn.in_flight == 0


def test_a_stream_whose_start_fails_frees_its_slot(clock: Clock) -> None:
    invoker, fn, _, _ = cold(clock, 1, max_inflight=1)
    fn.start_error = InvokeError(grpc.StatusCode.UNAVAILABLE, "function f could not start")
    err = failure(_collect(invoker, "f", []))
    assert (err.code, err.message) == (grpc.StatusCode.UNAVAILABLE, "function f could not start")
    assert (fn.in_flight, invoker.streams) == (0, 0)
    fn.start_error = None
    assert asyncio.run(_collect(invoker, "f", [])) == [b"s:a"]  # the one slot is free again


class TimedReplica(Replica):
    """A stream whose every answer takes `step` seconds of the fake clock; `stream_error` ends it
    after the answers, `early` before it reads any frame (the channel closed under it)."""

    def __init__(self, clock: Clock, step: float) -> None:
        super().__init__()
        self.clock, self.step = clock, step
        self.early = False
        self.hold: asyncio.Event | None = None  # set: after the first answer, wait for it
        self.answered = asyncio.Event()

    async def answers(self, requests: AsyncIterator[wpb.Request]) -> AsyncIterator[wpb.Reply]:
        if self.early and self.stream_error is not None:
            raise self.stream_error
        async for r in requests:
            self.requests.append(r)
            self.clock.now += self.step
            if self.stream_error is not None:
                raise self.stream_error
            yield wpb.Reply(Output=b"s:" + r.input)
            self.answered.set()
            if self.hold is not None:
                await self.hold.wait()


def timed(clock: Clock, step: float) -> tuple[Invoker, Function, TimedReplica, GatewayMetrics]:
    invoker, fn, _, metrics = setup()
    fn.replica = replica = TimedReplica(clock, step)
    return invoker, fn, replica, metrics


async def _stream(invoker: Invoker, trigger: str, frames: list[bytes]) -> list[bytes]:
    async def rest() -> AsyncIterator[tuple[str, bytes]]:
        for frame in frames:
            yield ("f", frame)

    return [out async for out in invoker.stream("f", b"a", rest(), trigger=trigger)]


def test_stream_answers_are_timed_from_their_own_frame_under_their_trigger(clock: Clock) -> None:
    invoker, fn, _, metrics = timed(clock, 2)
    assert asyncio.run(_stream(invoker, "mqtt", [b"b", b"c"])) == [b"s:a", b"s:b", b"s:c"]
    assert seconds(metrics, "mqtt", "count") == 3 and seconds(metrics, "mqtt") == 6  # 2 s each


@pytest.mark.parametrize(
    ("error", "code", "http"),
    [
        (asyncio.CancelledError(), grpc.StatusCode.UNAVAILABLE, 503),  # the replica's process exited
        (AioError(grpc.StatusCode.INTERNAL, "boom"), grpc.StatusCode.INTERNAL, 500),
    ],
)
@pytest.mark.parametrize("early", [False, True])
def test_a_stream_cut_is_counted_once_under_its_trigger_and_timed_from_its_frame(
    clock: Clock, error: BaseException, code: grpc.StatusCode, http: int, early: bool
) -> None:
    """Cut after reading the first frame (timed from it: 2 s), or before reading any (no frame to
    time: 0 s, and no crash looking for one)."""
    invoker, fn, replica, metrics = timed(clock, 2)
    replica.stream_error, replica.early = error, early
    err = failure(_stream(invoker, "mqtt", []))
    assert (err.code, count(metrics, "f", http), fn.invocations) == (code, 1, 1)
    assert seconds(metrics, "mqtt") == (0 if early else 2)
    assert (fn.in_flight, replica.in_flight, invoker.streams) == (0, 0, 0)


def test_a_stream_whose_caller_goes_away_is_cancelled_not_counted_as_unavailable() -> None:
    """The caller's cancellation (a client that hung up) must go through as a cancellation: neither
    an UNAVAILABLE answer nor a 503 in the metrics; the upstream call is cancelled, the slots freed."""

    async def scenario(invoker: Invoker, replica: TimedReplica) -> None:
        replica.hold = asyncio.Event()
        task = asyncio.create_task(_stream(invoker, "grpc", []))
        await asyncio.wait_for(replica.answered.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    invoker, fn, replica, metrics = timed(Clock(), 0)
    asyncio.run(scenario(invoker, replica))
    assert count(metrics, "f", 503) == 0 and count(metrics, "f", 200) == 1
    assert replica.stream_cancelled and (fn.in_flight, replica.in_flight, invoker.streams) == (0, 0, 0)


def test_an_answer_without_a_frame_of_its_own_is_passed_on_and_counted(clock: Clock) -> None:
    """A replica out of step (two answers to one frame) must not crash the stream looking for a
    frame to time the extra answer from: it is timed as taking no time."""
    invoker, fn, replica, metrics = timed(clock, 2)
    plain = replica.stream

    def twice(requests: AsyncIterator[wpb.Request]):  # type: ignore[no-untyped-def]
        class Call:
            def __aiter__(self):  # type: ignore[no-untyped-def]
                return self.gen()

            async def gen(self):  # type: ignore[no-untyped-def]
                async for reply in plain(requests):
                    yield reply
                    yield wpb.Reply(Output=b"again")

            def cancel(self) -> None:
                replica.stream_cancelled = True

        return Call()

    replica.stream = twice  # type: ignore[method-assign]
    assert asyncio.run(_stream(invoker, "mqtt", [])) == [b"s:a", b"again"]
    assert (fn.invocations, seconds(metrics, "mqtt", "count"), seconds(metrics, "mqtt")) == (2, 2, 2)
