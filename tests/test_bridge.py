"""The MQTT bridge on a real mosquitto, against a real gateway and watcher processes."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import RunningGateway, free_port
from tests.mqtt_helpers import Broker, Device, start_bridge, start_broker, status


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_broker(tmp_path_factory.mktemp("mqtt"))
    yield b
    b.stop()


METRICS = f"127.0.0.1:{free_port()}"


def metric(name: str) -> float:
    """A sample of the module bridge's /metrics, e.g. 'bridge_invocations_total{code="OK"}' (0 if absent)."""
    for line in requests.get(f"http://{METRICS}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_metric(name: str, at_least: float, timeout: float = 20) -> float:
    deadline = time.monotonic() + timeout
    while (value := metric(name)) < at_least:
        assert time.monotonic() < deadline, f"{name} stayed at {value} (< {at_least})"
        time.sleep(0.02)
    return value


@pytest.fixture(scope="module")
def bridge(
    broker: Broker, gateway: RunningGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("bridge") / "bridge.log"
    proc = start_bridge(
        broker.port,
        (gateway.grpc_address, gateway.http_url),
        log,
        "--route",
        "sensors/+/battery=binary",
        "--route",
        "fn/+={1}",
        "--route",
        "lab/#=info",
        "--metrics",
        METRICS,  # start_bridge returns once the bridge has subscribed
    )
    yield log
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


def test_reply_to_response_topic_with_correlation(broker: Broker, bridge: Path) -> None:
    device = Device(broker.port, ["replies/dev1"])
    try:
        device.request("fn/echo", b"hello \xff", response_topic="replies/dev1", correlation=b"req-42")
        reply = device.next()
        assert reply.topic == "replies/dev1" and reply.payload == b"hello \xff"
        assert reply.properties.CorrelationData == b"req-42" and status(reply) == "OK"
    finally:
        device.close()


def test_default_reply_topic_and_trigger_info(broker: Broker, bridge: Path) -> None:
    device = Device(broker.port, ["fn/info/reply", "lab/#"])
    try:
        device.request("fn/info", b"")
        reply = device.next()
        assert reply.topic == "fn/info/reply" and reply.payload == b"info|mqtt|fn/info|True"
        device.request("lab/room1/temp", b"")  # '#' route; its reply must not loop back as a request
        replies = [device.next() for _ in range(2)]
        own = [m for m in replies if m.topic == "lab/room1/temp/reply"]
        assert own and own[0].payload == b"info|mqtt|lab/room1/temp|True"
        # a looping reply would reach the bridge before a later request does (one connection, in
        # order): after that request's reply, the bridge has received exactly the requests sent
        received = metric("bridge_messages_received_total")
        device.request("lab/sentinel", b"")
        assert {device.next().topic, device.next().topic} == {"lab/sentinel", "lab/sentinel/reply"}
        assert metric("bridge_messages_received_total") == received + 1
        assert device.messages.empty()
    finally:
        device.close()


def test_any_topic_reaches_the_handler_exactly(broker: Broker, bridge: Path) -> None:
    """MQTT topics are UTF-8; HTTP headers and gRPC metadata are printable ASCII. The topic travels
    percent-encoded and the handler sees the device's own (a literal "%41" stays "%41")."""
    topic = "lab/온도/a b: c/%41"
    device = Device(broker.port, ["replies/odd"])
    try:
        device.request(topic, b"", response_topic="replies/odd")
        assert device.next().payload == f"info|mqtt|{topic}|True".encode()
    finally:
        device.close()


def test_wildcard_route_to_a_named_function(broker: Broker, bridge: Path) -> None:
    device = Device(broker.port, ["sensors/+/battery/reply"])
    try:
        device.request("sensors/17/battery", b"!")
        reply = device.next()
        assert reply.topic == "sensors/17/battery/reply"
        assert reply.payload == bytes(range(256)) + b"!"  # the route's named function, binary-safe
    finally:
        device.close()


@pytest.mark.parametrize(
    ("topic", "payload", "code", "text"),
    [
        ("fn/fail", b"bad", "INVALID_ARGUMENT", b"INVALID_ARGUMENT: input must not be 'bad'"),
        ("fn/nope", b"x", "NOT_FOUND", b"NOT_FOUND: function 'nope' not found"),
        ("fn/fail", b"boom", "INTERNAL", b"INTERNAL: RuntimeError: something broke inside"),
    ],
)
def test_errors_are_answered_and_dead_lettered(
    broker: Broker, bridge: Path, topic: str, payload: bytes, code: str, text: bytes
) -> None:
    device = Device(broker.port, ["replies/err", f"dlq/{topic}"])
    try:
        device.request(topic, payload, response_topic="replies/err", correlation=b"c1")
        got = {m.topic: m for m in (device.next(), device.next())}
        reply, dead = got["replies/err"], got[f"dlq/{topic}"]
        assert status(reply) == code and reply.payload == text and reply.properties.CorrelationData == b"c1"
        assert dead.payload == payload and status(dead) == code
    finally:
        device.close()


def test_workshop_command_line(broker: Broker, gateway: RunningGateway, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "MQTT_PORT": str(broker.port), "OPENFX_URL": gateway.grpc_address}
    ready = tmp_path / "connector.ready"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "broker/gRPC_Broker.py"), "test", "echo", "--ready-file", str(ready)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    device = Device(broker.port, ["test/reply"])
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():  # the connector's bridge writes it once subscribed
            assert proc.poll() is None and time.monotonic() < deadline, "the connector never subscribed"
            time.sleep(0.02)
        device.request("test", "안녕".encode())
        assert device.next().payload == "안녕".encode()
    finally:
        device.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    usage = subprocess.run(
        [sys.executable, str(ROOT / "broker/gRPC_Broker.py")], capture_output=True, text=True
    )
    assert (
        usage.returncode == 2
        and "python gRPC_Broker.py [Connect Topic] [Serverless function]" in usage.stdout
    )


def test_busy_function_is_retried_until_it_answers(broker: Broker, bridge: Path) -> None:
    """sleeper takes 2 calls at once (max_inflight): of 4 requests sent together, the refused ones
    (RESOURCE_EXHAUSTED) are retried with backoff and all 4 are answered OK, none dead-lettered."""
    busy_before = metric('bridge_invocations_total{code="RESOURCE_EXHAUSTED"}')
    retries_before, dead_before = metric("bridge_retries_total"), metric("bridge_dead_letters_total")
    device = Device(broker.port, ["replies/busy"])
    try:
        for i in range(4):
            device.request("fn/sleeper", b"0.5", response_topic="replies/busy", correlation=b"%d" % i)
        replies = [device.next(timeout=30) for _ in range(4)]
    finally:
        device.close()
    assert sorted(r.properties.CorrelationData for r in replies) == [b"0", b"1", b"2", b"3"]
    assert {(r.payload, status(r)) for r in replies} == {(b"slept 0.5", "OK")}
    assert metric('bridge_invocations_total{code="RESOURCE_EXHAUSTED"}') - busy_before >= 2
    assert metric("bridge_retries_total") - retries_before >= 2
    assert metric("bridge_dead_letters_total") == dead_before


def test_metrics_endpoint_counts_what_happened(broker: Broker, bridge: Path) -> None:
    before = {n: metric(n) for n in ("bridge_messages_received_total", "bridge_replies_total")}
    ok_before = metric('bridge_invocations_total{code="OK"}')
    device = Device(broker.port, ["fn/echo/reply"])
    try:
        device.request("fn/echo", b"counted")
        assert device.next().payload == b"counted"
    finally:
        device.close()
    wait_metric("bridge_replies_total", before["bridge_replies_total"] + 1)  # counted at the reply's PUBACK
    assert metric("bridge_messages_received_total") == before["bridge_messages_received_total"] + 1
    assert metric('bridge_invocations_total{code="OK"}') == ok_before + 1
    assert metric("bridge_inflight") == 0
    text = requests.get(f"http://{METRICS}/metrics", timeout=10).text
    assert 'trigger_invocations_total{code="200",function_name="echo",trigger="mqtt"}' in text


def test_retry_budget_running_out_ends_in_a_dead_letter(
    broker: Broker, gateway: RunningGateway, tmp_path: Path
) -> None:
    """badimport is never ready (UNAVAILABLE): with a 1 s budget the bridge retries, then answers
    UNAVAILABLE and dead-letters the request."""
    config = tmp_path / "bridge.yaml"
    config.write_text("retry: {budget_seconds: 1, first_delay: 0.05, max_delay: 0.2}\n")
    metrics = f"127.0.0.1:{free_port()}"
    log = tmp_path / "bridge.log"
    proc = start_bridge(
        broker.port,
        (gateway.grpc_address, gateway.http_url),
        log,
        "-c",
        str(config),
        "--metrics",
        metrics,
        client_id="budget",
    )
    device = Device(broker.port, ["replies/budget", "dlq/fn/badimport"])
    try:
        device.request("fn/badimport", b"payload", response_topic="replies/budget", correlation=b"b1")
        got = {m.topic: m for m in (device.next(timeout=20), device.next(timeout=20))}
        text = requests.get(f"http://{metrics}/metrics", timeout=10).text
    finally:
        device.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    reply, dead = got["replies/budget"], got["dlq/fn/badimport"]
    assert status(reply) == "UNAVAILABLE" and reply.payload.startswith(b"UNAVAILABLE: ")
    assert dead.payload == b"payload" and status(dead) == "UNAVAILABLE"
    assert dead.properties.CorrelationData == b"b1"
    samples = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if ln.startswith("bridge_"))
    # 0.05 + 0.1 + 0.2 + 0.2 + ... within 1 s: at least 4 retries, and then it stopped
    assert float(samples["bridge_retries_total"]) >= 4
    assert (
        float(samples['bridge_invocations_total{code="UNAVAILABLE"}'])
        == float(samples["bridge_retries_total"]) + 1
    )
    assert float(samples["bridge_dead_letters_total"]) == 1
