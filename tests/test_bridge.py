"""The MQTT bridge on a real mosquitto, against a real gateway and watcher processes."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningGateway
from tests.mqtt_helpers import Broker, Device, start_bridge, start_broker, status


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_broker(tmp_path_factory.mktemp("mqtt"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def bridge(
    broker: Broker, gateway: RunningGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("bridge") / "bridge.log"
    proc = start_bridge(
        broker.port,
        gateway.grpc_address,
        log,
        "--route",
        "sensors/+/battery=binary",
        "--route",
        "fn/+={1}",
        "--route",
        "lab/#=info",
    )
    time.sleep(0.5)
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
        time.sleep(0.5)
        assert device.messages.empty()
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
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "broker/gRPC_Broker.py"), "test", "echo"], env=env, stderr=subprocess.PIPE
    )
    device = Device(broker.port, ["test/reply"])
    try:
        time.sleep(1.0)
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
