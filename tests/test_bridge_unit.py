"""The bridge's delivery rules without a broker or a gateway: a Bridge whose MQTT client, gateway
stub and retry scheduler are stand-ins that record what it does. The same rules end to end are in
tests/test_bridge.py and tests/test_bridge_reliability.py."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import paho.mqtt.client as mqtt
import pytest

from openfx.bridge import bridge as bridge_module
from openfx.bridge.bridge import Bridge, Scheduler
from openfx.bridge.config import BridgeConfig, Route
from openfx.errors import http_status


class Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Future:
    def __init__(self, outcome: bytes | Rpc) -> None:
        self.outcome = outcome

    def result(self) -> SimpleNamespace:
        if isinstance(self.outcome, Rpc):
            raise self.outcome
        return SimpleNamespace(Msg=self.outcome)

    def add_done_callback(self, fn) -> None:  # type: ignore[no-untyped-def]
        fn(self)


class Stub:
    """Answers Invoke with the next scripted outcome, recording each request."""

    def __init__(self, *outcomes: bytes | Rpc) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[object, float, object]] = []
        self.Invoke = SimpleNamespace(future=self._future)

    def _future(self, request, timeout, metadata):  # type: ignore[no-untyped-def]
        self.calls.append((request, timeout, metadata))
        return Future(self.outcomes.pop(0))


class Client:
    """Publishes get mids 100, 101, ...; PUBACKs are delivered by the test (or at once)."""

    def __init__(self, rc: int = mqtt.MQTT_ERR_SUCCESS) -> None:
        self.published: list[tuple[str, bytes, object]] = []
        self.acked: list[tuple[int, int]] = []
        self.rc = rc

    def publish(self, topic, payload, qos, properties):  # type: ignore[no-untyped-def]
        assert qos == 1  # replies and dead letters are acknowledged publishes (at least once)
        self.published.append((topic, payload, properties))
        return SimpleNamespace(rc=self.rc, mid=99 + len(self.published))

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append((mid, qos))


class Later:
    """The retry scheduler: records each delay and runs the callback at once."""

    def __init__(self, clock: list[float]) -> None:
        self.delays: list[float] = []
        self.clock = clock

    def call_later(self, delay: float, fn) -> None:  # type: ignore[no-untyped-def]
        self.delays.append(delay)
        self.clock[0] += delay
        fn()

    def stop(self) -> None:
        pass


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The bridge's clock: real time plus the delays the stand-in scheduler "waited" (a Job stamps
    its start with the real time.monotonic)."""
    import time

    real = time.monotonic
    waited = [0.0]
    monkeypatch.setattr(bridge_module.time, "monotonic", lambda: real() + waited[0])
    return waited


def make(clock: list[float], stub: Stub, **config: object) -> tuple[Bridge, Client, Later]:
    b = Bridge(BridgeConfig(**{"metrics_address": None, **config}))  # type: ignore[arg-type]
    b.scheduler.stop()
    b.scheduler = Later(clock)  # type: ignore[assignment]
    b.client = Client()  # type: ignore[assignment]
    b.stub = stub  # type: ignore[assignment]
    b.generation = 1
    return b, b.client, b.scheduler  # type: ignore[return-value]


def message(
    topic: str, payload: bytes = b"x", mid: int = 7, qos: int = 1, **props: object
) -> SimpleNamespace:
    return SimpleNamespace(
        topic=topic, payload=payload, mid=mid, qos=qos, properties=SimpleNamespace(**props) if props else None
    )


def users(props: object) -> dict[str, str]:
    return dict(props.UserProperty)  # type: ignore[attr-defined]


def sample(b: Bridge, name: str, **labels: str) -> float:
    return b.metrics.registry.get_sample_value(name, labels or None) or 0.0


def puback_all(b: Bridge, client: Client) -> None:
    for mid in range(100, 100 + len(client.published)):
        b._on_publish(client, None, mid, None, None)


def test_ok_reply_then_ack_after_the_reply_is_acknowledged(clock: list[float]) -> None:
    b, client, _ = make(clock, Stub(b"out"))
    b._on_message(client, None, message("fn/echo", b"in", ResponseTopic="r/1", CorrelationData=b"c"))
    request, timeout, metadata = b.stub.calls[0]  # type: ignore[attr-defined]
    assert (request.Service, request.Input, timeout) == ("echo", b"in", 30.0)
    assert dict(metadata) == {"x-openfx-trigger": "mqtt", "x-openfx-topic": "fn/echo"} or (
        ("mqtt" in dict(metadata).values()) and ("fn/echo" in dict(metadata).values())
    )
    [(topic, payload, props)] = client.published
    assert (topic, payload, props.CorrelationData, users(props)) == ("r/1", b"out", b"c", {"status": "OK"})
    assert client.acked == [] and sample(b, "bridge_inflight") == 1  # not before the reply's PUBACK
    b._on_publish(client, None, 100, None, None)
    assert client.acked == [(7, 1)] and sample(b, "bridge_inflight") == 0
    assert sample(b, "bridge_messages_received_total") == 1
    assert sample(b, "bridge_invocations_total", code="OK") == 1
    assert sample(b, "bridge_replies_total") == 1 and sample(b, "bridge_dead_letters_total") == 0
    assert sample(b, "trigger_invocations_total", trigger="mqtt", function_name="echo", code="200") == 1


