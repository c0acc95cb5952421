"""The bridge's delivery rules without a broker or a gateway: a Bridge on a real event loop whose
MQTT client and gateway are stand-ins that record what it does, and whose retry waits are recorded
instead of slept. The same rules end to end are in tests/test_bridge.py and
tests/test_bridge_reliability.py."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any

import grpc
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from openfx.bridge import bridge as bridge_module
from openfx.bridge.bridge import Bridge
from openfx.bridge.config import BridgeConfig, Route
from openfx.errors import http_status

Outcome = tuple[grpc.StatusCode, bytes]


def ok(output: bytes) -> Outcome:
    return grpc.StatusCode.OK, output


def refused(code: grpc.StatusCode, details: str) -> Outcome:
    return code, f"{code.name}: {details}".encode()


class Gateway:
    """Answers each invoke with the next scripted outcome, recording each call."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, bytes, str]] = []

    async def invoke(self, function: str, payload: bytes, topic: str) -> Outcome:
        self.calls.append((function, payload, topic))
        return self.outcomes.pop(0)

    async def close(self) -> None:
        pass


class Client:
    """Publishes get mids 100, 101, ...; PUBACKs are delivered by the test."""

    def __init__(self, rc: int = mqtt.MQTT_ERR_SUCCESS) -> None:
        self.published: list[tuple[str, bytes, object]] = []
        self.acked: list[tuple[int, int]] = []
        self.rc = rc

    def publish(self, topic, payload, qos, properties):  # type: ignore[no-untyped-def]
        assert qos == 1  # replies and dead letters are acknowledged publishes (at least once)
        if "+" in topic or "#" in topic or len(topic.encode()) > 65535:  # as paho 2.2 refuses them
            raise ValueError("Publish topic cannot contain wildcards." if "+" in topic else "too long")
        self.published.append((topic, payload, properties))
        return SimpleNamespace(rc=self.rc, mid=99 + len(self.published))

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append((mid, qos))

    def disconnect(self) -> None:
        pass


class Harness:
    """A bridge with stand-ins, on the loop of the test; `delays` are the retry waits it asked for
    (the clock moves by each, so the retry budget is spent as if it had waited)."""

    def __init__(self, gateway: Gateway, delays: list[float], **config: object) -> None:
        self.bridge = b = Bridge(BridgeConfig(**{"metrics_address": None, **config}))  # type: ignore[arg-type]
        b.mqtt._misc.cancel()  # no keepalive ticks for a client that is a stand-in
        asyncio.get_running_loop().create_task(b.gateway.close())
        b.client = b.mqtt.client = self.client = Client()  # type: ignore[assignment]
        b.gateway = self.gateway = gateway  # type: ignore[assignment]
        b.generation = 1
        self.delays = delays

        async def backoff(delay: float) -> None:
            delays.append(delay)

        b._backoff = backoff  # type: ignore[method-assign]

    async def receive(self, msg: SimpleNamespace) -> None:
        """Deliver a message and let everything it started run to the end."""
        self.bridge._on_message(self.client, None, msg)  # type: ignore[arg-type]
        await settle(self.bridge)


async def settle(b: Bridge) -> None:
    while b._tasks:
        await asyncio.gather(*list(b._tasks))


