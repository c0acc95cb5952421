"""The reliability proof at small scale: steady QoS 1 load, processes killed by PID and restarted.

Every sequence number must get a reply (or a dead-letter entry); duplicates are counted, not
failures (at-least-once). The negative control shows the check can fail: acknowledging on
receipt loses the messages in flight when the bridge dies. bench/mqtt.py runs the longer version.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, READY_FUNCTIONS, MiB, RunningGateway, free_port, start_gateway
from tests.mqtt_helpers import Broker, Device, start_bridge, start_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = start_broker(tmp_path)
    yield b
    b.stop()


def run_load(
    broker: Broker,
    function: str,
    count: int,
    rate: float,
    fault: Callable[[], None],
    at: float,
    settle: float = 40,
) -> tuple[Counter[int], Counter[int]]:
    """Publish `count` requests at `rate`/s, call `fault` after `at` s; collect replies and dead letters."""
    collector = Device(broker.port, ["proof/replies", "dlq/#"], client_id="collector")
    publisher = Device(broker.port, [], client_id="publisher")
    faulted = threading.Timer(at, fault)
    faulted.start()
    try:
        started = time.monotonic()
        for seq in range(count):
            delay = started + seq / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            publisher.request(
                f"fn/{function}",
                str(seq).encode(),
                response_topic="proof/replies",
                correlation=str(seq).encode(),
            )
        faulted.join()
        replies: Counter[int] = Counter()
        dead: Counter[int] = Counter()
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and len(set(replies) | set(dead)) < count:
            try:
                msg = collector.next(timeout=1)
            except Exception:
                continue
            seq = int(msg.properties.CorrelationData)
            (dead if msg.topic.startswith("dlq/") else replies)[seq] += 1
        time.sleep(0.5)  # late duplicates
        while not collector.messages.empty():
            msg = collector.messages.get()
            (dead if msg.topic.startswith("dlq/") else replies)[int(msg.properties.CorrelationData)] += 1
        return replies, dead
    finally:
        publisher.close()
        collector.close()


def restartable_gateway(tmp: Path) -> tuple[Callable[[], RunningGateway], str]:
    addresses = {"grpc_address": f"127.0.0.1:{free_port()}", "http_address": f"127.0.0.1:{free_port()}"}

    def start() -> RunningGateway:
        gw = start_gateway(
            FIXTURES / "stack.yaml", tmp / "gateway.log", "--max-message-bytes", str(8 * MiB), **addresses
        )
        gw.wait_ready(names=READY_FUNCTIONS)
        return gw

    return start, addresses["grpc_address"]


def test_gateway_killed_and_restarted_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    start, address = restartable_gateway(tmp_path)
    gateways = [start()]
    bridge = start_bridge(broker.port, address, tmp_path / "bridge.log")

    def kill_and_restart() -> None:
        gateways[0].process.send_signal(signal.SIGKILL)
        gateways[0].process.wait()
        time.sleep(1.0)
        gateways.append(start())

    try:
        replies, dead = run_load(broker, "echo", 600, 150, kill_and_restart, at=1.5)
    finally:
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(20)
        gateways[-1].stop()
    missing = set(range(600)) - set(replies) - set(dead)
    assert not missing, f"{len(missing)} lost: {sorted(missing)[:20]}"
    assert not dead  # retried through the outage, never given up


@pytest.mark.parametrize("mode", ["after-reply", "on-receipt"])
def test_bridge_killed_and_restarted(broker: Broker, tmp_path: Path, mode: str) -> None:
    """After-reply loses nothing; on-receipt (the negative control) loses what was in flight."""
    start, address = restartable_gateway(tmp_path)
    gateway = start()
    log = tmp_path / "bridge.log"
    extra = ("--ack", mode)
    bridges = [start_bridge(broker.port, address, log, *extra)]
    time.sleep(0.5)

    def kill_and_restart() -> None:
        bridges[0].send_signal(signal.SIGKILL)
        bridges[0].wait()
        time.sleep(1.0)
        bridges.append(start_bridge(broker.port, address, log, *extra))

    try:
        # 16 handler threads x 0.3 s < 100 requests/s: dozens are in the bridge at the kill
        replies, dead = run_load(broker, "slower", 300, 100, kill_and_restart, at=1.5, settle=30)
    finally:
        bridges[-1].send_signal(signal.SIGTERM)
        bridges[-1].wait(20)
        gateway.stop()
    missing = set(range(300)) - set(replies) - set(dead)
    duplicates = sum(n - 1 for n in replies.values() if n > 1)
    if mode == "after-reply":
        assert not missing, f"{len(missing)} lost: {sorted(missing)[:20]}"
        assert duplicates <= 64  # redelivered in-flight messages only (at most Receive Maximum)
    else:
        assert missing, "acking on receipt should lose the requests in flight at the kill"
