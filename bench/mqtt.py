"""MQTT through the bridge to echo, beside the raw broker round trip, in one table per run.

    .venv/bin/python bench/mqtt.py [--runs 5] [--flood 5000] [--rate 500] [--paced 3000] [--proof 5000]

Each run starts a broker, a gateway with echo (one replica, pinned) and the bridge, then measures:
the raw mosquitto round trip (publish -> subscriber, no bridge) and bridge -> gateway -> echo ->
reply, each as a flood (throughput) and paced at --rate (latency, publish to reply); the CPU each
process spent per message during the bridge flood (from /proc); and the two kill runs (--proof N
requests at --rate, the gateway SIGKILLed and restarted at t=3 s, then the bridge): every sequence
number must come back, duplicates are counted. QoS 1, MQTT 5, 100-byte payloads, the same load
generator (publisher and collector, two paho clients in this process) for every row.
Targets (issue 18): flood >= 1,500 msg/s and >= 0.6x the raw flood of the same run; paced p99 <= 5 ms;
0 missing, 0 duplicates.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    ROOT,
    Platform,
    cpu_seconds,
    descendants,
    free_port,
    parse_args,
    percentiles,
    scratch,
)

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


PROCESSES = ("load generator", "broker", "bridge", "gateway", "echo replica")


class Measured:
    """Runs rows of one run, each with the CPU every process spent per message (from /proc); the
    pids are looked up at each row, as the kill runs replace the gateway and the bridge."""

    def __init__(self, broker: subprocess.Popen[bytes], platform: Platform, box: list) -> None:
        self.broker, self.platform, self.box = broker, platform, box
        self.rows: list[tuple[str, str, dict, dict[str, float] | None]] = []

    def pids(self) -> dict[str, list[int]]:
        gateway = self.platform.procs[0].pid
        return {
            "load generator": [os.getpid()],
            "broker": [self.broker.pid],
            "bridge": [self.box[0].pid],
            "gateway": [gateway],
            "echo replica": descendants(gateway),
        }

    def row(self, path: str, load: str, count: int, measure: Callable[[], dict], cpu: bool = True) -> dict:
        before = {name: sum(map(cpu_seconds, pids)) for name, pids in self.pids().items()}
        result = measure()
        spent = {
            name: (sum(map(cpu_seconds, pids)) - before[name]) / count * 1e6
            for name, pids in self.pids().items()
        }
        self.rows.append((path, load, result, spent if cpu else None))
        return result


def one_run(args: argparse.Namespace, number: int) -> list:
    with scratch("openfx-mqtt-bench-") as tmp:
        return measure(args, number, tmp)


def measure(args: argparse.Namespace, number: int, tmp: Path) -> list:
    """Every row of one run: broker, platform and bridge (its logs and the broker's in `tmp`)."""
    port = free_port()
    broker = mosquitto.start(tmp / "mosquitto", port, persistence=False)
    platform = Platform(["echo"], standalone=False, pinned=1)
    gateway = (platform.grpc, f"http://{platform.http}")
    client_id = f"bench-bridge-{number}"  # the same after a restart: the broker kept its session
    box = [start_bridge(port, gateway, tmp / "bridge.log", client_id=client_id)]
    m = Measured(broker, platform, box)
    flood, paced = f"flood {args.flood:,}", f"paced {args.rate:g}/s {args.paced:,}"
    try:
        raw = Load(port, "raw/echo")
        m.row("raw broker round trip", flood, args.flood, lambda: raw.run("raw/echo", args.flood, None, "-"))
        m.row(
            "raw broker round trip",
            paced,
            args.paced,
            lambda: raw.run("raw/echo", args.paced, args.rate, "-"),
        )
        raw.close()
        via = Load(port, "bench/replies")
        via.run("fn/echo", min(500, args.flood), None, "bench/replies")  # warm up
        bridged = "bridge -> gateway -> echo"
        m.row(bridged, flood, args.flood, lambda: via.run("fn/echo", args.flood, None, "bench/replies"))
        m.row(bridged, paced, args.paced, lambda: via.run("fn/echo", args.paced, args.rate, "bench/replies"))
        if args.proof:
            proof(args, port, m, via, tmp, client_id)
        # what the bridge's gRPC transport costs, side by side (last: the HTTP bridge's session is
        # left behind with the broker, and nothing runs after this row)
        box[0].send_signal(signal.SIGTERM)
        box[0].wait(30)
        box[0] = start_bridge(
            port, gateway, tmp / "bridge.log", "--transport", "grpc", client_id="bench-grpc"
        )
        via.run("fn/echo", min(500, args.flood), None, "bench/replies")
        grpc_row = "bridge (transport: grpc) -> gateway -> echo"
        m.row(grpc_row, flood, args.flood, lambda: via.run("fn/echo", args.flood, None, "bench/replies"))
        via.close()
    finally:
        box[0].send_signal(signal.SIGTERM)
        box[0].wait(30)
        platform.close()
        broker.terminate()
        broker.wait(10)
    return m.rows


def verdict(rows: list) -> tuple[bool, str]:
    def find(path: str, load: str) -> dict:
        return next(r for p, lo, r, _ in rows if p == path and lo.startswith(load))

    raw = find("raw broker round trip", "flood")
    flood = find("bridge -> gateway -> echo", "flood")
    paced = find("bridge -> gateway -> echo", "paced")
    ratio = flood["rate"] / raw["rate"]
    lost = sum(r["missing"] + r["dups"] for p, _, r, _ in rows if not p.startswith("raw"))
    checks = [
        (flood["rate"] >= 1500 and ratio >= 0.6, f"flood {flood['rate']:,.0f} msg/s = {ratio:.2f}x raw"),
        (paced["p99"] <= 5.0, f"paced p99 {paced['p99']:.2f} ms"),
        (lost == 0, f"{lost} missing or duplicated"),
    ]
    ok = all(c for c, _ in checks)
    return ok, "; ".join(f"{text} ({'met' if c else 'NOT met'})" for c, text in checks)


def print_run(number: int, rows: list) -> None:
    print(f"\n### Run {number}\n")
    cpu_heads = " | ".join(f"{name} µs" for name in PROCESSES)
    print(f"| path | load | msg/s | p50 ms | p99 ms | missing | duplicates | {cpu_heads} | CPU µs/msg |")
    print("|" + "---|" * (8 + len(PROCESSES)))
    for path, load, r, cpu in rows:
        ms = f"{r['p50']:.2f} | {r['p99']:.2f}"
        if cpu is None:
            spent = " | ".join("" for _ in PROCESSES) + " | (a process was replaced)"
        else:
            spent = " | ".join(f"{cpu[name]:,.0f}" for name in PROCESSES) + f" | {sum(cpu.values()):,.0f}"
        print(f"| {path} | {load} | {r['rate']:,.0f} | {ms} | {r['missing']} | {r['dups']} | {spent} |")
    ok, text = verdict(rows)
    print(f"\nTargets: {text}.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--flood", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--paced", type=int, default=3000)
    ap.add_argument("--proof", type=int, default=5000)
    args = parse_args(ap, flood=100, paced=50, rate=100.0, proof=0, runs=1)
    print(
        f"QoS 1, MQTT 5, 100-byte payloads, echo pinned at 1 replica; {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}; {args.runs} run(s)"
    )
    met = 0
    summary = []
    for number in range(1, args.runs + 1):
        rows = one_run(args, number)
        print_run(number, rows)
        ok, text = verdict(rows)
        met += ok
        summary.append(f"| {number} | {text} | {'yes' if ok else 'no'} |")
    if args.runs > 1:
        print("\n| run | result | all targets |\n|---|---|---|")
        print("\n".join(summary))
    print(f"\nAll targets met in {met} of {args.runs} run(s).")


def proof(args: argparse.Namespace, port: int, m: Measured, load: Load, tmp: Path, client_id: str) -> None:
    """The reliability rows: the gateway, then the bridge, SIGKILLed at t=3 s and restarted 1 s later."""
    platform, box = m.platform, m.box
    gateway = (platform.grpc, f"http://{platform.http}")
    count = f"{args.proof:,} at {args.rate:g}/s"

    def kill_gateway() -> None:
        old = platform.procs[0]
        old.send_signal(signal.SIGKILL)
        old.wait()
        time.sleep(1)
        platform.procs[0] = subprocess.Popen(old.args, stdout=platform.log, stderr=subprocess.STDOUT)

    def kill_bridge() -> None:
        box[0].send_signal(signal.SIGKILL)
        box[0].wait()
        time.sleep(1)
        box[0] = start_bridge(port, gateway, tmp / "bridge.log", client_id=client_id)

    for what, kill in (("gateway", kill_gateway), ("bridge", kill_bridge)):
        threading.Timer(3, kill).start()
        m.row(
            f"proof: {what} SIGKILL + restart at t=3 s",
            count,
            args.proof,
            lambda: load.run("fn/echo", args.proof, args.rate, "bench/replies"),
            cpu=False,
        )


if __name__ == "__main__":
    main()