def test_inflight_counts_every_unfinished_request(clock: list[float]) -> None:
    b, client, _ = make(clock, Stub(b"1", b"2", b"3"))
    for mid in (1, 2, 3):
        b._on_message(client, None, message("fn/echo", mid=mid))
    assert sample(b, "bridge_inflight") == 3
    b._on_publish(client, None, 101, None, None)
    assert sample(b, "bridge_inflight") == 2 and client.acked == [(2, 1)]


def test_default_reply_topic_and_an_early_puback(clock: list[float]) -> None:
    b, client, _ = make(clock, Stub(b"out"))
    b._on_publish(client, None, 100, None, None)  # PUBACK before _finish recorded the mid
    b._on_message(client, None, message("fn/echo"))
    assert client.published[0][0] == "fn/echo/reply"
    assert not hasattr(client.published[0][2], "CorrelationData")
    assert client.acked == [(7, 1)] and b._early_acks == set()


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL]
)
def test_refusals_are_answered_and_dead_lettered_at_once(clock: list[float], code: grpc.StatusCode) -> None:
    b, client, later = make(clock, Stub(Rpc(code, "no good")))
    b._on_message(client, None, message("fn/x", b"payload", CorrelationData=b"c9"))
    assert later.delays == [] and len(b.stub.calls) == 1  # type: ignore[attr-defined]
    (reply_topic, reply, reply_props), (dead_topic, dead, dead_props) = client.published
    assert (reply_topic, reply, users(reply_props)) == (
        "fn/x/reply",
        f"{code.name}: no good".encode(),
        {"status": code.name},
    )
    assert (dead_topic, dead, dead_props.CorrelationData) == ("dlq/fn/x", b"payload", b"c9")
    assert users(dead_props) == {"status": code.name, "function": "x", "error": f"{code.name}: no good"}
    assert (
        sample(b, "trigger_invocations_total", trigger="mqtt", function_name="x", code=str(http_status(code)))
        == 1
    )
    b._on_publish(client, None, 100, None, None)
    assert client.acked == []  # the dead letter is not acknowledged yet
    b._on_publish(client, None, 101, None, None)
    assert client.acked == [(7, 1)]
    assert sample(b, "bridge_dead_letters_total") == 1 and sample(b, "bridge_retries_total") == 0


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED],
)
def test_retryable_codes_are_retried_with_capped_backoff(clock: list[float], code: grpc.StatusCode) -> None:
    stub = Stub(*[Rpc(code, "busy")] * 6, b"finally")
    b, client, later = make(clock, stub, retry={"budget_seconds": 30, "first_delay": 0.1, "max_delay": 0.5})
    b._on_message(client, None, message("fn/x"))
    assert later.delays == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert [c[0].Input for c in stub.calls] == [b"x"] * 7
    [(topic, payload, props)] = client.published
    assert (payload, users(props)) == (b"finally", {"status": "OK"})
    assert (
        sample(b, "bridge_retries_total") == 6 and sample(b, "bridge_invocations_total", code=code.name) == 6
    )
    assert sample(b, "bridge_dead_letters_total") == 0


def test_the_retry_budget_running_out_ends_in_a_dead_letter(clock: list[float]) -> None:
    stub = Stub(*[Rpc(grpc.StatusCode.UNAVAILABLE, "down")] * 20)
    b, client, later = make(clock, stub, retry={"budget_seconds": 1.0, "first_delay": 0.1, "max_delay": 0.3})
    b._on_message(client, None, message("fn/x", b"p"))
    # 0.1 + 0.2 + 0.3 = 0.6; one more 0.3 would reach 0.9 < 1.0; the next would pass the budget
    assert later.delays == [0.1, 0.2, 0.3, 0.3]
    assert len(stub.calls) == 5
    (reply_topic, reply, reply_props), (dead_topic, dead, _) = client.published
    assert reply == b"UNAVAILABLE: down" and users(reply_props) == {"status": "UNAVAILABLE"}
    assert (dead_topic, dead) == ("dlq/fn/x", b"p")
    assert sample(b, "bridge_dead_letters_total") == 1 and sample(b, "bridge_retries_total") == 4


