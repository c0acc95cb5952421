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

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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


def one_run(args: argparse.Namespace, number: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="openfx-mqtt-bench-"))
    port = free_port()
    broker = mosquitto.start(tmp / "mosquitto", port, persistence=False)
    platform = Platform(["echo"], standalone=False, pinned=1)
    gateway = (platform.grpc, f"http://{platform.http}")
    client_id = f"bench-bridge-{number}"  # the same after a restart: the broker kept its session
    box = [start_bridge(port, gateway, tmp / "bridge.log", client_id=client_id)]
    rows: list[tuple[str, str, dict]] = []
    cpu: dict[str, float] = {}
    try:
        raw = Load(port, "raw/echo")
        for label, count, rate in (
            ("flood", args.flood, None),
            (f"paced {args.rate:g}/s", args.paced, args.rate),
        ):
            rows.append(
                ("raw broker round trip", f"{label} {count:,}", raw.run("raw/echo", count, rate, "unused"))
            )
        raw.close()
        via = Load(port, "bench/replies")
        via.run("fn/echo", min(500, args.flood), None, "bench/replies")  # warm up
        gateway_pid = platform.procs[0].pid
        processes = {
            "load generator": [os.getpid()],
            "broker": [broker.pid],
            "bridge": [box[0].pid],
            "gateway": [gateway_pid],
            "echo replica": descendants(gateway_pid),
        }
        before = {name: sum(map(cpu_seconds, pids)) for name, pids in processes.items()}
        flood = via.run("fn/echo", args.flood, None, "bench/replies")
        cpu = {
            name: (sum(map(cpu_seconds, pids)) - before[name]) / args.flood * 1e6
            for name, pids in processes.items()
        }
        rows.append(("bridge -> gateway -> echo", f"flood {args.flood:,}", flood))
        paced = via.run("fn/echo", args.paced, args.rate, "bench/replies")
        rows.append(("bridge -> gateway -> echo", f"paced {args.rate:g}/s {args.paced:,}", paced))
        if args.proof:
            rows += proof(args, port, platform, via, tmp, box, client_id)
        via.close()
    finally:
        box[0].send_signal(signal.SIGTERM)
        box[0].wait(30)
        platform.close()
        broker.terminate()
        broker.wait(10)
    return {"rows": rows, "cpu": cpu}


def verdict(run: dict) -> tuple[bool, str]:
    rows = run["rows"]
    raw = next(r for path, load, r in rows if path.startswith("raw") and load.startswith("flood"))
    flood = next(r for path, load, r in rows if path.startswith("bridge") and load.startswith("flood"))
    paced = next(r for path, load, r in rows if path.startswith("bridge") and load.startswith("paced"))
    ratio = flood["rate"] / raw["rate"]
    lost = sum(r["missing"] + r["dups"] for path, _, r in rows if not path.startswith("raw"))
    checks = [
        (flood["rate"] >= 1500 and ratio >= 0.6, f"flood {flood['rate']:,.0f} msg/s = {ratio:.2f}x raw"),
        (paced["p99"] <= 5.0, f"paced p99 {paced['p99']:.2f} ms"),
        (lost == 0, f"{lost} missing or duplicated"),
    ]
    ok = all(c for c, _ in checks)
    return ok, "; ".join(f"{text} ({'met' if c else 'NOT met'})" for c, text in checks)


def print_run(number: int, run: dict) -> None:
    print(f"\n### Run {number}\n")
    print("| path | load | msg/s | p50 ms | p99 ms | missing | duplicates |")
    print("|---|---|---|---|---|---|---|")
    for path, load, r in run["rows"]:
        ms = f"{r['p50']:.2f} | {r['p99']:.2f}"
        print(f"| {path} | {load} | {r['rate']:,.0f} | {ms} | {r['missing']} | {r['dups']} |")
    cpu = run["cpu"]
    print("\nCPU per message during the bridge flood (µs, from /proc):\n")
    print("| " + " | ".join(cpu) + " | total |")
    print("|" + "---|" * (len(cpu) + 1))
    print("| " + " | ".join(f"{v:,.0f}" for v in cpu.values()) + f" | {sum(cpu.values()):,.0f} |")
    ok, text = verdict(run)
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
        run = one_run(args, number)
        print_run(number, run)
        ok, text = verdict(run)
        met += ok
        summary.append(f"| {number} | {text} | {'yes' if ok else 'no'} |")
    if args.runs > 1:
        print("\n| run | result | all targets |\n|---|---|---|")
        print("\n".join(summary))
    print(f"\nAll targets met in {met} of {args.runs} run(s).")


def proof(
    args: argparse.Namespace, port: int, platform: Platform, load: Load, tmp: Path, box: list, client_id: str
) -> list:
    rows = []
    gateway = (platform.grpc, f"http://{platform.http}")

    def kill_gateway() -> None:
        old = platform.procs[0]
        old.send_signal(signal.SIGKILL)
        old.wait()
        time.sleep(1)
        platform.procs[0] = subprocess.Popen(old.args, stdout=platform.log, stderr=subprocess.STDOUT)

    threading.Timer(3, kill_gateway).start()
    result = load.run("fn/echo", args.proof, args.rate, "bench/replies")
    rows.append(("proof: gateway SIGKILL + restart at t=3 s", f"{args.proof:,} at {args.rate:g}/s", result))

    def kill_bridge() -> None:
        box[0].send_signal(signal.SIGKILL)
        box[0].wait()
        time.sleep(1)
        box[0] = start_bridge(port, gateway, tmp / "bridge.log", client_id=client_id)

    threading.Timer(3, kill_bridge).start()
    result = load.run("fn/echo", args.proof, args.rate, "bench/replies")
    rows.append(("proof: bridge SIGKILL + restart at t=3 s", f"{args.proof:,} at {args.rate:g}/s", result))
    return rows


if __name__ == "__main__":
    main()