def run(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """An async test body run on a fresh loop (the bridge needs a running loop)."""

    @functools.wraps(test)  # keeps the signature: pytest still hands it fixtures
    def sync(*args: object, **kwargs: object) -> None:
        asyncio.run(test(*args, **kwargs))

    return sync


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The retry waits a Harness records; the bridge's clock moves by each one."""
    import time

    real_monotonic = time.monotonic
    waited: list[float] = []
    monkeypatch.setattr(bridge_module.time, "monotonic", lambda: real_monotonic() + sum(waited))
    return waited


def message(
    topic: str, payload: bytes = b"x", mid: int = 7, qos: int = 1, **props: object
) -> SimpleNamespace:
    return SimpleNamespace(
        topic=topic, payload=payload, mid=mid, qos=qos, properties=SimpleNamespace(**props) if props else None
    )


def wire(props: object) -> Properties:
    """The properties as a device reads them: what the bridge's object packs, parsed by paho."""
    parsed = Properties(PacketTypes.PUBLISH)
    parsed.unpack(props.pack())  # type: ignore[attr-defined]
    return parsed


def users(props: object) -> dict[str, str]:
    return dict(wire(props).UserProperty)


def sample(b: Bridge, name: str, **labels: str) -> float:
    return b.metrics.registry.get_sample_value(name, labels or None) or 0.0


def puback_all(b: Bridge, client: Client) -> None:
    for mid in range(100, 100 + len(client.published)):
        b._on_publish(client, None, mid, None, None)  # type: ignore[arg-type]


@run
async def test_ok_reply_then_ack_after_the_reply_is_acknowledged() -> None:
    h = Harness(Gateway(ok(b"out")), [])
    b, client = h.bridge, h.client
    await h.receive(message("fn/echo", b"in", ResponseTopic="r/1", CorrelationData=b"c"))
    assert h.gateway.calls == [("echo", b"in", "fn/echo")]  # the topic goes with the call
    [(topic, payload, props)] = client.published
    got = (topic, payload, wire(props).CorrelationData, users(props))
    assert got == ("r/1", b"out", b"c", {"status": "OK"})
    assert client.acked == [] and sample(b, "bridge_inflight") == 1  # not before the reply's PUBACK
    b._on_publish(client, None, 100, None, None)  # type: ignore[arg-type]
    assert client.acked == [(7, 1)] and sample(b, "bridge_inflight") == 0
    assert sample(b, "bridge_messages_received_total") == 1
    assert sample(b, "bridge_invocations_total", code="OK") == 1
    assert sample(b, "bridge_replies_total") == 1 and sample(b, "bridge_dead_letters_total") == 0
    assert sample(b, "trigger_invocations_total", trigger="mqtt", function_name="echo", code="200") == 1


@run
async def test_inflight_counts_every_unfinished_request() -> None:
    h = Harness(Gateway(ok(b"1"), ok(b"2"), ok(b"3")), [])
    for mid in (1, 2, 3):
        await h.receive(message("fn/echo", mid=mid))
    assert sample(h.bridge, "bridge_inflight") == 3
    h.bridge._on_publish(h.client, None, 101, None, None)  # type: ignore[arg-type]
    assert sample(h.bridge, "bridge_inflight") == 2 and h.client.acked == [(2, 1)]
    assert not h.bridge._idle.is_set()
    puback_all(h.bridge, h.client)
    assert h.bridge._idle.is_set()


@run
async def test_default_reply_topic_and_a_stale_puback() -> None:
    h = Harness(Gateway(ok(b"out")), [])
    h.bridge._on_publish(h.client, None, 555, None, None)  # type: ignore[arg-type]  # not ours: ignored
    await h.receive(message("fn/echo"))
    assert h.client.published[0][0] == "fn/echo/reply"
    assert not hasattr(wire(h.client.published[0][2]), "CorrelationData")
    puback_all(h.bridge, h.client)
    assert h.client.acked == [(7, 1)]


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL]
)
def test_refusals_are_answered_and_dead_lettered_at_once(delays: list[float], code: grpc.StatusCode) -> None:
    async def body() -> None:
        h = Harness(Gateway(refused(code, "no good")), delays)
        b, client = h.bridge, h.client
        await h.receive(message("fn/x", b"payload", CorrelationData=b"c9"))
        assert delays == [] and len(h.gateway.calls) == 1
        (reply_topic, reply, reply_props), (dead_topic, dead, dead_props) = client.published
        assert (reply_topic, reply, users(reply_props)) == (
            "fn/x/reply",
            f"{code.name}: no good".encode(),
            {"status": code.name},
        )
        assert (dead_topic, dead, wire(dead_props).CorrelationData) == ("dlq/fn/x", b"payload", b"c9")
        assert users(dead_props) == {"status": code.name, "function": "x", "error": f"{code.name}: no good"}
        labels = {"trigger": "mqtt", "function_name": "x", "code": str(http_status(code))}
        assert sample(b, "trigger_invocations_total", **labels) == 1
        b._on_publish(client, None, 100, None, None)  # type: ignore[arg-type]
        assert client.acked == []  # the dead letter is not acknowledged yet
        b._on_publish(client, None, 101, None, None)  # type: ignore[arg-type]
        assert client.acked == [(7, 1)]
        assert sample(b, "bridge_dead_letters_total") == 1 and sample(b, "bridge_retries_total") == 0

    asyncio.run(body())


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED],
)
def test_retryable_codes_are_retried_with_capped_backoff(delays: list[float], code: grpc.StatusCode) -> None:
    async def body() -> None:
        gateway = Gateway(*[refused(code, "busy")] * 6, ok(b"finally"))
        h = Harness(gateway, delays, retry={"budget_seconds": 30, "first_delay": 0.1, "max_delay": 0.5})
        await h.receive(message("fn/x"))
        assert delays == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
        assert [c[1] for c in gateway.calls] == [b"x"] * 7
        [(topic, payload, props)] = h.client.published
        assert (payload, users(props)) == (b"finally", {"status": "OK"})
        assert sample(h.bridge, "bridge_retries_total") == 6
        assert sample(h.bridge, "bridge_invocations_total", code=code.name) == 6
        assert sample(h.bridge, "bridge_dead_letters_total") == 0

    asyncio.run(body())