def test_a_retry_exactly_at_the_budget_is_not_made(clock: list[float]) -> None:
    stub = Stub(Rpc(grpc.StatusCode.UNAVAILABLE, "down"), Rpc(grpc.StatusCode.UNAVAILABLE, "down"), b"ok")
    b, client, later = make(clock, stub, retry={"budget_seconds": 0.5, "first_delay": 0.5, "max_delay": 1})
    b._on_message(client, None, message("fn/x"))
    assert later.delays == [] and len(stub.calls) == 1  # now + 0.5 - started == budget: give up
    assert users(client.published[0][2]) == {"status": "UNAVAILABLE"}


def test_no_route_or_a_bad_name_is_not_found_without_a_call(clock: list[float]) -> None:
    b, client, _ = make(
        clock, Stub(), routes=[Route(filter="fn/+", function="{1}"), Route(filter="x/#", function="{5}")]
    )
    b._on_message(client, None, message("x/a"))  # {5} of a 2-level topic: empty name
    b._on_message(client, None, message("fn/Bad_Name", mid=8))
    assert b.stub.calls == []  # type: ignore[attr-defined]
    replies = [(t, p) for t, p, _ in client.published if not t.startswith("dlq/")]
    assert replies == [
        ("x/a/reply", b"NOT_FOUND: no function for topic 'x/a'"),
        ("fn/Bad_Name/reply", b"NOT_FOUND: no function for topic 'fn/Bad_Name'"),
    ]


def test_own_replies_and_dead_letters_are_never_requests(clock: list[float]) -> None:
    b, client, _ = make(clock, Stub(), routes=[Route(filter="#", function="echo")])
    b._on_message(client, None, message("fn/echo/reply", mid=3))
    b._on_message(client, None, message("dlq/fn/echo", mid=4))
    assert b.stub.calls == [] and client.published == []  # type: ignore[attr-defined]
    assert client.acked == [(3, 1), (4, 1)] and sample(b, "bridge_messages_received_total") == 0


def test_on_receipt_acks_first_and_qos0_is_never_acked(clock: list[float]) -> None:
    b, client, _ = make(clock, Stub(b"a", b"b"), ack="on-receipt")
    b._on_message(client, None, message("fn/echo"))
    assert client.acked == [(7, 1)]  # before any reply was acknowledged
    puback_all(b, client)
    assert client.acked == [(7, 1)]  # and not again
    b2, client2, _ = make(clock, Stub(b"a"))
    b2._on_message(client2, None, message("fn/echo", qos=0))
    puback_all(b2, client2)
    assert client2.acked == []


def test_acks_never_cross_a_reconnect(clock: list[float]) -> None:
    b, client, _ = make(clock, Stub(b"out"))
    b._on_message(client, None, message("fn/echo"))
    b._on_connect(SimpleNamespace(subscribe=lambda subs: None), None, None, None, None)  # new connection
    assert b.generation == 2 and b.connected.is_set()
    puback_all(b, client)
    assert client.acked == []  # mid 7 of the old connection is another message on the new one
    assert sample(b, "bridge_inflight") == 0


def test_connect_subscribes_every_route_and_a_refusal_does_not(clock: list[float]) -> None:
    b, _, _ = make(clock, Stub(), routes=[Route(filter="fn/+"), Route(filter="a/#", function="echo")])
    subscribed: list[object] = []
    client = SimpleNamespace(subscribe=subscribed.append)
    b._on_connect(client, None, None, SimpleNamespace(is_failure=True), None)
    assert subscribed == [] and b.generation == 1 and not b.connected.is_set()
    b._on_connect(client, None, None, SimpleNamespace(is_failure=False), None)
    [[(f1, o1), (f2, _)]] = subscribed
    assert (f1, f2, o1.QoS, o1.noLocal) == ("fn/+", "a/#", 1, True)
    b._on_disconnect(client, None, None, None, None)
    assert not b.connected.is_set()


def test_ready_file_is_written_once_subscribed(clock: list[float], tmp_path) -> None:  # type: ignore[no-untyped-def]
    ready = tmp_path / "ready"
    b, _, _ = make(clock, Stub(), ready_file=str(ready))
    b._on_subscribe(None, None, 1, [SimpleNamespace(is_failure=True)], None)
    assert not ready.exists()
    b._on_subscribe(None, None, 1, [SimpleNamespace(is_failure=False)], None)
    assert ready.exists()


def test_stop_waits_for_in_flight_work_within_its_grace(clock: list[float]) -> None:
    b, client, _ = make(clock, Stub(b"x"))
    client.disconnect = lambda: None  # type: ignore[attr-defined]
    client.loop_stop = lambda: None  # type: ignore[attr-defined]
    b._on_message(client, None, message("fn/echo"))
    puback_all(b, client)
    b.stop(grace=0)
    assert b.stopping and client.acked == [(7, 1)]


