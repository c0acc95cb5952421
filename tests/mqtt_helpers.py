"""A real mosquitto and a real bridge for tests, plus a small MQTT 5 device client."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from openfx.bridge import mosquitto
from tests.conftest import ROOT, free_port


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"nothing listening on {port}")


@dataclass
class Broker:
    process: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)


def start_broker(tmp: Path, persistence: bool = False) -> Broker:
    """Debian's mosquitto with the project's config (broker/mosquitto.conf) on a free port."""
    port = free_port()
    return Broker(mosquitto.start(tmp / "mosquitto", port, persistence=persistence), port)


def start_bridge(
    broker_port: int,
    gateway: tuple[str, str],
    log: Path,
    *extra: str,
    client_id: str = "test-bridge",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start the bridge (to `gateway`: its gRPC address and HTTP URL) and wait until it has
    subscribed (its log says "ready")."""
    before = log.read_text().count("; ready") if log.exists() else 0
    process = spawn_bridge(broker_port, gateway, log, *extra, client_id=client_id, env=env)
    deadline = time.monotonic() + 20
    while log.read_text().count("; ready") <= before:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    return process


class Device:
    """An MQTT 5 device: publishes requests, collects replies and dead letters."""

    def __init__(self, port: int, subscribe: list[str], client_id: str = "") -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        subscribed = queue.Queue()
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        for topic in subscribe:
            self.client.subscribe(topic, qos=1)
            subscribed.get(timeout=10)

    def request(
        self,
        topic: str,
        payload: bytes,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        qos: int = 1,
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=qos, properties=props).wait_for_publish(10)

    def next(self, timeout: float = 15) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def status(msg: mqtt.MQTTMessage) -> str:
    return dict(getattr(msg.properties, "UserProperty", []) or []).get("status", "")


def start_broker_with(tmp: Path, extra: str, log: Path, persistence: bool = False) -> Broker:
    """The project's broker config plus `extra` lines (later lines override earlier ones; more
    listeners may follow), its log (stderr) written to `log`."""
    port = free_port()
    with open(log, "ab") as out:
        process = mosquitto.start(
            tmp / "mosquitto", port, persistence=persistence, log=out.fileno(), extra=extra
        )
    return Broker(process, port)


def spawn_bridge(
    broker_port: int,
    gateway: tuple[str, str],
    log: Path,
    *extra: str,
    client_id: str = "test-bridge",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start the bridge and return at once (start_bridge waits until it is in; a bridge kept out
    by the broker never is)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openfx.bridge",
                "-c",
                str(ROOT / "broker/bridge.yaml"),
                "--port",
                str(broker_port),
                "--gateway",
                gateway[0],
                "--gateway-http",
                gateway[1],
                "--client-id",
                client_id,
                "--metrics",
                "",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM, bounded wait, then SIGKILL; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode
