"""MQTT through the bridge to echo, beside the raw broker round trip, in one run.

    .venv/bin/python bench/mqtt.py [--flood 5000] [--rate 500] [--paced 3000] [--proof 5000]

Rows: raw mosquitto round trip (publish -> subscriber, no bridge) and bridge -> gateway -> echo ->
reply; each as a flood (throughput) and paced at --rate (latency, publish to reply). With
--proof N, the longer reliability run: N requests at --rate with the gateway killed and restarted,
then the bridge killed and restarted; every sequence number must come back (duplicates counted).
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, os.path.dirname(__file__))
from common import ROOT, Platform, free_port, parse_args, percentiles  # noqa: E402

from openfx.bridge import mosquitto  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.mqtt_helpers import start_bridge  # noqa: E402  (the tests' launcher: waits until subscribed)


def client(port: int, cid: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.on_socket_open = lambda cl, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


class Load:
    """Publisher + collector in one process; latency = reply time - publish time of the same seq."""

    def __init__(self, port: int, listen: str) -> None:
        self.received: queue.Queue[tuple[int, float]] = queue.Queue()
        self.sub = client(port, f"collector-{os.getpid()}-{listen.replace('/', '_')}")
        done = threading.Event()
        self.sub.on_subscribe = lambda *a: done.set()
        self.sub.on_message = lambda c, u, m: self.received.put(
            (int(m.properties.CorrelationData), time.perf_counter())
        )
        self.sub.subscribe(listen, qos=1)
        done.wait(10)
        self.pub = client(port, f"publisher-{os.getpid()}-{listen.replace('/', '_')}")

    def run(self, topic: str, count: int, rate: float | None, reply_to: str, timeout: float = 120) -> dict:
        sent: dict[int, float] = {}
        lat: list[float] = []
        seen: set[int] = set()
        dups = 0
        started = time.perf_counter()
        for seq in range(count):
            if rate:
                delay = started + seq / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_to
            props.CorrelationData = str(seq).encode()
            sent[seq] = time.perf_counter()
            self.pub.publish(topic, b"x" * 100, qos=1, properties=props)
        deadline = time.perf_counter() + timeout
        while len(seen) < count and time.perf_counter() < deadline:
            try:
                seq, at = self.received.get(timeout=1)
            except queue.Empty:
                continue
            if seq in seen:
                dups += 1
                continue
            seen.add(seq)
            lat.append(at - sent[seq])
        elapsed = time.perf_counter() - started
        p50, p99 = percentiles(lat) if lat else (0.0, 0.0)
        return {
            "rate": len(seen) / elapsed,
            "p50": p50 / 1000,
            "p99": p99 / 1000,
            "missing": count - len(seen),
            "dups": dups,
        }

    def close(self) -> None:
        for c in (self.pub, self.sub):
            c.disconnect()
            c.loop_stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flood", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--paced", type=int, default=3000)
    ap.add_argument("--proof", type=int, default=0)
    args = parse_args(ap, flood=100, paced=50, rate=100.0)
    tmp = Path(tempfile.mkdtemp(prefix="openfx-mqtt-bench-"))
    port = free_port()
    broker = mosquitto.start(tmp / "mosquitto", port, persistence=False)
    platform = Platform(["echo"])
    bridge = start_bridge(
        port, (platform.grpc, f"http://{platform.http}"), tmp / "bridge.log", client_id="bench-bridge"
    )
    rows = []
    try:
        raw = Load(port, "raw/echo")
        for label, count, rate in (
            ("flood", args.flood, None),
            (f"paced {args.rate:g}/s", args.paced, args.rate),
        ):
            rows.append(("raw broker round trip", label, raw.run("raw/echo", count, rate, "unused")))
        raw.close()
        via = Load(port, "bench/replies")
        via.run("fn/echo", min(500, args.flood), None, "bench/replies")  # warm up
        for label, count, rate in (
            ("flood", args.flood, None),
            (f"paced {args.rate:g}/s", args.paced, args.rate),
        ):
            rows.append(
                ("bridge -> gateway -> echo", label, via.run("fn/echo", count, rate, "bench/replies"))
            )
        if args.proof:
            rows += proof(args, port, platform, via, tmp, bridge_box := [bridge])
            bridge = bridge_box[0]
        via.close()
    finally:
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(30)
        platform.close()
        broker.terminate()
    print("\n| path | load | msg/s | p50 ms | p99 ms | missing | duplicates |")
    print("|---|---|---|---|---|---|---|")
    for path, load, r in rows:
        ms = f"{r['p50']:.2f} | {r['p99']:.2f}"
        print(f"| {path} | {load} | {r['rate']:,.0f} | {ms} | {r['missing']} | {r['dups']} |")


def proof(args: argparse.Namespace, port: int, platform: Platform, load: Load, tmp: Path, box: list) -> list:
    rows = []
    gateway_proc = platform.procs[0]

    def kill_gateway() -> None:
        gateway_proc.send_signal(signal.SIGKILL)
        gateway_proc.wait()
        time.sleep(1)
        platform.procs[0] = subprocess.Popen(gateway_proc.args, stdout=platform.log, stderr=subprocess.STDOUT)

    threading.Timer(3, kill_gateway).start()
    rows.append(
        (
            "proof: gateway SIGKILL + restart",
            f"{args.proof} at {args.rate:g}/s",
            load.run("fn/echo", args.proof, args.rate, "bench/replies"),
        )
    )

    def kill_bridge() -> None:
        box[0].send_signal(signal.SIGKILL)
        box[0].wait()
        time.sleep(1)
        box[0] = start_bridge(
            port, (platform.grpc, f"http://{platform.http}"), tmp / "bridge.log", client_id="bench-bridge"
        )

    threading.Timer(3, kill_bridge).start()
    rows.append(
        (
            "proof: bridge SIGKILL + restart",
            f"{args.proof} at {args.rate:g}/s",
            load.run("fn/echo", args.proof, args.rate, "bench/replies"),
        )
    )
    return rows


if __name__ == "__main__":
    main()
