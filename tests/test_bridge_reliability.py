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
import requests

from tests.conftest import FIXTURES, READY_FUNCTIONS, MiB, RunningGateway, free_port, start_gateway
from tests.mqtt_helpers import Broker, Device, start_bridge, start_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = start_broker(tmp_path)
    yield b
    b.stop()


def bridge_metric(address: str, name: str) -> float:
    """A sample of a bridge's /metrics (0 when absent or while it is down)."""
    try:
        text = requests.get(f"http://{address}/metrics", timeout=5).text
    except requests.RequestException:
        return 0.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def when(condition: Callable[[], bool], fault: Callable[[], None], timeout: float = 30) -> threading.Thread:
    """Run `fault` once `condition` holds (polled; bounded)."""

    def wait_then_fault() -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return  # the test then fails on its own assertions (the fault never happened)
            time.sleep(0.005)
        fault()

    thread = threading.Thread(target=wait_then_fault)
    thread.start()
    return thread


def run_load(
    broker: Broker,
    function: str,
    count: int,
    rate: float,
    fault: Callable[[], None],
    condition: Callable[[], bool],
    settle: float = 40,
    idle: Callable[[], bool] = lambda: True,
) -> tuple[Counter[int], Counter[int]]:
    """Publish `count` requests at `rate`/s, call `fault` once `condition` holds; collect replies
    and dead letters until every request is answered and the bridge is `idle` (nothing in flight,
    so no late duplicate is still coming)."""
    collector = Device(broker.port, ["proof/replies", "dlq/#"], client_id="collector")
    publisher = Device(broker.port, [], client_id="publisher")
    faulted = when(condition, fault)
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
        while time.monotonic() < deadline and (len(set(replies) | set(dead)) < count or not idle()):
            try:
                msg = collector.next(timeout=0.2)
            except Exception:
                continue
            seq = int(msg.properties.CorrelationData)
            (dead if msg.topic.startswith("dlq/") else replies)[seq] += 1
        while not collector.messages.empty():
            msg = collector.messages.get()
            (dead if msg.topic.startswith("dlq/") else replies)[int(msg.properties.CorrelationData)] += 1
        return replies, dead
    finally:
        publisher.close()
        collector.close()


def restartable_gateway(tmp: Path) -> tuple[Callable[[], RunningGateway], tuple[str, str]]:
    addresses = {"grpc_address": f"127.0.0.1:{free_port()}", "http_address": f"127.0.0.1:{free_port()}"}

    def start() -> RunningGateway:
        gw = start_gateway(
            FIXTURES / "stack.yaml", tmp / "gateway.log", "--max-message-bytes", str(8 * MiB), **addresses
        )
        gw.wait_ready(names=READY_FUNCTIONS)
        return gw

    return start, (addresses["grpc_address"], f"http://{addresses['http_address']}")


def test_gateway_killed_and_restarted_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    start, address = restartable_gateway(tmp_path)
    gateways = [start()]
    metrics = f"127.0.0.1:{free_port()}"
    bridge = start_bridge(broker.port, address, tmp_path / "bridge.log", "--metrics", metrics)
    received = lambda: bridge_metric(metrics, "bridge_messages_received_total")  # noqa: E731

    def kill_and_restart() -> None:
        gateways[0].process.send_signal(signal.SIGKILL)
        gateways[0].process.wait()
        time.sleep(1.0)
        gateways.append(start())

    try:
        # the gateway dies with the load running: a third of the requests received by the bridge
        replies, dead = run_load(
            broker,
            "echo",
            600,
            150,
            kill_and_restart,
            lambda: received() >= 200,
            idle=lambda: bridge_metric(metrics, "bridge_inflight") == 0,
        )
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
    metrics = f"127.0.0.1:{free_port()}"
    extra = ("--ack", mode, "--metrics", metrics)
    bridges = [start_bridge(broker.port, address, log, *extra)]  # returns once subscribed
    inflight = lambda: bridge_metric(metrics, "bridge_inflight")  # noqa: E731

    def kill_and_restart() -> None:
        bridges[0].send_signal(signal.SIGKILL)
        bridges[0].wait()
        time.sleep(1.0)
        bridges.append(start_bridge(broker.port, address, log, *extra))

    try:
        # 16 handler threads x 0.3 s < 100 requests/s: requests pile up in the bridge; it is killed
        # once its own gauge shows at least 10 in flight (received, not yet answered)
        killed = []
        replies, dead = run_load(
            broker,
            "slower",
            300,
            100,
            lambda: (killed.append(inflight()), kill_and_restart()),
            lambda: inflight() >= 10,
            settle=30,
            idle=lambda: inflight() == 0,
        )
        assert killed and killed[0] >= 10, "the bridge was not killed with requests in flight"
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