def test_the_retry_budget_running_out_ends_in_a_dead_letter(delays: list[float]) -> None:
    async def body() -> None:
        gateway = Gateway(*[refused(grpc.StatusCode.UNAVAILABLE, "down")] * 20)
        h = Harness(gateway, delays, retry={"budget_seconds": 1.0, "first_delay": 0.1, "max_delay": 0.3})
        await h.receive(message("fn/x", b"p"))
        # 0.1 + 0.2 + 0.3 = 0.6; one more 0.3 would reach 0.9 < 1.0; the next would pass the budget
        assert delays == [0.1, 0.2, 0.3, 0.3]
        assert len(gateway.calls) == 5
        (reply_topic, reply, reply_props), (dead_topic, dead, _) = h.client.published
        assert reply == b"UNAVAILABLE: down" and users(reply_props) == {"status": "UNAVAILABLE"}
        assert (dead_topic, dead) == ("dlq/fn/x", b"p")
        assert sample(h.bridge, "bridge_dead_letters_total") == 1
        assert sample(h.bridge, "bridge_retries_total") == 4

    asyncio.run(body())


def test_a_retry_exactly_at_the_budget_is_not_made(delays: list[float]) -> None:
    async def body() -> None:
        down = refused(grpc.StatusCode.UNAVAILABLE, "down")
        gateway = Gateway(down, down, ok(b"ok"))
        h = Harness(gateway, delays, retry={"budget_seconds": 0.5, "first_delay": 0.5, "max_delay": 1})
        await h.receive(message("fn/x"))
        assert delays == [] and len(gateway.calls) == 1  # now + 0.5 - started == budget: give up
        assert users(h.client.published[0][2]) == {"status": "UNAVAILABLE"}

    asyncio.run(body())


@run
async def test_no_route_or_a_bad_name_is_not_found_without_a_call() -> None:
    routes = [Route(filter="fn/+", function="{1}"), Route(filter="x/#", function="{5}")]
    h = Harness(Gateway(), [], routes=routes)
    await h.receive(message("x/a"))  # {5} of a 2-level topic: empty name
    await h.receive(message("fn/Bad_Name", mid=8))
    assert h.gateway.calls == []
    replies = [(t, p) for t, p, _ in h.client.published if not t.startswith("dlq/")]
    assert replies == [
        ("x/a/reply", b"NOT_FOUND: no function for topic 'x/a'"),
        ("fn/Bad_Name/reply", b"NOT_FOUND: no function for topic 'fn/Bad_Name'"),
    ]


@run
async def test_own_replies_and_dead_letters_are_never_requests() -> None:
    h = Harness(Gateway(), [], routes=[Route(filter="#", function="echo")])
    await h.receive(message("fn/echo/reply", mid=3))
    await h.receive(message("dlq/fn/echo", mid=4))
    assert h.gateway.calls == [] and h.client.published == []
    assert h.client.acked == [(3, 1), (4, 1)] and sample(h.bridge, "bridge_messages_received_total") == 0


