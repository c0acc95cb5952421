"""QoS 0/1/2 floods from devices with large in-flight windows (1,000 unacknowledged publishes,
like bench/mqtt.py's load generator): every publish the broker accepts is answered by the bridge
(a reply, and a dead letter too for a refusal), on a real mosquitto with broker/mosquitto.conf.

What "accepted" means per QoS, and so what each flood asserts:
- QoS 1: the broker's PUBACK reason code is a success; the test asserts every PUBACK is one.
- QoS 2: the PUBREC reason code is a success. paho-mqtt ignores it (a PUBREC 0x97 "quota
  exceeded" still ends in on_publish with success), so the device below records each PUBREC's
  reason itself; the test asserts every one is a success. With the config's earlier
  `max_inflight_messages 64`, mosquitto refused about 40% of such a flood this way, silently to
  the device (README, MQTT).
- QoS 0: nothing is acknowledged. MQTT lets a broker drop QoS 0 messages; mosquitto 2.0 does so
  only when the subscriber's outgoing queue (max_queued_messages, 1,000,000 here) is full, and
  then logs "Outgoing messages are being dropped for client ...". The test reads the broker's
  notices and asserts that it said no such thing, and that every QoS 0 publish was answered.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import RunningGateway
from tests.mqtt_helpers import Broker, Device, start_bridge, start_broker_with, status

COUNT = 2000  # per flood: a few seconds each through the bridge on 2 loaded cores
WINDOW = 1000  # the device's unacknowledged publishes (paho's max_inflight_messages)
DROPPED = "Outgoing messages are being dropped"


@pytest.fixture(scope="module")
def broker_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flood-broker") / "mosquitto.log"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, broker_log: Path) -> Iterator[Broker]:
    # the project's config; notices too, so the test sees whether mosquitto dropped QoS 0 messages
    b = start_broker_with(tmp_path_factory.mktemp("flood"), "log_type notice", broker_log)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def bridge(
    broker: Broker, gateway: RunningGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("flood-bridge") / "bridge.log"
    proc = start_bridge(broker.port, (gateway.grpc_address, gateway.http_url), log, client_id="flood-bridge")
    yield log
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


class FloodDevice(mqtt.Client):
    """An MQTT 5 device allowing WINDOW unacknowledged publishes, which keeps the broker's verdict
    on each: PUBACK reason codes (QoS 1, from on_publish) and PUBREC reason codes (QoS 2, which
    paho reads and drops: recorded here before paho handles the packet)."""

    def __init__(self, port: int, client_id: str) -> None:
        super().__init__(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.max_inflight_messages_set(WINDOW)
        self.verdicts: dict[int, int] = {}  # mid -> the broker's reason code (PUBACK or PUBREC)
        self.lock = threading.Lock()
        self.on_publish = self._published
        connected: queue.Queue[bool] = queue.Queue()
        self.on_connect = lambda c, u, f, reason, p: connected.put(not reason.is_failure)
        self.connect("127.0.0.1", port)
        self.loop_start()
        assert connected.get(timeout=10), "the broker refused the flood device"

    def _published(self, c: mqtt.Client, u: object, mid: int, reason: object, p: object) -> None:
        with self.lock:
            self.verdicts.setdefault(mid, getattr(reason, "value", 0))

    def _handle_pubrec(self) -> mqtt.MQTTErrorCode:
        packet = _packet.decode_pubrec(self._in_packet["command"], self._in_packet["packet"], self._protocol)
        with self.lock:
            self.verdicts[packet.mid] = packet.reason.value  # before on_publish's PUBCOMP verdict
        return super()._handle_pubrec()

    def close(self) -> None:
        self.disconnect()
        self.loop_stop()


def flood(port: int, qos: int, reply_to: str) -> tuple[set[bytes], dict[bytes, int]]:
    """COUNT publishes to fn/echo at `qos`, as fast as the window allows. Returns the correlation
    data of those the broker accepted and the broker's refusals (correlation -> reason code)."""
    device = FloodDevice(port, f"flood-device-q{qos}")
    try:
        sent: list[tuple[bytes, mqtt.MQTTMessageInfo]] = []
        for i in range(COUNT):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_to
            props.CorrelationData = f"q{qos}-{i}".encode()
            payload = f"{i:08d}".encode().ljust(100, b".")
            sent.append(
                (props.CorrelationData, device.publish("fn/echo", payload, qos=qos, properties=props))
            )
        deadline = time.monotonic() + 60
        for _, info in sent:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), f"QoS {qos}: the device's publish {info.mid} never completed"
        with device.lock:
            verdicts = dict(device.verdicts)
    finally:
        device.close()
    accepted, refused = set(), {}
    for correlation, info in sent:
        reason = verdicts.get(info.mid, 0) if qos else 0
        if reason < 0x80:
            accepted.add(correlation)
        else:
            refused[correlation] = reason
    return accepted, refused


def collect(
    collector: Device, expected: set[bytes], timeout: float = 60
) -> tuple[dict[bytes, str], set[bytes]]:
    """Replies (correlation data -> status) and dead letters until every expected request has its
    reply: the bridge replies to every request, a refused one gets a dead letter besides."""
    replied: dict[bytes, str] = {}
    dead: set[bytes] = set()
    deadline = time.monotonic() + timeout
    while not expected <= replied.keys():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            msg = collector.next(timeout=remaining)
        except queue.Empty:
            break
        correlation = msg.properties.CorrelationData
        if msg.topic.startswith("dlq/"):
            dead.add(correlation)
        else:
            replied[correlation] = status(msg)
    return replied, dead


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_flood_from_a_wide_window_is_answered(
    broker: Broker, bridge: Path, broker_log: Path, qos: int
) -> None:
    reply_to = f"flood/q{qos}/replies"
    collector = Device(broker.port, [reply_to, "dlq/fn/echo"], client_id=f"flood-collector-q{qos}")
    try:
        accepted, refused = flood(broker.port, qos, reply_to)
        assert not refused, (
            f"QoS {qos}: the broker refused {len(refused)} of {COUNT} publishes "
            f"(reason codes {sorted(set(refused.values()))}); max_inflight_messages in broker/mosquitto.conf?"
        )
        replied, dead = collect(collector, accepted)
    finally:
        collector.close()
    dropped = [line for line in broker_log.read_text(errors="replace").splitlines() if DROPPED in line]
    assert not dropped, f"mosquitto dropped messages: {dropped}"
    missing = accepted - replied.keys()
    assert not missing, (
        f"QoS {qos}: {len(missing)} of {len(accepted)} accepted publishes got no reply "
        f"({len(replied)} replies, {len(dead)} dead letters), e.g. {sorted(missing)[:5]}"
    )
    # the bridge runs at most 64 calls at once (bridge.yaml max_inflight), under echo's own limit of
    # 100, and retries a busy or restarting echo for 30 s: every call succeeds, nothing is dead-lettered
    statuses = Counter(replied.values())
    assert statuses == {"OK": len(accepted)} and not dead, (f"QoS {qos}", statuses, len(dead))