def test_scheduler_runs_callbacks_in_time_order() -> None:
    import threading

    s = Scheduler()
    done = threading.Event()
    order: list[int] = []
    s.call_later(0.06, lambda: (order.append(2), done.set()))
    s.call_later(0.0, lambda: order.append(1))
    s.call_later(0.03, lambda: 1 / 0)  # a failing callback does not stop the others
    assert done.wait(10)
    s.stop()
    assert order == [1, 2]


def test_a_long_error_is_cut_to_512_characters_in_the_dead_letter(clock: list[float]) -> None:
    b, client, _ = make(clock, Stub(Rpc(grpc.StatusCode.INVALID_ARGUMENT, "é" * 600)))
    b._on_message(client, None, message("fn/x"))
    error = users(client.published[1][2])["error"]
    assert error == ("INVALID_ARGUMENT: " + "é" * 600)[:512] and client.published[0][1].endswith(
        "é".encode() * 600
    )


def test_the_mqtt_client_is_set_up_for_manual_acks_and_bounded_work() -> None:
    b = Bridge(
        BridgeConfig(metrics_address=None, client_id="bridge-7", max_inflight=8, username="u", password="p")
    )
    b.scheduler.stop()
    c = b.client
    assert (c._client_id, c._manual_ack, c._protocol) == (b"bridge-7", True, mqtt.MQTTv5)
    assert (c._username, c._password) == (b"u", b"p")
    assert c._max_inflight_messages == 20 and c._max_queued_messages == 0  # at least 20 outgoing; no queue
    assert (c._reconnect_min_delay, c._reconnect_max_delay) == (0.1, 2)
    wide = Bridge(BridgeConfig(metrics_address=None, max_inflight=100))
    wide.scheduler.stop()
    assert wide.client._max_inflight_messages == 100 and wide.client._username is None


def test_start_asks_the_broker_for_a_persistent_session_and_receive_maximum(clock: list[float]) -> None:
    b, _, _ = make(clock, Stub(), host="broker.local", port=1884, max_inflight=9, session_expiry=77)
    calls: list[tuple[tuple, dict]] = []
    b.client = SimpleNamespace(  # type: ignore[assignment]
        connect_async=lambda *a, **k: calls.append((a, k)), loop_start=lambda: calls.append(((), {}))
    )
    b.start()
    (args, kwargs), loop = calls
    props = kwargs["properties"]
    assert args == ("broker.local", 1884) and kwargs["clean_start"] is False and kwargs["keepalive"] == 30
    assert (props.ReceiveMaximum, props.SessionExpiryInterval) == (9, 77) and loop == ((), {})


def test_a_new_bridge_is_wired_and_documents_its_metrics() -> None:
    from prometheus_client import generate_latest

    from openfx.pb import fxgateway_pb2_grpc as gpb_grpc

    b = Bridge(BridgeConfig(metrics_address=None))
    b.scheduler.stop()
    assert isinstance(b.stub, gpb_grpc.FxGatewayStub) and (b.generation, b.stopping) == (0, False)
    c = b.client
    assert (c.on_connect, c.on_message, c.on_publish, c.on_subscribe, c.on_disconnect) == (
        b._on_connect,
        b._on_message,
        b._on_publish,
        b._on_subscribe,
        b._on_disconnect,
    )
    assert c.on_socket_open == Bridge._on_socket_open
    helps = {
        line.split()[2]: line.split(maxsplit=3)[3]
        for line in generate_latest(b.metrics.registry).decode().splitlines()
        if line.startswith("# HELP ")
    }
    assert {k: v for k, v in helps.items() if k.startswith("bridge_") and not k.endswith("_created")} == {
        "bridge_messages_received_total": "MQTT requests received",
        "bridge_invocations_total": "Gateway calls by status",
        "bridge_replies_total": "Replies published and acknowledged",
        "bridge_retries_total": "Invocations retried",
        "bridge_dead_letters_total": "Requests sent to the dead-letter topic",
        "bridge_inflight": "Requests received and not yet acknowledged",
    }
    b.channel.close()


def test_the_retry_thread_never_keeps_the_process_alive() -> None:
    import threading

    before = set(threading.enumerate())
    s = Scheduler()
    [thread] = set(threading.enumerate()) - before
    assert thread.daemon and thread.name == "bridge-retries"
    s.stop()
    thread.join(5)
    assert not thread.is_alive()


def test_start_serves_metrics_on_the_configured_address(clock: list[float]) -> None:
    import requests

    from tests.conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    b, _, _ = make(clock, Stub(b"x"), metrics_address=address)
    b.client = SimpleNamespace(connect_async=lambda *a, **k: None, loop_start=lambda: None)  # type: ignore[assignment]
    b.start()
    b.metrics.received.inc(3)
    text = requests.get(f"http://{address}/metrics", timeout=10).text
    assert "bridge_messages_received_total 3.0" in text and "bridge_inflight 0.0" in text