@run
async def test_on_receipt_acks_first_and_qos0_is_never_acked() -> None:
    h = Harness(Gateway(ok(b"a"), ok(b"b")), [], ack="on-receipt")
    h.bridge._on_message(h.client, None, message("fn/echo"))  # type: ignore[arg-type]
    assert h.client.acked == [(7, 1)]  # before the gateway was even called
    await settle(h.bridge)
    puback_all(h.bridge, h.client)
    assert h.client.acked == [(7, 1)]  # and not again
    h2 = Harness(Gateway(ok(b"a")), [])
    await h2.receive(message("fn/echo", qos=0))
    puback_all(h2.bridge, h2.client)
    assert h2.client.acked == []


@run
async def test_acks_never_cross_a_reconnect() -> None:
    h = Harness(Gateway(ok(b"out")), [])
    await h.receive(message("fn/echo"))
    h.bridge._on_connect(SimpleNamespace(subscribe=lambda subs: None), None, None, None, None)  # type: ignore[arg-type]
    assert h.bridge.generation == 2 and h.bridge.mqtt.connected.is_set()
    puback_all(h.bridge, h.client)
    assert h.client.acked == []  # mid 7 of the old connection is another message on the new one
    assert sample(h.bridge, "bridge_inflight") == 0


@run
async def test_connect_subscribes_every_route_and_a_refusal_does_not() -> None:
    h = Harness(Gateway(), [], routes=[Route(filter="fn/+"), Route(filter="a/#", function="echo")])
    b = h.bridge
    subscribed: list[object] = []
    client = SimpleNamespace(subscribe=subscribed.append)
    b._on_connect(client, None, None, SimpleNamespace(is_failure=True), None)  # type: ignore[arg-type]
    assert subscribed == [] and b.generation == 1 and not b.mqtt.connected.is_set()
    b._on_connect(client, None, None, SimpleNamespace(is_failure=False), None)  # type: ignore[arg-type]
    [[(f1, o1), (f2, _)]] = subscribed
    assert (f1, f2, o1.QoS, o1.noLocal) == ("fn/+", "a/#", 1, True)
    assert b.mqtt.connected.is_set() and not b.mqtt._lost.is_set()
    b._on_disconnect(client, None, None, None, None)  # type: ignore[arg-type]
    assert not b.mqtt.connected.is_set() and b.mqtt._lost.is_set()  # the supervisor reconnects


@run
async def test_ready_file_is_written_once_subscribed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ready = tmp_path / "ready"
    h = Harness(Gateway(), [], ready_file=str(ready))
    h.bridge._on_subscribe(None, None, 1, [SimpleNamespace(is_failure=True)], None)  # type: ignore[arg-type]
    assert not ready.exists()
    h.bridge._on_subscribe(None, None, 1, [SimpleNamespace(is_failure=False)], None)  # type: ignore[arg-type]
    assert ready.exists()


@run
async def test_stop_waits_for_in_flight_work_within_its_grace() -> None:
    h = Harness(Gateway(ok(b"x")), [])
    await h.receive(message("fn/echo"))
    stopping = asyncio.create_task(h.bridge.stop(grace=30))
    await asyncio.sleep(0)  # one loop turn: the stop task runs up to its wait for idleness
    assert h.bridge.stopping  # it has started
    # and it waits for an idleness the bridge has not reached: the reply is not acknowledged yet
    assert not h.bridge._idle.is_set() and not stopping.done()
    puback_all(h.bridge, h.client)
    await asyncio.wait_for(stopping, 10)
    assert h.client.acked == [(7, 1)]


@run
async def test_stop_gives_up_after_its_grace_and_leaves_the_message_unacked() -> None:
    never = asyncio.Event()

    class Stuck(Gateway):
        async def invoke(self, function: str, payload: bytes, topic: str) -> Outcome:
            await never.wait()
            raise AssertionError("unreachable")

    h = Harness(Stuck(), [])
    h.bridge._on_message(h.client, None, message("fn/echo"))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    await asyncio.wait_for(h.bridge.stop(grace=0.05), 10)
    await asyncio.sleep(0)
    assert h.client.acked == [] and h.client.published == []  # the broker redelivers it
    assert all(t.cancelled() or t.done() for t in h.bridge._tasks)


@run
async def test_an_unexpected_error_in_the_call_is_answered_and_dead_lettered() -> None:
    class Broken(Gateway):
        async def invoke(self, function: str, payload: bytes, topic: str) -> Outcome:
            raise ValueError("a bug")

    h = Harness(Broken(), [])
    await h.receive(message("fn/x", b"p"))
    (_, reply, props), (dead_topic, _, _) = h.client.published
    assert reply == b"INTERNAL: bridge: ValueError('a bug')" and users(props) == {"status": "INTERNAL"}
    assert dead_topic == "dlq/fn/x"
    puback_all(h.bridge, h.client)
    assert h.client.acked == [(7, 1)] and sample(h.bridge, "bridge_inflight") == 0


@run
async def test_a_response_topic_no_publish_may_carry_gets_the_default_reply_topic() -> None:
    h = Harness(Gateway(ok(b"out"), ok(b"out")), [])
    await h.receive(message("fn/echo", ResponseTopic="replies/+/x", mid=1))
    await h.receive(message("fn/echo", ResponseTopic="r/" + "x" * 70000, mid=2))
    assert [t for t, _, _ in h.client.published] == ["fn/echo/reply", "fn/echo/reply"]
    puback_all(h.bridge, h.client)
    assert h.client.acked == [(1, 1), (2, 1)]


@run
async def test_an_answer_that_cannot_be_published_is_settled_not_left_pending() -> None:
    """A request topic so long that `<topic>/reply` and `dlq/<topic>` pass MQTT's limit: nothing can
    be published, and the request must still be acknowledged (else it holds a Receive Maximum slot
    for ever, and comes back after every reconnect)."""
    h = Harness(Gateway(), [])
    topic = "fn/" + "x" * 65530  # fits, but not with "/reply" or "dlq/" added
    await h.receive(message(topic, mid=5))  # NOT_FOUND: no such function; reply and dead letter fail
    assert h.client.published == [] and h.client.acked == [(5, 1)]
    assert sample(h.bridge, "bridge_inflight") == 0


@run
async def test_a_publish_paho_refuses_is_settled_and_its_mid_never_registered() -> None:
    h = Harness(Gateway(ok(b"out")), [])
    h.client.rc = mqtt.MQTT_ERR_QUEUE_SIZE
    await h.receive(message("fn/echo", mid=6))
    assert h.client.acked == [(6, 1)] and h.bridge._publishes == {}


@run
async def test_a_refused_puback_still_settles_the_request() -> None:
    h = Harness(Gateway(ok(b"out")), [])
    await h.receive(message("fn/echo", mid=4))
    h.bridge._on_publish(h.client, None, 100, SimpleNamespace(is_failure=True), None)  # type: ignore[arg-type]
    assert h.client.acked == [(4, 1)]


@run
async def test_a_stopping_bridge_takes_no_new_request() -> None:
    h = Harness(Gateway(ok(b"out")), [])
    h.bridge.stopping = True
    await h.receive(message("fn/echo", mid=9))
    assert h.gateway.calls == [] and h.client.acked == [] and h.client.published == []


@run
async def test_a_long_error_is_cut_to_512_characters_in_the_dead_letter() -> None:
    h = Harness(Gateway(refused(grpc.StatusCode.INVALID_ARGUMENT, "é" * 600)), [])
    await h.receive(message("fn/x"))
    error = users(h.client.published[1][2])["error"]
    assert error == ("INVALID_ARGUMENT: " + "é" * 600)[:512]
    assert h.client.published[0][1].endswith("é".encode() * 600)


@run
async def test_the_mqtt_client_is_set_up_for_manual_acks_and_bounded_work() -> None:
    b = Bridge(
        BridgeConfig(metrics_address=None, client_id="bridge-7", max_inflight=8, username="u", password="p")
    )
    c = b.client
    assert (c._client_id, c._manual_ack, c._protocol) == (b"bridge-7", True, mqtt.MQTTv5)
    assert (c._username, c._password) == (b"u", b"p")
    assert c._max_inflight_messages == 20 and c._max_queued_messages == 0  # at least 20 outgoing; no queue
    wide = Bridge(BridgeConfig(metrics_address=None, max_inflight=100))
    assert wide.client._max_inflight_messages == 100 and wide.client._username is None
    await b.gateway.close()
    await wide.gateway.close()


@run
async def test_start_asks_the_broker_for_a_persistent_session_and_receive_maximum() -> None:
    h = Harness(Gateway(), [], host="broker.local", port=1884, max_inflight=9, session_expiry=77)
    calls: list[tuple[tuple, dict]] = []
    h.bridge.client = SimpleNamespace(connect_async=lambda *a, **k: calls.append((a, k)))  # type: ignore[assignment]
    started: list[bool] = []
    h.bridge.mqtt.start = lambda: started.append(True)  # type: ignore[method-assign]
    await h.bridge.start()
    [(args, kwargs)] = calls
    props = kwargs["properties"]
    assert args == ("broker.local", 1884) and kwargs["clean_start"] is False and kwargs["keepalive"] == 30
    assert (props.ReceiveMaximum, props.SessionExpiryInterval) == (9, 77) and started == [True]


@run
async def test_a_new_bridge_is_wired_and_documents_its_metrics() -> None:
    from prometheus_client import generate_latest

    from openfx.bridge.gateway_client import GrpcGateway, HttpGateway

    b = Bridge(BridgeConfig(metrics_address=None))
    assert isinstance(b.gateway, HttpGateway) and (b.generation, b.stopping) == (0, False)
    c = b.client
    assert (c.on_connect, c.on_message, c.on_publish, c.on_subscribe, c.on_disconnect) == (
        b._on_connect,
        b._on_message,
        b._on_publish,
        b._on_subscribe,
        b._on_disconnect,
    )
    assert c.on_socket_open == b.mqtt._on_socket_open  # the loop watches the socket, not a thread
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
    await b.gateway.close()
    g = Bridge(BridgeConfig(metrics_address=None, transport="grpc"))
    assert isinstance(g.gateway, GrpcGateway)
    await g.gateway.close()


@run
async def test_start_serves_metrics_on_the_configured_address() -> None:
    import requests

    from tests.conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    h = Harness(Gateway(), [], metrics_address=address)
    h.bridge.client = SimpleNamespace(connect_async=lambda *a, **k: None)  # type: ignore[assignment]
    h.bridge.mqtt.start = lambda: None  # type: ignore[method-assign]
    await h.bridge.start()
    h.bridge.metrics.received.inc(3)
    text = await asyncio.to_thread(lambda: requests.get(f"http://{address}/metrics", timeout=10).text)
    assert "bridge_messages_received_total 3.0" in text and "bridge_inflight 0.0" in text


@pytest.mark.parametrize("status", ["OK", "NOT_FOUND", "DEADLINE_EXCEEDED"])
@pytest.mark.parametrize("correlation", [None, b"", b"c9", bytes(range(256)) * 200])
def test_reply_properties_pack_to_the_bytes_paho_would_send(status: str, correlation: bytes | None) -> None:
    from openfx.bridge.bridge import ReplyProperties

    ReplyProperties._STATUS.clear()  # packed afresh, not from a cache an earlier test filled
    reference = Properties(PacketTypes.PUBLISH)
    reference.UserProperty = [("status", status)]
    if correlation is not None:
        reference.CorrelationData = correlation
    assert ReplyProperties(status, correlation).pack() == reference.pack()


class Dialer:
    """The paho client for the supervisor: each attempt to open a socket fails with the next
    scripted error (or succeeds on None), recording when it was made."""

    def __init__(self, *outcomes: Exception | None) -> None:
        self.outcomes = list(outcomes)
        self.at: list[float] = []
        self.sockets: list[object] = []
        self.host, self.port = "broker.test", 1883

    def open_socket(self) -> object:
        import time

        self.at.append(time.monotonic())
        outcome = self.outcomes.pop(0) if self.outcomes else ConnectionRefusedError("refused")
        if outcome is not None:
            raise outcome
        return SimpleNamespace(close=lambda: None)

    def reconnect_on(self, sock: object) -> None:
        self.sockets.append(sock)

    def disconnect(self) -> None:
        pass

    def loop_misc(self) -> None:
        pass


def supervised(dialer: Dialer) -> tuple[Any, list[str]]:
    from openfx.bridge import mqtt_loop

    said: list[str] = []
    m = mqtt_loop.AsyncioMqtt.__new__(mqtt_loop.AsyncioMqtt)
    m.client, m.loop, m.stopping = dialer, asyncio.get_running_loop(), False  # type: ignore[assignment]
    m.connected, m._lost, m._since, m._said, m._supervisor = (
        asyncio.Event(),
        asyncio.Event(),
        None,
        set(),
        None,
    )
    m._misc = asyncio.get_running_loop().create_task(asyncio.sleep(0))
    return m, said


@run
async def test_kept_out_the_bridge_backs_off_and_names_each_cause_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from openfx.bridge import mqtt_loop

    monkeypatch.setattr(mqtt_loop, "BACKOFF", (0.01, 0.04))
    dialer = Dialer(*[ConnectionRefusedError("refused")] * 3, OSError("unreachable"), None)
    m, said = supervised(dialer)
    with monkeypatch.context() as patched:
        patched.setattr(mqtt_loop.log, "warning", lambda fmt, *a: said.append(fmt % a))
        m.start()
        while len(dialer.at) < 5:
            await asyncio.sleep(0.005)
        for _ in range(3):  # the broker lets us in, then refuses the login twice the same way
            m.problem("the broker refused the connection: Not authorized")
        m.accepted()
        m.problem("the broker refused the connection: Not authorized")  # a new outage: said again
        await m.close()
    gaps = [b - a for a, b in zip(dialer.at, dialer.at[1:], strict=False)]
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02 and gaps[2] >= 0.04 and gaps[3] >= 0.04  # capped
    assert said == [
        "cannot reach the broker at broker.test:1883: refused; retrying",
        "cannot reach the broker at broker.test:1883: unreachable; retrying",
        "the broker refused the connection: Not authorized; retrying",
        "the broker refused the connection: Not authorized; retrying",
    ]


@run
async def test_a_refused_login_is_retried_with_backoff_not_at_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The TCP connect works, then the broker refuses (CONNACK) and closes: `lost()` without ever
    `accepted()` must not reset the backoff."""
    from openfx.bridge import mqtt_loop

    monkeypatch.setattr(mqtt_loop, "BACKOFF", (0.02, 0.08))
    dialer = Dialer(*[None] * 10)
    m, _ = supervised(dialer)
    m.start()
    while len(dialer.at) < 4:
        await asyncio.sleep(0.005)
        if len(dialer.at) > len(getattr(m, "seen", [])):
            m.seen = list(dialer.at)  # type: ignore[attr-defined]
            assert m.lost() is False  # refused: it was never a connection
    await m.close()
    gaps = [b - a for a, b in zip(dialer.at, dialer.at[1:], strict=False)]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.08


@run
async def test_a_long_lived_connection_that_ends_reconnects_at_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from openfx.bridge import mqtt_loop

    monkeypatch.setattr(mqtt_loop, "BACKOFF", (5.0, 5.0))  # any wait would show
    monkeypatch.setattr(mqtt_loop, "STABLE", 0.0)
    dialer = Dialer(None, None)
    m, _ = supervised(dialer)
    m.start()
    while not dialer.at:
        await asyncio.sleep(0.005)
    m.accepted()
    await asyncio.sleep(0.01)
    assert m.lost() is True
    await asyncio.wait_for(_until(lambda: len(dialer.at) == 2), 2)
    await m.close()


async def _until(done: Callable[[], bool]) -> None:
    while not done():
        await asyncio.sleep(0.005)


def test_publishable_topics_follow_mqtt_5() -> None:
    from openfx.bridge.bridge import publishable

    assert publishable("replies/device-1") and publishable("r/" + "é" * 32766)  # 65,534 bytes
    assert publishable("x" * 65535) and not publishable("x" * 65536)
    for bad in (None, "", "replies/+", "replies/#", "a/+/b", "nul\x00"):
        assert not publishable(bad), repr(bad)


@run
async def test_a_dead_letter_names_the_function_and_keeps_an_undecodable_error_readable() -> None:
    h = Harness(Gateway((grpc.StatusCode.INTERNAL, b"INTERNAL: \xff\xfe broke")), [])
    await h.receive(message("fn/x"))
    await h.receive(message("nowhere/at/all", mid=8))  # no route: no function to name
    dead = [wire(props) for topic, _, props in h.client.published if topic.startswith("dlq/")]
    assert dict(dead[0].UserProperty)["function"] == "x"
    assert dict(dead[0].UserProperty)["error"] == "INTERNAL: \ufffd\ufffd broke"
    assert dict(dead[1].UserProperty)["function"] == ""
